//! Who may use a lease: only the worker it was granted to, presenting the grant's fencing
//! token and its random secret. Workers run on machines the coordinator does not trust, and
//! tokens are small sequential numbers, so the token alone proves nothing.
//!
//! The check reads the shard's current grant and compares; the write that follows is still
//! guarded by `(shard, token)` in the store. A token names exactly one grant, and a grant's
//! worker and secret never change, so a write that passes both refers to the grant that was
//! checked.
//!
//! Shard ids are never reused, so `(shard, token)` names one grant for good, and all a grant
//! holds (worker, secret, rows, job, places) is fixed when it is made. `Grants` therefore
//! remembers the grants it has read: heartbeats, checkpoints and completions, whose writes are
//! guarded by `(shard, token, leased)` in the store, check against what it remembers and read
//! only grants it has not seen. Whether a remembered grant is still leased is the guarded
//! write's to say. Other checks (failures, releases) read the grant afresh.
//!
//! Heartbeats need not write every time: `Grants` also remembers when this replica last
//! extended each lease. A lease it extended less than `renew_every` ago is still leased (an
//! expiry needs a whole TTL without an extension) and is answered `held` without a write, so
//! at 1,000 workers most heartbeats cost no transaction. What such an answer cannot see
//! until the next extension: a copy of the shard granted by another replica, or a job that
//! stopped there; the lease's guarded writes refuse meanwhile, so nothing is ever recorded
//! for a lease that is not held, and the worker hears of it at most `renew_every` late.
//! This replica's cancels and decided speculative races drop the remembered extensions at
//! once (`forget_renewals`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nightshift_proto::wire::LeaseRef;
use subtle::ConstantTimeEq;

use nightshift_metastore::{DynMetastore, LeaseHolder, LeaseTiming, Result};

/// A lease is extended in the store when this replica last extended it a quarter of its TTL
/// ago or more (so it always has three quarters of its TTL left), and at least this often,
/// which bounds how late a worker hears of a change made by another replica.
const MAX_RENEW_EVERY: Duration = Duration::from_secs(5);

/// How long after extending a lease this replica may answer its heartbeats without a write.
pub fn renew_every(timing: LeaseTiming) -> Duration {
    let quarter_ttl = Duration::from_millis(u64::try_from(timing.ttl_ms / 4).unwrap_or(0));
    quarter_ttl.min(MAX_RENEW_EVERY)
}

/// The rule: same token, same worker, same secret (compared in constant time).
pub fn holds(holder: &LeaseHolder, worker: &str, lease: &LeaseRef) -> bool {
    let Some(secret) = holder.secret else {
        return false;
    };
    let same_secret: bool = secret
        .as_u128()
        .to_be_bytes()
        .ct_eq(&lease.secret.as_u128().to_be_bytes())
        .into();
    same_secret && holder.token == lease.token && holder.worker == worker
}

/// For each lease, its grant when `worker` holds it, else `None`.
pub async fn held_by(
    store: &DynMetastore,
    worker: &str,
    leases: &[LeaseRef],
) -> Result<Vec<Option<LeaseHolder>>> {
    let (workers, leases): (Vec<&str>, Vec<LeaseRef>) = leases.iter().map(|l| (worker, *l)).unzip();
    held_by_each(store, &workers, &leases).await
}

/// `held_by` for leases of several workers at once (`workers[i]` presents `leases[i]`): one
/// read for all of them.
pub async fn held_by_each(
    store: &DynMetastore,
    workers: &[&str],
    leases: &[LeaseRef],
) -> Result<Vec<Option<LeaseHolder>>> {
    let mut ids: Vec<i64> = leases.iter().map(|l| l.shard_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let holders: HashMap<(i64, i64), LeaseHolder> = store
        .lease_holders(&ids)
        .await?
        .into_iter()
        .map(|h| ((h.shard_id, h.token), h))
        .collect();
    Ok(answer(&holders, workers, leases))
}

/// For each lease, its grant among `grants` (by shard and token) when `workers[i]` holds it.
fn answer(
    grants: &HashMap<(i64, i64), LeaseHolder>,
    workers: &[&str],
    leases: &[LeaseRef],
) -> Vec<Option<LeaseHolder>> {
    workers
        .iter()
        .zip(leases)
        .map(|(worker, lease)| {
            grants
                .get(&(lease.shard_id, lease.token))
                .filter(|h| holds(h, worker, lease))
                .cloned()
        })
        .collect()
}

/// Grants a coordinator remembers; past this it forgets them all and reads them again.
const MAX_REMEMBERED_GRANTS: usize = 100_000;

/// The grants this coordinator has read, by `(shard, token)` (see the module's notes): for
/// checks followed by a write that the store guards by `(shard, token, leased)`.
#[derive(Default)]
pub struct Grants {
    known: Mutex<HashMap<(i64, i64), LeaseHolder>>,
    /// By shard: the token of the grant this replica last extended, and when.
    renewed: Mutex<HashMap<i64, (i64, Instant)>>,
}

impl Grants {
    /// `held_by_each`, reading only the grants not remembered.
    pub async fn held_by_each(
        &self,
        store: &DynMetastore,
        workers: &[&str],
        leases: &[LeaseRef],
    ) -> Result<Vec<Option<LeaseHolder>>> {
        let mut found: HashMap<(i64, i64), LeaseHolder> = HashMap::new();
        let mut unseen = Vec::new();
        {
            let known = self.lock();
            for l in leases {
                match known.get(&(l.shard_id, l.token)) {
                    Some(h) => {
                        found.insert((l.shard_id, l.token), h.clone());
                    }
                    None => unseen.push(l.shard_id),
                }
            }
        }
        if !unseen.is_empty() {
            unseen.sort_unstable();
            unseen.dedup();
            let read = store.lease_holders(&unseen).await?;
            let mut known = self.lock();
            if known.len() + read.len() > MAX_REMEMBERED_GRANTS {
                known.clear();
            }
            for h in read {
                known.insert((h.shard_id, h.token), h.clone());
                found.insert((h.shard_id, h.token), h);
            }
        }
        Ok(answer(&found, workers, leases))
    }

    /// Forgets grants that have ended (completed, released).
    pub fn forget(&self, leases: impl IntoIterator<Item = LeaseRef>) {
        let mut known = self.lock();
        let mut renewed = lock(&self.renewed);
        for l in leases {
            known.remove(&(l.shard_id, l.token));
            renewed.remove(&l.shard_id);
        }
    }

    /// Whether this replica extended `lease` less than `within` ago.
    pub fn renewed_within(&self, lease: &LeaseRef, within: Duration) -> bool {
        lock(&self.renewed)
            .get(&lease.shard_id)
            .is_some_and(|&(token, at)| token == lease.token && at.elapsed() < within)
    }

    /// Notes that the store just extended the leases `(shard, token)`.
    pub fn note_renewed(&self, leases: impl IntoIterator<Item = (i64, i64)>) {
        let now = Instant::now();
        let mut renewed = lock(&self.renewed);
        for (shard_id, token) in leases {
            if renewed.len() >= MAX_REMEMBERED_GRANTS {
                renewed.clear();
            }
            renewed.insert(shard_id, (token, now));
        }
    }

    /// Drops every remembered extension: leases ended other than by their holders (a job
    /// cancelled, a speculative race decided), and their holders' next heartbeats must say so.
    pub fn forget_renewals(&self) {
        lock(&self.renewed).clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(i64, i64), LeaseHolder>> {
        lock(&self.known)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use nightshift_proto::wire::LeaseSecret;

    use super::*;

    #[test]
    fn only_the_holder_with_the_secret_and_token_holds() {
        let secret = LeaseSecret::from_u128(0xfeed_beef);
        let holder = LeaseHolder {
            shard_id: 1,
            token: 7,
            worker: "w1".into(),
            secret: Some(secret),
            rows: 10,
            job_uid: "u".into(),
            output_uri: "/out".into(),
            merge_files: None,
        };
        let lease = LeaseRef {
            shard_id: 1,
            token: 7,
            secret,
        };
        assert!(holds(&holder, "w1", &lease));
        assert!(!holds(&holder, "w2", &lease), "another worker");
        let guessed = LeaseRef {
            secret: LeaseSecret::from_u128(1),
            ..lease
        };
        assert!(!holds(&holder, "w1", &guessed), "a guessed secret");
        let stale = LeaseRef { token: 6, ..lease };
        assert!(!holds(&holder, "w1", &stale), "a stale token");
        let unset = LeaseHolder {
            secret: None,
            ..holder
        };
        assert!(!holds(&unset, "w1", &lease), "a grant without a secret");
    }

    #[test]
    fn a_lease_extended_lately_is_fresh_until_its_time_or_a_forget() {
        let grants = Grants::default();
        let lease = LeaseRef {
            shard_id: 3,
            token: 2,
            secret: LeaseSecret::from_u128(9),
        };
        let within = Duration::from_secs(60);
        assert!(!grants.renewed_within(&lease, within), "never extended");
        grants.note_renewed([(3, 2)]);
        assert!(grants.renewed_within(&lease, within));
        assert!(
            !grants.renewed_within(&lease, Duration::ZERO),
            "extended too long ago"
        );
        let older = LeaseRef { token: 1, ..lease };
        assert!(!grants.renewed_within(&older, within), "another grant");
        grants.forget_renewals();
        assert!(!grants.renewed_within(&lease, within), "leases ended");
        grants.note_renewed([(3, 2)]);
        grants.forget([lease]);
        assert!(
            !grants.renewed_within(&lease, within),
            "ended by its holder"
        );
    }

    #[test]
    fn leases_are_extended_every_quarter_ttl_and_at_least_every_five_seconds() {
        let timing = |ttl_ms| LeaseTiming {
            ttl_ms,
            backoff_base_ms: 1,
            backoff_max_ms: 1,
        };
        assert_eq!(renew_every(timing(2_000)), Duration::from_millis(500));
        assert_eq!(renew_every(timing(30_000)), MAX_RENEW_EVERY);
        assert_eq!(renew_every(timing(-1)), Duration::ZERO, "a nonsense TTL");
    }
}

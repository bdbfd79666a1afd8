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

use std::collections::HashMap;
use std::sync::Mutex;

use nightshift_proto::wire::LeaseRef;
use subtle::ConstantTimeEq;

use nightshift_metastore::{DynMetastore, LeaseHolder, Result};

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
        for l in leases {
            known.remove(&(l.shard_id, l.token));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(i64, i64), LeaseHolder>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
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
}

//! Speculative copies of stragglers. The rule, here once for every store: a job whose row
//! shards are all granted or done (none pending), with at most `max_left` of them not done and
//! at least `min_done` done, has a straggler when one of its leased shards has been held more
//! than `slowness` times as long as its rows take at the job's median rate (milliseconds per
//! row over its recently done shards). A worker with a free slot that finds no pending shard
//! gets a copy of a straggler it does not hold: the rest of the shard, from the original's
//! checkpoint, under a lease of its own (a shard of kind `copy`, fenced like any other). The
//! first of the two to complete wins (`Copies::resolve_copies`): the original's parts past
//! the copy's first row are dropped and the copy's parts take their place, or the copy is
//! dropped with its parts. The loser's next heartbeat finds its lease lost.

use nightshift_proto::ShardState;

/// When a straggler gets a copy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SpeculationPolicy {
    /// A job is in its tail when at most this many of its row shards are not done.
    pub max_left: u32,
    /// A shard held this many times longer than the job's median needs is a straggler.
    pub slowness: f64,
    /// Done shards a job needs before its median rate is trusted.
    pub min_done: u32,
}

impl Default for SpeculationPolicy {
    fn default() -> Self {
        SpeculationPolicy {
            max_left: 8,
            slowness: 3.0,
            min_done: 3,
        }
    }
}

/// Done shards, most recent first, that the median rate is taken over.
pub(crate) const MEDIAN_SAMPLE: i64 = 64;

/// A row shard of a job in its tail, as the rule sees it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ShardTiming {
    pub id: i64,
    #[sqlx(try_from = "String")]
    pub state: ShardState,
    #[sqlx(try_from = "i64")]
    pub rows: u64,
    /// When its current (or last) grant began.
    pub leased_at_ms: Option<i64>,
    /// When it last checkpointed (for a done shard: about when it finished).
    pub checkpoint_at_ms: Option<i64>,
    /// A copy of it runs already.
    pub copied: bool,
}

impl ShardTiming {
    /// Milliseconds per row its last grant took, for a done shard.
    fn ms_per_row(&self) -> Option<f64> {
        let took = self.checkpoint_at_ms? - self.leased_at_ms?;
        (self.state == ShardState::Done && self.rows > 0)
            .then(|| took.max(1) as f64 / self.rows as f64)
    }
}

/// The leased shards among one job's `shards` (its leased ones and a sample of its done
/// ones) that are stragglers at `now_ms`, the slowest first.
pub fn stragglers(shards: &[ShardTiming], policy: &SpeculationPolicy, now_ms: i64) -> Vec<i64> {
    let mut rates: Vec<f64> = shards.iter().filter_map(ShardTiming::ms_per_row).collect();
    let leased: Vec<&ShardTiming> = shards
        .iter()
        .filter(|s| s.state == ShardState::Leased)
        .collect();
    if rates.len() < policy.min_done as usize || leased.len() > policy.max_left as usize {
        return Vec::new();
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    let mut late: Vec<(f64, i64)> = leased
        .into_iter()
        .filter(|s| !s.copied)
        .filter_map(|s| {
            let held = (now_ms - s.leased_at_ms?) as f64;
            let needs = (median * s.rows as f64).max(1.0);
            (held > policy.slowness * needs).then_some((held / needs, s.id))
        })
        .collect();
    late.sort_by(|a, b| b.0.total_cmp(&a.0));
    late.into_iter().map(|(_, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(id: i64, rows: u64, took: i64) -> ShardTiming {
        ShardTiming {
            id,
            state: ShardState::Done,
            rows,
            leased_at_ms: Some(1_000),
            checkpoint_at_ms: Some(1_000 + took),
            copied: false,
        }
    }

    fn leased(id: i64, rows: u64, since: i64) -> ShardTiming {
        ShardTiming {
            id,
            state: ShardState::Leased,
            rows,
            leased_at_ms: Some(since),
            checkpoint_at_ms: None,
            copied: false,
        }
    }

    #[test]
    fn a_shard_held_far_longer_than_the_median_needs_is_a_straggler() {
        // Done shards take 1 ms per row; 100 rows need 100 ms, 3x is 300 ms.
        let mut shards = vec![done(1, 100, 100), done(2, 100, 90), done(3, 100, 5_000)];
        shards.push(leased(4, 100, 10_000));
        shards.push(leased(5, 100, 10_250));
        shards.push(leased(6, 100, 9_000));
        let policy = SpeculationPolicy::default();
        // At 10,400: shard 6 (1,400 ms) and shard 4 (400 ms) are late, 5 (150 ms) is not.
        assert_eq!(stragglers(&shards, &policy, 10_400), [6, 4]);
        // A copied straggler gets no second copy.
        shards[5].copied = true;
        assert_eq!(stragglers(&shards, &policy, 10_400), [4]);
    }

    #[test]
    fn no_straggler_before_the_tail_or_without_enough_done_shards() {
        let policy = SpeculationPolicy {
            max_left: 1,
            ..SpeculationPolicy::default()
        };
        let few_done = [done(1, 10, 10), done(2, 10, 10), leased(3, 10, 0)];
        assert!(stragglers(&few_done, &policy, 1_000_000).is_empty());
        let mut many_left = vec![done(1, 10, 10), done(2, 10, 10), done(3, 10, 10)];
        many_left.extend([leased(4, 10, 0), leased(5, 10, 0)]);
        assert!(stragglers(&many_left, &policy, 1_000_000).is_empty());
        many_left.pop();
        assert_eq!(stragglers(&many_left, &policy, 1_000_000), [4]);
    }
}

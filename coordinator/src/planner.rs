//! Planning reads footers only: every input file's row groups become contiguous,
//! row-group-aligned shards near `shards.rows`, and the exact row total is known before any
//! data is read.

use nightshift_proto::wire::ShardPlan;

/// Splits one file's row groups (their row counts, in order) into shards near `target` rows.
/// A row group is never split; a shard closes before a row group when adding it would
/// overshoot the target by more than stopping now undershoots it.
pub fn plan_file(file_index: u32, row_groups: &[u64], target: u64) -> Vec<ShardPlan> {
    let mut shards = Vec::new();
    // The open shard: its first row group and first row; rows so far.
    let mut start_group = 0usize;
    let mut start_row = 0u64;
    let mut rows = 0u64;
    let mut file_row = 0u64;
    let close = |shards: &mut Vec<ShardPlan>, from: usize, to: usize, start_row: u64, rows: u64| {
        shards.push(ShardPlan {
            file_index,
            row_group_start: from as u32,
            row_group_end: to as u32,
            file_row_start: start_row,
            rows,
        })
    };
    for (i, &n) in row_groups.iter().enumerate() {
        if rows > 0 && rows + n > target && (rows + n - target) > target.saturating_sub(rows) {
            close(&mut shards, start_group, i, start_row, rows);
            start_group = i;
            start_row = file_row;
            rows = 0;
        }
        rows += n;
        file_row += n;
        if rows >= target {
            close(&mut shards, start_group, i + 1, start_row, rows);
            start_group = i + 1;
            start_row = file_row;
            rows = 0;
        }
    }
    if rows > 0 {
        close(&mut shards, start_group, row_groups.len(), start_row, rows);
    }
    shards
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn row_groups_are_never_split_and_targets_are_near() {
        let s = plan_file(0, &[100, 100, 100, 100, 100], 200);
        let rows: Vec<u64> = s.iter().map(|p| p.rows).collect();
        assert_eq!(rows, [200, 200, 100]);
        let s = plan_file(0, &[1000], 10);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].rows, 1000);
        let s = plan_file(3, &[60, 60, 60], 100);
        // 60 + 60 overshoots by 20, stopping at 60 undershoots by 40: keep going.
        assert_eq!(s.iter().map(|p| p.rows).collect::<Vec<_>>(), [120, 60]);
        assert!(s.iter().all(|p| p.file_index == 3));
    }

    /// Property: for any row groups and target, shards cover every row group exactly once, in
    /// order, with their row counts and starting rows right, and no empty shard.
    #[test]
    fn shards_cover_every_row_exactly_once() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..2000 {
            let groups: Vec<u64> = (0..rng.random_range(0..30))
                .map(|_| rng.random_range(0..5000))
                .collect();
            let target = rng.random_range(1..20_000);
            let shards = plan_file(0, &groups, target);
            let mut next_group = 0u32;
            let mut next_row = 0u64;
            for s in &shards {
                assert_eq!(s.row_group_start, next_group);
                assert!(s.row_group_end > s.row_group_start);
                assert_eq!(s.file_row_start, next_row);
                let sum: u64 = groups[s.row_group_start as usize..s.row_group_end as usize]
                    .iter()
                    .sum();
                assert_eq!(s.rows, sum);
                assert!(s.rows > 0 || groups.iter().all(|&g| g == 0));
                next_group = s.row_group_end;
                next_row += s.rows;
            }
            let total: u64 = groups.iter().sum();
            assert_eq!(next_row, total);
            if total > 0 {
                // Trailing empty row groups may be left out only when they hold nothing.
                let tail: u64 = groups[next_group as usize..].iter().sum();
                assert_eq!(tail, 0);
            }
            // No shard is more than one row group past the target.
            for s in &shards {
                let last = groups[s.row_group_end as usize - 1];
                assert!(s.rows < target + last || s.row_group_end - s.row_group_start == 1);
            }
        }
    }
}

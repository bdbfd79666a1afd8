//! Output files are made by workers while a job runs, never by the coordinator: consecutive
//! row shards whose parts are committed are gathered into merge work (shards of kind `merge`),
//! leased like any shard, whose worker rewrites the parts into one file of about
//! `output.target_file_mb`, in place under its output name (`number_files`). The commit then
//! only checks footers.
//!
//! The rule, here once for every store: walk the job's row shards in order from the first one
//! no merge covers; take consecutive finished ones while their parts stay under the target,
//! and close a group when it reaches the target; stop at the first unfinished shard. When
//! every row shard is finished, what is left is one last group, however small. So groups are
//! made in row order, each the same whichever replica makes it, and at most the last file of
//! a job is under the target.

/// A row shard as the merge planner sees it, in shard order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct MergeCandidate {
    #[sqlx(rename = "id")]
    pub shard_id: i64,
    /// All its rows are committed.
    pub done: bool,
    /// A merge already takes its parts.
    #[sqlx(default)]
    pub covered: bool,
    /// Bytes of its committed parts (output and errors).
    #[sqlx(try_from = "i64")]
    pub bytes: u64,
}

/// Row shards `[first, last]` (ids) to merge into one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeGroup {
    pub first: i64,
    pub last: i64,
}

/// The groups to create now for the row shards of a job whose plan is complete (see the
/// module's rule).
pub fn plan_groups(shards: &[MergeCandidate], target_bytes: u64) -> Vec<MergeGroup> {
    plan_groups_for(shards, target_bytes, true)
}

/// The groups to create now for one job's row shards; while its plan is not `complete`
/// (planning in the background), more shards may follow, so no last group closes early.
pub fn plan_groups_for(
    shards: &[MergeCandidate],
    target_bytes: u64,
    complete: bool,
) -> Vec<MergeGroup> {
    let open: Vec<&MergeCandidate> = shards.iter().skip_while(|s| s.covered).collect();
    let all_done = complete && open.iter().all(|s| s.done || s.covered);
    let mut groups = Vec::new();
    let mut run: Option<(i64, i64, u64)> = None;
    for s in open {
        if s.covered || !s.done {
            break;
        }
        let (first, _, bytes) = run.unwrap_or((s.shard_id, s.shard_id, 0));
        let bytes = bytes.saturating_add(s.bytes);
        if bytes >= target_bytes {
            groups.push(MergeGroup {
                first,
                last: s.shard_id,
            });
            run = None;
        } else {
            run = Some((first, s.shard_id, bytes));
        }
    }
    if let Some((first, last, _)) = run
        && all_done
    {
        groups.push(MergeGroup { first, last });
    }
    groups
}

/// How a new merge numbers its files, given what the job's merge before it counted (`(0, 0)`
/// for the first merge): each of its two files that has rows takes the next index of its
/// series, so the indexes follow row order with no gap, as the manifest lists the files. A job
/// whose earlier merges predate numbering (`None`) numbers nothing: its files are copied at
/// commit, as they were.
pub fn number_files(before: FileCounts, output_rows: u64, error_rows: u64) -> FileNumbers {
    let next = |before: Option<i64>, rows: u64| match before {
        Some(n) if rows > 0 => (Some(n), Some(n + 1)),
        other => (None, other),
    };
    let (output_file, output_files) = next(before.output_files, output_rows);
    let (error_file, error_files) = next(before.error_files, error_rows);
    FileNumbers {
        output_file,
        error_file,
        after: FileCounts {
            output_files,
            error_files,
        },
    }
}

/// Output files and error files of a job up to and with one merge (`None`: not numbered).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct FileCounts {
    pub output_files: Option<i64>,
    pub error_files: Option<i64>,
}

impl FileCounts {
    /// Before a job's first merge.
    pub const NONE_YET: FileCounts = FileCounts {
        output_files: Some(0),
        error_files: Some(0),
    };
}

/// The indexes of a merge's output file and error file (`None`: no such file, or not
/// numbered), and the counts it leaves for the next merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileNumbers {
    pub output_file: Option<i64>,
    pub error_file: Option<i64>,
    pub after: FileCounts,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(id: i64, done: bool, bytes: u64) -> MergeCandidate {
        MergeCandidate {
            shard_id: id,
            done,
            covered: false,
            bytes,
        }
    }

    fn ranges(groups: &[MergeGroup]) -> Vec<(i64, i64)> {
        groups.iter().map(|g| (g.first, g.last)).collect()
    }

    #[test]
    fn groups_close_at_the_target_and_stop_at_an_unfinished_shard() {
        let shards = [
            shard(1, true, 40),
            shard(2, true, 70),
            shard(3, true, 100),
            shard(4, true, 30),
            shard(5, false, 50),
            shard(6, true, 500),
        ];
        assert_eq!(ranges(&plan_groups(&shards, 100)), [(1, 2), (3, 3)]);
    }

    #[test]
    fn while_the_plan_is_incomplete_no_last_group_closes_early() {
        let shards = [shard(1, true, 150), shard(2, true, 30), shard(3, true, 20)];
        assert_eq!(ranges(&plan_groups_for(&shards, 100, false)), [(1, 1)]);
        assert_eq!(
            ranges(&plan_groups_for(&shards, 100, true)),
            [(1, 1), (2, 3)]
        );
    }

    #[test]
    fn when_every_shard_is_done_the_rest_is_one_last_group() {
        let mut shards = [shard(1, true, 150), shard(2, true, 30), shard(3, true, 20)];
        assert_eq!(ranges(&plan_groups(&shards, 100)), [(1, 1), (2, 3)]);
        // Once covered, nothing is planned twice; the tail waits for its last shard.
        shards[0].covered = true;
        shards[2].done = false;
        assert!(plan_groups(&shards, 100).is_empty());
        shards[2].done = true;
        assert_eq!(ranges(&plan_groups(&shards, 100)), [(2, 3)]);
        for s in &mut shards {
            s.covered = true;
        }
        assert!(plan_groups(&shards, 100).is_empty());
    }

    #[test]
    fn files_are_numbered_in_row_order_without_gaps() {
        let first = number_files(FileCounts::NONE_YET, 10, 0);
        assert_eq!((first.output_file, first.error_file), (Some(0), None));
        // Only poison rows: no output file, the next error index, the output count unchanged.
        let second = number_files(first.after, 0, 3);
        assert_eq!((second.output_file, second.error_file), (None, Some(0)));
        let third = number_files(second.after, 5, 1);
        assert_eq!((third.output_file, third.error_file), (Some(1), Some(1)));
        assert_eq!(
            third.after,
            FileCounts {
                output_files: Some(2),
                error_files: Some(2)
            }
        );
        let legacy = FileCounts {
            output_files: None,
            error_files: None,
        };
        let unnumbered = number_files(legacy, 5, 1);
        assert_eq!((unnumbered.output_file, unnumbered.after), (None, legacy));
    }

    #[test]
    fn every_file_but_the_last_reaches_the_target() {
        let sizes = [13u64, 90, 7, 55, 61, 2, 99, 100, 1, 1, 40];
        let mut shards: Vec<MergeCandidate> = sizes
            .iter()
            .enumerate()
            .map(|(i, b)| shard(i as i64 + 1, true, *b))
            .collect();
        let groups = plan_groups(&shards, 100);
        let bytes = |g: &MergeGroup| -> u64 {
            shards[(g.first - 1) as usize..g.last as usize]
                .iter()
                .map(|s| s.bytes)
                .sum()
        };
        assert!(groups[..groups.len() - 1].iter().all(|g| bytes(g) >= 100));
        let covered: Vec<i64> = groups.iter().flat_map(|g| g.first..=g.last).collect();
        assert_eq!(
            covered,
            (1..=11).collect::<Vec<_>>(),
            "each shard once, in order"
        );
        for s in &mut shards {
            s.covered = true;
        }
        assert!(plan_groups(&shards, 100).is_empty());
    }
}

//! Names in an output location, defined once for the worker that writes parts, the
//! coordinator that checks and commits them, and the tools that read the result.
//!
//! ```text
//! OUTPUT/part-00000.parquet ...          output files, written in place by merge work
//!                                        (committed once the manifest lists them)
//! OUTPUT/_errors/errors-00000.parquet    poison rows
//! OUTPUT/_manifest.json, OUTPUT/_SUCCESS the commit
//! OUTPUT/_parts/<job_uid>/s<shard>-t<token>-r<row>[-errors].parquet   parts, while the job runs
//! ```

/// Where a job's parts live while it runs, below the output.
pub const PARTS_DIR: &str = "_parts";
/// The manifest: the only files a reader should trust.
pub const MANIFEST: &str = "_manifest.json";
/// Written last: the commit is complete.
pub const SUCCESS: &str = "_SUCCESS";
/// Output files: `part-NNNNN.parquet`.
pub const OUTPUT_FILE_STEM: &str = "part";
/// Poison-row files: `_errors/errors-NNNNN.parquet`.
pub const ERROR_FILE_STEM: &str = "_errors/errors";
/// Extension of every data file.
pub const DATA_EXT: &str = "parquet";
/// Parquet key-value metadata naming the job whose worker or commit wrote the file: how a
/// commit recognises its own files and never adopts another's.
pub const JOB_UID_KEY: &str = "nightshift.job_uid";

/// `_parts/<job_uid>`: one job's parts, relative to the output.
pub fn parts_dir(job_uid: &str) -> String {
    format!("{PARTS_DIR}/{job_uid}")
}

/// The object name (inside `parts_dir`) of the part a lease writes from `row_start`; the error
/// part of the same range when `errors`. Unique per (shard, token, row), never overwritten.
pub fn part_name(shard_id: i64, token: i64, row_start: u64, errors: bool) -> String {
    let suffix = if errors { "-errors" } else { "" };
    format!("s{shard_id}-t{token}-r{row_start}{suffix}.{DATA_EXT}")
}

/// The name of the `index`th committed file of a series (`part`, `_errors/errors`).
pub fn data_file(stem: &str, index: usize) -> String {
    format!("{stem}-{index:05}.{DATA_EXT}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(parts_dir("abc"), "_parts/abc");
        assert_eq!(part_name(3, 7, 4096, false), "s3-t7-r4096.parquet");
        assert_eq!(part_name(3, 7, 0, true), "s3-t7-r0-errors.parquet");
        assert_eq!(data_file(OUTPUT_FILE_STEM, 2), "part-00002.parquet");
        assert_eq!(
            data_file(ERROR_FILE_STEM, 0),
            "_errors/errors-00000.parquet"
        );
    }
}

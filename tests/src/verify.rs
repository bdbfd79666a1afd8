//! Checks a committed output against its input with an independent implementation
//! (scripts/verify_output.py: pyarrow to read, ONNX Runtime's Python API run row by row).

use std::path::Path;

use serde::Deserialize;

use crate::python::run_script_with;

/// What the verifier found.
#[derive(Debug, Deserialize)]
pub struct Verified {
    pub input_rows: u64,
    pub output_rows: u64,
    pub distinct_ids: u64,
    pub missing: Vec<i64>,
    pub duplicated: Vec<i64>,
    pub passthrough_mismatches: u64,
    pub max_abs_diff: f64,
    pub rows_checked_against_model: u64,
    pub error_rows: u64,
    pub error_ids: Vec<i64>,
    pub manifest_total_rows: u64,
    pub unlisted_files: Vec<String>,
}

impl Verified {
    /// Every input row exactly once (except `poison` ids, which must be exactly the error
    /// rows), passthrough equal, predictions within 1e-5 of the model run on each row alone.
    pub fn assert_exact(&self, poison: &[i64]) {
        assert!(
            self.missing.iter().all(|id| poison.contains(id)),
            "rows missing from the output: {:?}",
            self.missing
        );
        assert!(
            self.duplicated.is_empty(),
            "rows written twice: {:?}",
            self.duplicated
        );
        assert_eq!(
            self.output_rows + self.error_rows,
            self.input_rows,
            "{self:?}"
        );
        assert_eq!(self.output_rows, self.manifest_total_rows, "{self:?}");
        assert_eq!(self.passthrough_mismatches, 0, "{self:?}");
        assert!(
            self.max_abs_diff <= 1e-5,
            "predictions differ by {}",
            self.max_abs_diff
        );
        assert!(self.rows_checked_against_model > 0);
        let mut errors = self.error_ids.clone();
        errors.sort();
        let mut want = poison.to_vec();
        want.sort();
        assert_eq!(errors, want, "error rows are not exactly the poison rows");
        assert!(
            self.unlisted_files.is_empty(),
            "output files outside the manifest: {:?}",
            self.unlisted_files
        );
    }
}

/// Runs the verifier on `output` (a committed output directory or `s3://` prefix) for the
/// standard fixture columns. `sample` limits the rows run through the model (0 = all).
pub fn verify_output(
    output: &str,
    input: &str,
    model: &Path,
    sample: usize,
    extra: &[&str],
) -> Verified {
    verify_output_with(&[], output, input, model, sample, extra)
}

/// `verify_output` with extra environment variables (the S3 server's, for `s3://` URIs).
pub fn verify_output_with(
    envs: &[(&str, String)],
    output: &str,
    input: &str,
    model: &Path,
    sample: usize,
    extra: &[&str],
) -> Verified {
    let sample = sample.to_string();
    let mut args = vec![
        "--output",
        output,
        "--input",
        input,
        "--model",
        model.to_str().unwrap_or_default(),
        "--sample",
        &sample,
    ];
    args.extend_from_slice(extra);
    let out = run_script_with("verify_output.py", &args, envs);
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("verifier printed {out:?}: {e}"))
}

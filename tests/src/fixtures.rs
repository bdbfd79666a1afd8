//! A temporary directory with generated data, models and specs for one test.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

use crate::python::run_script;

pub struct Fixture {
    pub dir: TempDir,
}

/// A job over generated files: data in `in/` (the input is its `*.parquet` glob), the model
/// `m.onnx`, the output directory `out`, and the spec `job.toml` naming them.
pub struct GeneratedJob {
    pub input: String,
    pub model: PathBuf,
    pub out: PathBuf,
    pub spec: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // NIGHTSHIFT_KEEP_TEST_DIRS=1 keeps every fixture's files (logs included) for a look.
        if std::env::var_os("NIGHTSHIFT_KEEP_TEST_DIRS").is_some() {
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
            eprintln!("kept {}", dir.keep().display());
        }
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

impl Fixture {
    pub fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("nightshift-test-")
                .tempdir()
                .expect("temp dir"),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `scripts/gen_data.py --out <dir>/<name> ARGS`; returns the directory.
    pub fn data(&self, name: &str, args: &[&str]) -> PathBuf {
        let out = self.path(name);
        let mut all = vec!["--out", out.to_str().unwrap_or_default()];
        all.extend_from_slice(args);
        run_script("gen_data.py", &all);
        out
    }

    /// `scripts/gen_model.py --out <dir>/<name> ARGS`; returns the file.
    pub fn model(&self, name: &str, args: &[&str]) -> PathBuf {
        let out = self.path(name);
        let mut all = vec!["--out", out.to_str().unwrap_or_default()];
        all.extend_from_slice(args);
        run_script("gen_model.py", &all);
        out
    }

    /// Generates data (`data_args`) and a model (`model_args`) and writes the spec of job
    /// `name` over them with `spec_toml` (`extra` appended).
    pub fn job(
        &self,
        name: &str,
        data_args: &[&str],
        model_args: &[&str],
        extra: &str,
    ) -> GeneratedJob {
        let data = self.data("in", data_args);
        let model = self.model("m.onnx", model_args);
        let out = self.path("out");
        let input = format!("{}/*.parquet", data.display());
        let spec = self.spec("job.toml", &spec_toml(name, &input, &model, &out, extra));
        GeneratedJob {
            input,
            model,
            out,
            spec,
        }
    }

    /// The fixture's directory as an `--allow-uri` prefix for a coordinator.
    pub fn allow_uri(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// Writes a spec file.
    pub fn spec(&self, name: &str, toml: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, toml).expect("write spec");
        p
    }
}

/// A spec for the generated data and model: `features` -> `x`, `logits` -> `logits`,
/// passthrough `id`, plus `extra` TOML appended (tables such as `[shards]`).
pub fn spec_toml(name: &str, input: &str, model: &Path, output: &Path, extra: &str) -> String {
    format!(
        r#"name = "{name}"

[input]
uri = "{input}"

[model]
uri = "{model}"
device = "cpu"

[model.inputs]
x = "features"

[model.outputs]
logits = "logits"

[output]
uri = "{output}"
passthrough = ["id"]

{extra}
"#,
        model = model.display(),
        output = output.display()
    )
}

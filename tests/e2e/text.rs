//! `[text]` jobs end to end: a string column tokenized in the worker, batched by token length,
//! pooled and normalised, checked row by row against an independent Python reference (the
//! `tokenizers` package and ONNX Runtime, each text alone). Texts of every kind: empty, one
//! character, far beyond `max_length`, non-ASCII, and nulls (poison rows). Killed for real.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use nightshift_tests::fixtures::Fixture;
use nightshift_tests::process::{ChildGuard, nightshift, run};
use nightshift_tests::python::run_script;

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");
/// Every 97th text is null.
const NULL_EVERY: u64 = 97;

/// A tokenizer, a BERT-style model and texts, all generated.
struct TextFixture {
    f: Fixture,
    tokenizer: PathBuf,
    data: PathBuf,
}

impl TextFixture {
    fn new(rows: u64) -> Self {
        let f = Fixture::new();
        let tokenizer = f.path("tokenizer.json");
        run_script("gen_tokenizer.py", &["--out", tokenizer.to_str().unwrap()]);
        let data = f.path("texts");
        let rows = rows.to_string();
        let every = NULL_EVERY.to_string();
        let args = [
            "--out",
            data.to_str().unwrap(),
            "--rows",
            &rows,
            "--files",
            "2",
        ];
        let more = [
            "--row-group-rows",
            "1000",
            "--specials",
            "--null-every",
            &every,
        ];
        run_script("gen_text_data.py", &[&args[..], &more[..]].concat());
        Self { f, tokenizer, data }
    }

    fn model(&self, name: &str, extra: &[&str]) -> PathBuf {
        let out = self.f.path(name);
        let args = [
            "--tokenizer",
            self.tokenizer.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        run_script("gen_text_model.py", &[&args[..], extra].concat());
        out
    }

    /// A spec embedding `body` with `model`; `inputs` and `output` are TOML lines.
    fn spec(&self, name: &str, model: &Path, inputs: &str, output: &str, extra: &str) -> PathBuf {
        let toml = format!(
            r#"name = "{name}"

[input]
uri = "{data}/*.parquet"

[text]
column = "body"
tokenizer = "{tokenizer}"
max_length = 128

[model]
uri = "{model}"
device = "cpu"

[model.inputs]
{inputs}

[model.outputs]
{output}

[output]
uri = "{out}"
passthrough = ["id"]

[errors]
max_fraction = 0.05

{extra}
"#,
            data = self.data.display(),
            // As users write it: relative to where `nightshift run` runs (`run` below).
            tokenizer = self.tokenizer.file_name().unwrap().to_str().unwrap(),
            model = model.display(),
            out = self.out(name).display(),
        );
        self.f.spec(&format!("{name}.toml"), &toml)
    }

    fn out(&self, name: &str) -> PathBuf {
        self.f.path(&format!("out-{name}"))
    }

    fn run(&self, spec: &Path) -> Output {
        let mut cmd = nightshift(Path::new(BIN));
        cmd.current_dir(self.f.dir.path())
            .arg("run")
            .arg(spec)
            .arg("--state")
            .arg(self.f.path("state"));
        run(cmd, Duration::from_secs(300))
    }

    /// The reference's verdict on job `name`'s output (it fails the test when not ok).
    fn check(&self, name: &str, model: &Path, reference: &[&str]) -> serde_json::Value {
        let input = format!("{}/*.parquet", self.data.display());
        let out = self.out(name);
        let args = [
            "--tokenizer",
            self.tokenizer.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--input",
            &input,
            "--output",
            out.to_str().unwrap(),
            "--max-length",
            "128",
        ];
        let line = run_script("text_reference.py", &[&args[..], reference].concat());
        let verdict: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
        assert_eq!(verdict["ok"], true, "{verdict}");
        assert_eq!(verdict["missing"], 0, "{verdict}");
        assert_eq!(verdict["duplicated"], 0, "{verdict}");
        assert!(verdict["null_rows"].as_u64().unwrap() > 0, "{verdict}");
        verdict
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The padding efficiency `run` reports.
fn padding_efficiency(o: &Output) -> f64 {
    let out = text(o);
    let line = out
        .lines()
        .find(|l| l.contains("padding efficiency"))
        .unwrap_or_else(|| panic!("{out}"));
    line.split("padding efficiency ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn embeddings_match_the_reference_row_by_row() {
    let t = TextFixture::new(6_000);
    let model = t.model("e.onnx", &[]);
    let inputs = "input_ids = \"body.input_ids\"\nattention_mask = \"body.attention_mask\"";
    let output =
        "last_hidden_state = { column = \"embedding\", pool = \"mean\", normalize = true }";
    let spec = t.spec("mean", &model, inputs, output, "");
    let o = t.run(&spec);
    assert!(o.status.success(), "{}", text(&o));
    let efficiency = padding_efficiency(&o);
    assert!(efficiency >= 0.85, "padding efficiency {efficiency}");
    let v = t.check(
        "mean",
        &model,
        &["--pool", "mean", "--normalize", "--atol", "1e-4"],
    );
    assert_eq!(v["rows_in"], 6_000);

    // A tokenizer that is not one is refused before anything runs, naming the key.
    std::fs::write(t.f.path("bad.json"), "{\"not\": \"a tokenizer\"}").unwrap();
    let bad = std::fs::read_to_string(&spec)
        .unwrap()
        .replace("\"tokenizer.json\"", "\"bad.json\"")
        .replace("name = \"mean\"", "name = \"bad\"")
        .replace("out-mean", "out-bad");
    let o = t.run(&t.f.spec("bad.toml", &bad));
    assert!(!o.status.success());
    assert!(text(&o).contains("text.tokenizer"), "{}", text(&o));

    // float16 through and through: a float16 model fed token types, the first token's
    // vector stored as Arrow Float16, a token budget per call.
    let model16 = t.model("e16.onnx", &["--dtype", "float16", "--token-types"]);
    let inputs16 = format!("{inputs}\ntoken_type_ids = \"body.token_type_ids\"");
    let output16 =
        "last_hidden_state = { column = \"embedding\", pool = \"cls\", dtype = \"float16\" }";
    let spec16 = t.spec(
        "cls16",
        &model16,
        &inputs16,
        output16,
        "[batch]\nmax_tokens = 2048\n",
    );
    let o = t.run(&spec16);
    assert!(o.status.success(), "{}", text(&o));
    t.check("cls16", &model16, &["--pool", "cls", "--atol", "5e-3"]);
}

#[test]
fn a_text_job_killed_mid_run_resumes_to_the_same_embeddings() {
    let t = TextFixture::new(40_000);
    let model = t.model(
        "e.onnx",
        &["--hidden", "64", "--layers", "3", "--intermediate", "256"],
    );
    let inputs = "input_ids = \"body.input_ids\"\nattention_mask = \"body.attention_mask\"";
    let output = "last_hidden_state = { column = \"embedding\", pool = \"max\" }";
    let extra = "[shards]\nrows = 5000\ncheckpoint_rows = 1000\n";
    let spec = t.spec("killed", &model, inputs, output, extra);
    let mut cmd = nightshift(Path::new(BIN));
    cmd.current_dir(t.f.dir.path())
        .arg("run")
        .arg(&spec)
        .arg("--state")
        .arg(t.f.path("state"));
    let mut child = ChildGuard::spawn_logged(cmd, &t.f.path("run.log"));
    // Killed once some parts are committed.
    let parts = t.out("killed").join("_parts");
    let deadline = Instant::now() + Duration::from_secs(120);
    while count_files(&parts) < 3 {
        assert!(
            child.try_wait().is_none(),
            "the run ended early: {}",
            std::fs::read_to_string(t.f.path("run.log")).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "no parts were committed");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill();
    assert!(
        !t.out("killed").join("_manifest.json").exists(),
        "the job finished before the kill"
    );
    let o = t.run(&spec);
    assert!(o.status.success(), "{}", text(&o));
    t.check(
        "killed",
        &model,
        &["--pool", "max", "--atol", "1e-4", "--sample", "3000"],
    );
}

/// Parquet files under `dir`, at any depth.
fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| e.path())
        .map(|p| match p.is_dir() {
            true => count_files(&p),
            false => usize::from(p.extension().is_some_and(|x| x == "parquet")),
        })
        .sum()
}

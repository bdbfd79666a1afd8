//! The bad-input catalogue for `nightshift run`: every case is refused with one message that
//! names the problem, exit code 1, no panic, and nothing queued or left behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nightshift_tests::fixtures::{Fixture, spec_toml};
use nightshift_tests::process::{nightshift, run};
use nightshift_tests::python::run_script;

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");

struct Case {
    name: &'static str,
    spec: String,
    args: Vec<String>,
    needles: Vec<String>,
}

/// Runs one case in its own state directory and checks the refusal.
fn refused(f: &Fixture, case: &Case) {
    let state = f.path(&format!("state-{}", case.name));
    let spec = f.spec(&format!("{}.toml", case.name), &case.spec);
    let mut cmd = nightshift(Path::new(BIN));
    cmd.current_dir(f.dir.path())
        .arg("run")
        .arg(&spec)
        .arg("--state")
        .arg(&state)
        .args(&case.args);
    let o = run(cmd, Duration::from_secs(120));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}: expected a refusal, got {:?}:\n{err}",
        case.name,
        o.status
    );
    assert!(!err.contains("panicked"), "{}: panicked:\n{err}", case.name);
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors.len(),
        1,
        "{}: want one error line:\n{err}",
        case.name
    );
    for n in &case.needles {
        assert!(
            err.contains(n.as_str()),
            "{}: `{n}` not in: {err}",
            case.name
        );
    }
    let db = state.join("nightshift.db");
    if db.exists() {
        let jobs = run_script(
            "query_sqlite.py",
            &[db.to_str().unwrap(), "SELECT COUNT(*) FROM jobs"],
        );
        assert_eq!(jobs.trim(), "[[0]]", "{}: a job was queued", case.name);
    }
    eprintln!("{:<24} {}", case.name, errors[0]);
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

#[test]
fn every_bad_input_is_refused_with_a_message_naming_it() {
    let f = Fixture::new();
    let data = f.data(
        "in",
        &["--rows", "2000", "--files", "2", "--row-group-rows", "500"],
    );
    let f64_data = f.data(
        "in64",
        &["--rows", "500", "--files", "1", "--dtype", "float64"],
    );
    let empty = f.data("empty", &["--rows", "0", "--files", "1"]);
    let model = f.model("m.onnx", &["--hidden", "16"]);
    let model16 = f.model("m16.onnx", &["--hidden", "16", "--dim", "16"]);
    let flat = f.model("flat.onnx", &["--hidden", "16", "--flat-input"]);
    let junk_model = f.path("junk.onnx");
    std::fs::write(&junk_model, b"this is not a model").unwrap();
    let not_parquet = f.path("text/notes.parquet");
    std::fs::create_dir_all(not_parquet.parent().unwrap()).unwrap();
    std::fs::write(&not_parquet, b"id,features\n1,2\n").unwrap();
    let truncated = f.path("trunc/part.parquet");
    std::fs::create_dir_all(truncated.parent().unwrap()).unwrap();
    let whole = std::fs::read(data.join("part-000.parquet")).unwrap();
    std::fs::write(&truncated, &whole[..whole.len() / 2]).unwrap();
    let file_as_out = f.path("out-is-a-file");
    std::fs::write(&file_as_out, b"x").unwrap();

    let input = format!("{}/*.parquet", data.display());
    let out = f.path("out");
    let good = spec_toml("good", &input, &model, &out, "");
    let with = |from: &str, to: &str| {
        assert!(good.contains(from), "{from}");
        good.replacen(from, to, 1)
    };
    let p = |p: &PathBuf| p.display().to_string();

    // A job that succeeds first, so its output counts as another job's committed output.
    let taken = f.path("taken");
    let first = f.spec(
        "first.toml",
        &spec_toml("first", &input, &model, &taken, ""),
    );
    let mut cmd = nightshift(Path::new(BIN));
    cmd.current_dir(f.dir.path())
        .arg("run")
        .arg(&first)
        .arg("--state")
        .arg(f.path("state-first"));
    assert!(run(cmd, Duration::from_secs(120)).status.success());

    let cases = vec![
        // Spec.
        Case {
            name: "unknown-key",
            spec: with("[output]", "[output]\ncolour = \"blue\""),
            args: vec![],
            needles: s(&["unknown field `colour`", "output.colour", "line 17"]),
        },
        Case {
            name: "missing-key",
            spec: with("[input]\n", "[input]\nuri_typo = \"x\"\n").replacen(
                &format!("uri = \"{input}\"\n"),
                "",
                1,
            ),
            args: vec![],
            needles: s(&["unknown field `uri_typo`"]),
        },
        Case {
            name: "missing-model-uri",
            spec: with(&format!("uri = \"{}\"\n", model.display()), ""),
            args: vec![],
            needles: s(&["missing field `uri`", "model.uri"]),
        },
        Case {
            name: "wrong-type",
            spec: with(
                "device = \"cpu\"",
                "device = \"cpu\"\n[batch]\nsize = \"big\"",
            ),
            args: vec![],
            needles: s(&["batch.size", "invalid type"]),
        },
        Case {
            name: "bad-name",
            spec: with("name = \"good\"", "name = \"bad name!\""),
            args: vec![],
            needles: s(&["`name`", "bad name!", "line 1"]),
        },
        Case {
            name: "batch-zero",
            spec: format!("{good}\n[batch]\nsize = 0\n"),
            args: vec![],
            needles: s(&["batch.size", "between 1 and"]),
        },
        Case {
            name: "batch-absurd",
            spec: format!("{good}\n[batch]\nsize = 1000000000\n"),
            args: vec![],
            needles: s(&["batch.size", "1000000000"]),
        },
        Case {
            name: "shards-zero",
            spec: format!("{good}\n[shards]\nrows = 0\n"),
            args: vec![],
            needles: s(&["shards.rows"]),
        },
        Case {
            name: "shards-absurd",
            spec: format!("{good}\n[shards]\nrows = 99999999999999\n"),
            args: vec![],
            needles: s(&["shards.rows", "99999999999999"]),
        },
        // Input.
        Case {
            name: "no-match",
            spec: with(&input, &format!("{}/*.csv", data.display())),
            args: vec![],
            needles: s(&["no input files match", "*.csv"]),
        },
        Case {
            name: "missing-input",
            spec: with(&input, &p(&f.path("nowhere"))),
            args: vec![],
            needles: s(&["does not exist", "nowhere"]),
        },
        Case {
            name: "not-parquet",
            spec: with(&input, &p(&not_parquet)),
            args: vec![],
            needles: s(&["not a Parquet file", "notes.parquet"]),
        },
        Case {
            name: "truncated",
            spec: with(&input, &p(&truncated)),
            args: vec![],
            needles: s(&["not a Parquet file", "trunc/part.parquet"]),
        },
        Case {
            name: "empty-input",
            spec: with(&input, &p(&empty)),
            args: vec![],
            needles: s(&["has no rows"]),
        },
        Case {
            name: "missing-column",
            spec: with("x = \"features\"", "x = \"feats\""),
            args: vec![],
            needles: s(&["`feats`", "`x`", "features"]),
        },
        Case {
            name: "wrong-column-type",
            spec: with(&input, &p(&f64_data)),
            args: vec![],
            needles: s(&["`features`", "`x`", "Float64", "float32"]),
        },
        Case {
            name: "wrong-list-length",
            spec: with(&p(&model), &p(&model16)),
            args: vec![],
            needles: s(&["`features`", "`x`", "wants 16", "hold 32"]),
        },
        Case {
            name: "rank-mismatch",
            spec: with(&p(&model), &p(&flat)),
            args: vec![],
            needles: s(&["`features`", "`x`", "one value per row", "lists"]),
        },
        Case {
            name: "missing-passthrough",
            spec: with(
                "passthrough = [\"id\"]",
                "passthrough = [\"id\", \"ghost\"]",
            ),
            args: vec![],
            needles: s(&["passthrough", "`ghost`"]),
        },
        // Model.
        Case {
            name: "missing-model",
            spec: with(&p(&model), &p(&f.path("gone.onnx"))),
            args: vec![],
            needles: s(&["gone.onnx", "does not exist"]),
        },
        Case {
            name: "not-onnx",
            spec: with(&p(&model), &p(&junk_model)),
            args: vec![],
            needles: s(&["junk.onnx"]),
        },
        Case {
            name: "unknown-model-input",
            spec: with("x = \"features\"", "z = \"features\""),
            args: vec![],
            needles: s(&["`z`", "`x`"]),
        },
        Case {
            name: "unknown-model-output",
            spec: with("logits = \"logits\"", "probs = \"p\""),
            args: vec![],
            needles: s(&["`probs`", "`logits`"]),
        },
        Case {
            name: "cuda-without-gpu",
            spec: with("device = \"cpu\"", "device = \"cuda\""),
            args: vec![],
            needles: s(&["device = \"cuda\"", "CUDA"]),
        },
        // Output.
        Case {
            name: "output-not-writable",
            spec: with(&p(&out), &p(&file_as_out)),
            args: vec![],
            needles: s(&["not writable", "out-is-a-file"]),
        },
        Case {
            name: "output-taken",
            spec: with(&p(&out), &p(&taken)),
            args: vec![],
            needles: s(&["already holds the committed output of job `first`"]),
        },
        // Runtime.
        Case {
            name: "missing-onnxruntime",
            spec: good.clone(),
            args: s(&["--ort-lib", "/nonexistent/libonnxruntime.so"]),
            needles: s(&["/nonexistent/libonnxruntime.so", "does not exist"]),
        },
    ];
    for case in &cases {
        refused(&f, case);
    }
    assert!(!out.exists(), "a refused job created its output directory");
}

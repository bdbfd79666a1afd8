//! GPU discovery and `--gpus` on a machine without CUDA (as CI is): the binary runs, finds no
//! GPU, runs `auto` models on the CPU, and refuses a GPU that is not there, naming it.

use std::path::Path;
use std::time::Duration;

use nightshift_tests::fixtures::Fixture;
use nightshift_tests::process::{nightshift, output_text, run};
use nightshift_tests::verify::verify_output;

const BIN: &str = env!("CARGO_BIN_EXE_nightshift");

fn nightshift_in(f: &Fixture, args: &[&str]) -> std::process::Output {
    let mut cmd = nightshift(Path::new(BIN));
    cmd.current_dir(f.dir.path()).args(args);
    run(cmd, Duration::from_secs(120))
}

#[test]
fn without_cuda_there_is_no_gpu_and_auto_runs_on_the_cpu() {
    let f = Fixture::new();
    let o = nightshift_in(&f, &["gpus", "--json"]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "[]");
    let o = nightshift_in(&f, &["gpus"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("no GPU found"));
    // The default, `--gpus all`, finds none: one local worker, the model on the CPU, and an
    // `auto` batch is the CPU's default size.
    let job = f.job(
        "no-gpu",
        &["--rows", "2000", "--files", "1", "--row-group-rows", "500"],
        &["--hidden", "16"],
        "[batch]\nsize = \"auto\"\n",
    );
    let toml = std::fs::read_to_string(&job.spec).unwrap();
    std::fs::write(
        &job.spec,
        toml.replace("device = \"cpu\"", "device = \"auto\""),
    )
    .unwrap();
    let spec = job.spec.display().to_string();
    let state = f.path("state").display().to_string();
    let o = nightshift_in(&f, &["run", &spec, "--state", &state]);
    assert!(o.status.success(), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("device cpu"),
        "{}",
        output_text(&o)
    );
    verify_output(job.out.to_str().unwrap(), &job.input, &job.model, 0, &[]).assert_exact(&[]);
}

#[test]
fn a_gpu_that_is_not_there_or_a_bad_list_is_refused_by_name() {
    let f = Fixture::new();
    let o = nightshift_in(
        &f,
        &[
            "worker",
            "--coordinator",
            "http://127.0.0.1:9",
            "--token",
            "t",
            "--gpus",
            "1",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("--gpus names GPU 1, but this machine has none"),
        "{}",
        output_text(&o)
    );
    let o = nightshift_in(&f, &["run", "job.toml", "--gpus", "0,0"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "clap refuses it: {}",
        output_text(&o)
    );
    assert!(
        output_text(&o).contains("`all`, `none`"),
        "{}",
        output_text(&o)
    );
    let o = nightshift_in(
        &f,
        &[
            "worker",
            "--coordinator",
            "http://127.0.0.1:9",
            "--model-cache",
            "0",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", output_text(&o));
    assert!(
        output_text(&o).contains("'0' for '--model-cache"),
        "{}",
        output_text(&o)
    );
}

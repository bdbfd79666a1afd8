//! The project's Python side (.venv from scripts/setup.sh): generators, the output verifier,
//! and ONNX Runtime's library.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `.venv` (or `NIGHTSHIFT_VENV`).
pub fn venv() -> PathBuf {
    std::env::var_os("NIGHTSHIFT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv"))
}

/// The venv's python; panics with the fix when it is missing.
pub fn python() -> PathBuf {
    let p = venv().join("bin/python");
    assert!(
        p.exists(),
        "{} not found: run scripts/setup.sh (or .ci/run) first",
        p.display()
    );
    p
}

/// libonnxruntime.so from the onnxruntime wheel in the venv.
pub fn ort_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return PathBuf::from(p);
    }
    let lib = venv().join("lib");
    for py in std::fs::read_dir(&lib).into_iter().flatten().flatten() {
        let capi = py.path().join("site-packages/onnxruntime/capi");
        for f in std::fs::read_dir(&capi).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with("libonnxruntime.so.") {
                return f.path();
            }
        }
    }
    panic!(
        "libonnxruntime.so not found under {}: run scripts/setup.sh",
        lib.display()
    );
}

/// Runs `scripts/<script>` with the venv's python; panics with its output if it fails.
pub fn run_script(script: &str, args: &[&str]) -> String {
    run_script_with(script, args, &[])
}

/// `run_script` with extra environment variables (e.g. the local S3 server's).
pub fn run_script_with(script: &str, args: &[&str], envs: &[(&str, String)]) -> String {
    let out = Command::new(python())
        .arg(root().join("scripts").join(script))
        .args(args)
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

//! The GPU bench on a machine without a GPU (CI): it says so and exits 0.

#[test]
fn without_a_gpu_the_gpu_bench_says_so_and_exits_0() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nightshift-bench"))
        .arg("gpu")
        .output()
        .expect("run the bench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("no GPU here"), "{text}");
}

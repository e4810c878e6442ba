//! Runs the loom model of the ring protocol (`src/ring.rs`, `loom_tests`) as
//! part of the ordinary test suite: loom needs the whole crate built with
//! `--cfg loom`, so this test builds and runs it in its own target directory.

use std::path::PathBuf;
use std::process::Command;

#[test]
fn ring_protocol_is_model_checked_with_loom() {
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
        .join("loom");
    let out = Command::new(env!("CARGO"))
        .current_dir(&workspace)
        .args([
            "test",
            "-p",
            "shm-ipc",
            "--lib",
            "--release",
            "--target-dir",
        ])
        .arg(&target)
        .args(["--", "loom_tests", "--nocapture"])
        .env("RUSTFLAGS", "--cfg loom")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .expect("run cargo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "loom run failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("spsc_with_parking_never_loses_a_message_or_a_wakeup ... ok"),
        "the loom model did not run:\n{stdout}"
    );
}

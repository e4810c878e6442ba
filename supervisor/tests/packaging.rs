//! The shipped unit file passes `systemd-analyze verify` (skipped where
//! systemd-analyze is missing).

use std::process::Command;

#[test]
fn unit_file_verifies() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed; skipping");
        return;
    }
    let unit = include_str!("../emberd.service");
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    let dir = std::env::temp_dir().join(format!("ember-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("emberd.service");
    // verify insists that ExecStart exists: point it at the built binary.
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/emberd", env!("CARGO_BIN_EXE_emberd")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

//! Runs the demo end to end in `--once` mode (real emberd, real control
//! socket, real workers) and checks what it prints.

use std::process::Command;

#[test]
fn demo_runs_once_and_shuts_down_cleanly() {
    let out = Command::new(env!("CARGO_BIN_EXE_ember-demo"))
        .args(["--once", "--port", "0", "--catalog-mb", "16"])
        .output()
        .expect("run ember-demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for name in ["kv", "greeter", "hello"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.trim_start().starts_with(name) && l.contains("running in")),
            "{name} not running:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("GET /kv/get/visitor        -> 200 ember"),
        "{stdout}"
    );
    assert!(stdout.contains("answered by the kv module"), "{stdout}");
    assert!(stdout.contains("cold start"), "{stdout}");
    assert!(stdout.contains("shutdown clean"), "{stdout}");
}

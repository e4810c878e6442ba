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
    // Step 5: the release and the rollback, under load.
    assert!(
        stdout.contains("[5/7] releasing greeter 0.2.0 while it answers requests"),
        "{stdout}"
    );
    let step5: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("[5/7]"))
        .take_while(|l| !l.starts_with("[6/7]"))
        .collect();
    let count = |pred: &dyn Fn(&str) -> bool| step5.iter().filter(|l| pred(l)).count();
    assert!(
        count(&|l| l.contains("ms  progressing: new ")) >= 2,
        "no progress replies for Deploy and Rollback:\n{stdout}"
    );
    assert_eq!(
        count(&|l| l.trim_end().ends_with("ms  completed")),
        2,
        "Deploy and Rollback must both complete:\n{stdout}"
    );
    assert!(
        step5.iter().any(|l| l.contains("released 0.2.0 in")),
        "{stdout}"
    );
    assert!(
        step5.iter().any(|l| l.contains("rolled back to 0.1.0 in")),
        "{stdout}"
    );
    for what in ["the release", "the rollback"] {
        let line = step5
            .iter()
            .find(|l| l.contains(&format!("requests during {what}, 0 failed")))
            .unwrap_or_else(|| panic!("no load line for {what} with 0 failed:\n{stdout}"));
        let n: u64 = line.split_whitespace().next().unwrap().parse().unwrap();
        assert!(n > 0, "no request during {what}:\n{stdout}");
        assert!(line.contains(" 0 failed"), "{line}");
    }
    // /version switched to 0.2.0, then back to 0.1.0, on every answer.
    let versions: Vec<&&str> = step5
        .iter()
        .filter(|l| l.contains("GET /version"))
        .collect();
    assert_eq!(versions.len(), 2, "{stdout}");
    assert!(
        versions[0].contains("-> 200 0.2.0 greeter@0.2.0#")
            && versions[0].contains("4 of 4 answers on new connections are 0.2.0"),
        "{stdout}"
    );
    assert!(
        versions[1].contains("-> 200 0.1.0 greeter@0.1.0#")
            && versions[1].contains("4 of 4 answers on new connections are 0.1.0"),
        "{stdout}"
    );
    assert!(
        step5
            .iter()
            .any(|l| l.contains("GET /hello/visitor -> 200 hi, visitor!")),
        "0.2.0 greets with its own greeting:\n{stdout}"
    );
    assert!(stdout.contains("cold start"), "{stdout}");
    assert!(stdout.contains("shutdown clean"), "{stdout}");
}

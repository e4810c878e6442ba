//! A malicious module cannot break a shared exporter: `fixture-scribbler`,
//! installed through the real emberd, imports `kv` and scribbles on its own
//! channel's shared memory (indices, lengths, ids, payloads, the header,
//! doorbell bytes; first values a correct client could write, then
//! anything) while `greeter`, a well-behaved importer of the same `kv`,
//! keeps calling it. Every call of the greeter succeeds, during the attack
//! and after; `kv` keeps running in the same process (no restart), drops
//! the attacker's channel once it is corrupt, and the attacker's own calls
//! only ever fail.

use std::time::Duration;

use ember_tests::daemon::*;
use ember_tests::poll_until;
use serde_json::{json, Value};

fn logs(d: &Daemon, name: &str) -> String {
    String::from_utf8_lossy(&d.ctl(&["logs", name, "-n", "100000"]).stdout).into_owned()
}

fn running(s: &Value) -> bool {
    s["state"] == "running"
}

fn wired(s: &Value) -> bool {
    running(s)
        && s["imports"]
            == json!([{"name": "kv", "version": 1, "state": "wired", "exporter": "kv", "reason": null}])
}

#[test]
fn a_module_scribbling_on_its_channel_breaks_neither_the_exporter_nor_its_other_clients() {
    let d = Daemon::start(FAST);
    let kv = real_module(
        d.dir.path(),
        "kv",
        "kv",
        "[[exports]]\nname = \"kv\"\n[limits]\nstart_deadline = \"2s\"\nstop_deadline = \"2s\"\n",
    );
    d.ctl_ok(&["install", kv.to_str().unwrap()]);
    let port = install_on_free_port(&d, "greeter", "greeter", "[[imports]]\nname = \"kv\"\n");
    let kv_before = d.wait_status("kv", "kv running", running);
    d.wait_status("greeter", "greeter wired to kv", wired);
    assert_eq!(http_get(port, "/kv/put/before/1"), (200, "ok".into()));

    let attacker = real_module(
        d.dir.path(),
        "scribbler",
        "fixture-scribbler",
        "[[imports]]\nname = \"kv\"\n[limits]\nstart_deadline = \"2s\"\nstop_deadline = \"1s\"\n[config]\nplausible_ms = 1500\npause_us = 200\n",
    );
    d.ctl_ok(&["install", attacker.to_str().unwrap()]);
    d.wait_status("scribbler", "the attacker wired to kv", wired);

    // The good importer calls all along, until the attacker has been seen
    // scribbling and then dropped by the exporter.
    let mut calls = 0u32;
    let (kv_log, attacker_log) = poll_until("kv to drop the attacker", Duration::ZERO, || {
        for _ in 0..10 {
            let key = format!("k{calls}");
            let put = http_get(port, &format!("/kv/put/{key}/v{calls}"));
            assert_eq!(put, (200, "ok".into()), "put #{calls} during the attack");
            let get = http_get(port, &format!("/kv/get/{key}"));
            assert_eq!(
                get,
                (200, format!("v{calls}")),
                "get #{calls} during the attack"
            );
            calls += 1;
        }
        let (kv_log, attacker_log) = (logs(&d, "kv"), logs(&d, "scribbler"));
        let dropped = kv_log.contains("client left: Misbehaved")
            && attacker_log.contains("dropped by the exporter");
        if dropped && calls >= 100 {
            Ok((kv_log, attacker_log))
        } else {
            Err(format!(
                "{calls} calls; kv log:\n{kv_log}\nattacker log:\n{attacker_log}"
            ))
        }
    });
    // And after it.
    for i in 0..20 {
        assert_eq!(
            http_get(port, &format!("/kv/put/after{i}/x")),
            (200, "ok".into())
        );
    }
    assert_eq!(http_get(port, "/kv/get/before"), (200, "1".into()));
    assert_eq!(http_get(port, "/kv/get/k0"), (200, "v0".into()));

    // The exporter is the same process, never restarted, not failed.
    let kv_after = d.ctl_json(&["status", "kv"])["status"].clone();
    assert!(running(&kv_after), "{kv_after}");
    assert_eq!(kv_after["pid"], kv_before["pid"], "{kv_after}");
    assert_eq!(kv_after["restarts"], 0, "{kv_after}");
    assert!(kv_after["last_error"].is_null(), "{kv_after}");

    // What each side saw, for the record.
    let dropped: Vec<&str> = kv_log
        .lines()
        .filter(|l| l.contains("client left"))
        .collect();
    let reports: Vec<&str> = attacker_log
        .lines()
        .filter(|l| l.contains("scribbler:"))
        .collect();
    eprintln!(
        "{} good calls; kv:\n{}\nattacker:\n{}",
        2 * calls + 22,
        dropped.join("\n"),
        reports.join("\n")
    );
    // The attacker got nothing but errors from its calls, and it did call
    // (else "0 ok" would hold by construction) and scribble.
    let last = reports
        .iter()
        .rev()
        .find(|l| l.contains(" calls: "))
        .expect("the attacker reports its calls");
    let counts = ScribblerCounts::parse(last);
    assert_eq!(counts.ok, 0, "{last}");
    assert!(counts.failed > 0, "no call attempted: {last}");
    assert!(counts.scribbles > 0, "no scribble: {last}");

    d.ctl_ok(&["uninstall", "scribbler"]);
    assert_eq!(http_get(port, "/kv/get/after0"), (200, "x".into()));
}

/// The counts of the scribbler's report line: `scribbler: N scribbles, M
/// doorbell rings; calls: A ok, B remote errors, C corrupt, D timed out, E
/// peer gone, F other; channel …`.
#[derive(Debug)]
struct ScribblerCounts {
    scribbles: u64,
    /// Calls that succeeded.
    ok: u64,
    /// Calls that failed, whatever the reason.
    failed: u64,
}

impl ScribblerCounts {
    fn parse(line: &str) -> Self {
        // The number before `label` in `text`.
        let count = |text: &str, label: &str| -> u64 {
            let end = text
                .find(label)
                .unwrap_or_else(|| panic!("no `{label}` in {line}"));
            text[..end]
                .trim_end()
                .rsplit([' ', ','])
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no count before `{label}` in {line}"))
        };
        let (head, calls) = line
            .split_once("calls: ")
            .unwrap_or_else(|| panic!("no calls in {line}"));
        let calls = calls.split(';').next().unwrap_or_default();
        Self {
            scribbles: count(head, " scribbles"),
            ok: count(calls, " ok"),
            failed: [
                " remote errors",
                " corrupt",
                " timed out",
                " peer gone",
                " other",
            ]
            .iter()
            .map(|l| count(calls, l))
            .sum(),
        }
    }
}

#[test]
fn the_scribblers_report_line_parses() {
    let c = ScribblerCounts::parse(
        "INFO scribbler: 1200 scribbles, 31 doorbell rings; calls: 0 ok, 4 remote errors, \
         2 corrupt, 0 timed out, 1 peer gone, 0 other; channel dropped by the exporter",
    );
    assert_eq!((c.scribbles, c.ok, c.failed), (1200, 0, 7));
}

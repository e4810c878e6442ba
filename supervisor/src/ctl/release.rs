//! Releases: `deploy`, `rollback`, `history`, `rollout`, and how revisions
//! and rollouts read in `list` and `status`.
//!
//! The verbs are thin: each makes one call (or one call with `more`) and
//! hands the replies to the pure renderers below, which take the replies'
//! JSON as it comes and are unit tested on it.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::client::{Client, CtlError};
use super::commands::{absolute_existing, method};
use super::output::{cell, fields, table, Printer};
use super::{DeployOptions, RolloutAction};

/// `deploy PATH`.
pub(super) fn deploy(
    c: &mut Client,
    out: &mut Printer,
    path: &Path,
    opts: &DeployOptions,
    json_out: bool,
) -> Result<(), CtlError> {
    let abs = absolute_existing(path)?;
    let entry = super::commands::pick_entry(&abs, out, json_out)?;
    let mut params = deploy_params(&abs.to_string_lossy(), opts)?;
    if let Some(e) = entry {
        params["entry"] = e.to_string_lossy().into();
    }
    release(c, out, "Deploy", params, opts.wait, json_out)
}

/// `rollback NAME [--to REV]`.
pub(super) fn rollback(
    c: &mut Client,
    out: &mut Printer,
    name: &str,
    to: Option<u64>,
    wait: bool,
    json_out: bool,
) -> Result<(), CtlError> {
    release(
        c,
        out,
        "Rollback",
        rollback_params(name, to),
        wait,
        json_out,
    )
}

/// `history NAME`.
pub(super) fn history(
    c: &mut Client,
    out: &mut Printer,
    name: &str,
    json_out: bool,
) -> Result<(), CtlError> {
    let v = c.call(&method("History"), json!({ "name": name }))?;
    if json_out {
        return out.json(&v);
    }
    out.print(&history_table(&v))
}

/// `rollout pause|resume|abort NAME`.
pub(super) fn rollout(
    c: &mut Client,
    out: &mut Printer,
    action: &RolloutAction,
    json_out: bool,
) -> Result<(), CtlError> {
    let v = c.call(
        &method("Rollout"),
        json!({ "name": action.name(), "action": action.as_str() }),
    )?;
    if json_out {
        return out.json(&v);
    }
    out.line(&rollout_state(&v["module"]))
}

/// The parameters of `Deploy`: the optional ones only when given (the
/// manifest's `[rollout]` section is the default).
pub(super) fn deploy_params(path: &str, opts: &DeployOptions) -> Result<Value, CtlError> {
    if opts.max_surge == Some(0) && opts.max_unavailable == Some(0) {
        return Err(CtlError::Input(
            "--max-surge and --max-unavailable cannot both be 0: the rollout could not move".into(),
        ));
    }
    let mut p = Map::new();
    p.insert("path".into(), path.into());
    if let Some(s) = opts.strategy {
        p.insert("strategy".into(), s.as_str().into());
    }
    for (k, v) in [
        ("max_surge", opts.max_surge),
        ("max_unavailable", opts.max_unavailable),
        ("pause_after", opts.pause_after),
    ] {
        if let Some(n) = v {
            p.insert(k.into(), n.into());
        }
    }
    Ok(Value::Object(p))
}

/// The parameters of `Rollback`: `to` only when given (the daemon's default
/// is the revision before the active one).
pub(super) fn rollback_params(name: &str, to: Option<u64>) -> Value {
    match to {
        Some(to) => json!({ "name": name, "to": to }),
        None => json!({ "name": name }),
    }
}

/// `Deploy` or `Rollback`: one reply, or (`wait`) with `more`, a line per
/// change of the rollout, then the outcome.
fn release(
    c: &mut Client,
    out: &mut Printer,
    verb: &str,
    params: Value,
    wait: bool,
    json_out: bool,
) -> Result<(), CtlError> {
    if !wait {
        let v = c.call(&method(verb), params)?;
        if json_out {
            out.json(&v)?;
        }
        let line = outcome(&v, None).map_err(CtlError::Rollout)?;
        return if json_out { Ok(()) } else { out.line(&line) };
    }
    // The last rollout seen: the final reply's summary no longer has it
    // once the rollout is over, but its version names the target.
    let mut seen = Value::Null;
    let mut last_line = String::new();
    let mut last = Value::Null;
    c.call_more(&method(verb), params, |v, continues| {
        if json_out {
            out.line(&v.to_string())?;
        }
        let m = &v["module"];
        if !m["rollout"].is_null() {
            seen = m["rollout"].clone();
        }
        if !continues {
            last = v;
            return Ok(());
        }
        let line = progress_line(m);
        if !json_out && line != last_line {
            out.line(&line)?;
        }
        last_line = line;
        Ok(())
    })?;
    let line = outcome(&last, Some(&seen).filter(|s| !s.is_null())).map_err(CtlError::Rollout)?;
    if json_out {
        Ok(())
    } else {
        out.line(&line)
    }
}

/// `revision 3 (0.2.0)`, the version when it is known.
fn revision_label(rev: &Value, version: Option<&str>) -> String {
    match version {
        Some(v) => format!("revision {} ({v})", cell(rev)),
        None => format!("revision {}", cell(rev)),
    }
}

/// The version of the reply's target revision: from its rollout (the one
/// in the reply, else the last one seen), else the module's own when the
/// target is the active revision.
fn target_version<'a>(reply: &'a Value, seen: Option<&'a Value>) -> Option<&'a str> {
    let rev = &reply["revision"];
    let m = &reply["module"];
    [Some(&m["rollout"]), seen]
        .into_iter()
        .flatten()
        .find(|r| !r.is_null() && (rev.is_null() || r["revision"] == *rev))
        .and_then(|r| r["version"].as_str())
        .or_else(|| {
            (rev.is_null() || m["revision"] == *rev)
                .then(|| m["version"].as_str())
                .flatten()
        })
}

/// The final reply of `Deploy`/`Rollback` as a line (success: `installed`,
/// `unchanged`, `started`, `completed`) or as the failure's message
/// (`aborted`, `rolled-back`, with the reason). `seen`: the last rollout a
/// `more` reply carried.
pub(super) fn outcome(reply: &Value, seen: Option<&Value>) -> Result<String, String> {
    let m = &reply["module"];
    let name = cell(&m["name"]);
    let rev = if reply["revision"].is_null() {
        &m["revision"]
    } else {
        &reply["revision"]
    };
    let outcome = reply["outcome"].as_str().unwrap_or("");
    let target = revision_label(rev, target_version(reply, seen));
    let reason = reply["reason"]
        .as_str()
        .or_else(|| seen.and_then(|s| s["reason"].as_str()))
        .unwrap_or("no reason given");
    match outcome {
        "installed" => Ok(format!(
            "installed {name} {} (revision {})",
            cell(&m["version"]),
            cell(rev)
        )),
        "unchanged" => Ok(format!(
            "{name}: unchanged (revision {} is already active)",
            cell(rev)
        )),
        "started" => {
            let strategy = [Some(&m["rollout"]), seen]
                .into_iter()
                .flatten()
                .find_map(|r| r["strategy"].as_str())
                .map(|s| format!(" ({s})"))
                .unwrap_or_default();
            Ok(format!("{name}: {target} rolling out{strategy}"))
        }
        "completed" => Ok(format!("{name}: rollout of {target} completed")),
        "aborted" => Err(format!(
            "{name}: rollout of {target} aborted: {reason}; revision {} is still active",
            cell(&m["revision"])
        )),
        "rolled-back" => Err(format!(
            "{name}: {target} rolled back: {reason}; revision {} is active again",
            cell(&m["revision"])
        )),
        _ => Ok(format!("{name}: {target}: {}", cell(&reply["outcome"]))),
    }
}

/// `new 4/8 ready, old 8`: a rollout's replica counts.
fn counts(r: &Value) -> String {
    format!(
        "new {}/{} ready, old {}",
        cell(&r["new_ready"]),
        cell(&r["new_replicas"]),
        cell(&r["old_replicas"])
    )
}

/// One line per change of a `more` reply's module summary:
/// `greeter: revision 3 progressing: new 4/8 ready, old 8`, or (no rollout:
/// a first install starting) `greeter: starting pid 123`.
pub(super) fn progress_line(m: &Value) -> String {
    let name = cell(&m["name"]);
    let r = &m["rollout"];
    if r.is_null() {
        let pids = match m["pids"].as_array() {
            Some(p) if !p.is_empty() => format!(" pid {}", cell(&m["pids"])),
            _ => String::new(),
        };
        return format!("{name}: {}{pids}", cell(&m["state"]));
    }
    let phase = cell(&r["phase"]);
    let mut line = format!(
        "{name}: revision {} {phase}: {}",
        cell(&r["revision"]),
        counts(r)
    );
    if let Some(reason) = r["reason"].as_str() {
        line.push_str(&format!(" ({reason})"));
    }
    if phase == "paused" {
        line.push_str(&format!("; resume with `emberctl rollout resume {name}`"));
    }
    line
}

/// `list`'s note on a rollout in progress: `→ rev 3 (progressing, new 2/8,
/// old 8)`; empty without one.
pub(super) fn rollout_note(r: &Value) -> String {
    if r.is_null() {
        return String::new();
    }
    format!(
        "→ rev {} ({}, new {}/{}, old {})",
        cell(&r["revision"]),
        cell(&r["phase"]),
        cell(&r["new_ready"]),
        cell(&r["new_replicas"]),
        cell(&r["old_replicas"])
    )
}

/// `status`'s rollout block.
pub(super) fn rollout_fields(r: &Value) -> String {
    let limits = match r["strategy"].as_str() {
        Some("rolling") => format!(
            " (max surge {}, max unavailable {})",
            cell(&r["max_surge"]),
            cell(&r["max_unavailable"])
        ),
        _ => String::new(),
    };
    let mut pairs = vec![
        (
            "target",
            format!(
                "{}, from revision {}",
                revision_label(&r["revision"], r["version"].as_str()),
                cell(&r["from_revision"])
            ),
        ),
        ("strategy", format!("{}{limits}", cell(&r["strategy"]))),
        (
            "phase",
            format!(
                "{} ({:.0}s since the rollout began)",
                cell(&r["phase"]),
                r["seconds"].as_f64().unwrap_or(0.0)
            ),
        ),
        (
            "replicas",
            format!(
                "old {}, new {} ({} ready)",
                cell(&r["old_replicas"]),
                cell(&r["new_replicas"]),
                cell(&r["new_ready"])
            ),
        ),
    ];
    if let Some(n) = r["pause_after"].as_u64() {
        let s = if n == 1 { "" } else { "s" };
        pairs.push(("pause after", format!("{n} new replica{s} ready")));
    }
    if !r["reason"].is_null() {
        pairs.push(("reason", cell(&r["reason"])));
    }
    fields(&pairs)
}

/// After `rollout pause|resume|abort`: the module's rollout, or (an abort
/// ends it) the revision that is active.
pub(super) fn rollout_state(m: &Value) -> String {
    if m["rollout"].is_null() {
        format!(
            "{}: the rollout has ended; {} is active",
            cell(&m["name"]),
            revision_label(&m["revision"], m["version"].as_str())
        )
    } else {
        progress_line(m)
    }
}

/// `history`'s table, newest first.
pub(super) fn history_table(v: &Value) -> String {
    let mut revs: Vec<&Value> = v["revisions"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default();
    // The daemon sends them newest first already; a stable sort keeps its
    // order among equals and does not depend on it.
    revs.sort_by_key(|r| std::cmp::Reverse(r["revision"].as_u64().unwrap_or(0)));
    let rows: Vec<Vec<String>> = revs
        .iter()
        .map(|r| {
            let sha = cell(&r["artifact_sha256"]);
            let outcome = match r["reason"].as_str() {
                Some(why) => format!("{}: {why}", cell(&r["outcome"])),
                None => cell(&r["outcome"]),
            };
            vec![
                cell(&r["revision"]),
                cell(&r["version"]),
                sha.chars().take(12).collect(),
                cell(&r["deployed_at"]),
                outcome,
            ]
        })
        .collect();
    table(&["REV", "VERSION", "SHA256", "DEPLOYED", "OUTCOME"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctl::Strategy;

    fn rollout(phase: &str) -> Value {
        json!({
            "revision": 3, "from_revision": 2, "version": "0.2.0",
            "strategy": "surge", "max_surge": 8, "max_unavailable": 0,
            "pause_after": null, "phase": phase, "old_replicas": 8,
            "new_replicas": 8, "new_ready": 4, "reason": null, "seconds": 3.5
        })
    }

    fn module(revision: u64, version: &str, rollout: Value) -> Value {
        json!({
            "name": "greeter", "version": version, "state": "running",
            "pid": 10, "pids": [10, 11], "replicas": 8, "restarts": 0,
            "revision": revision, "rollout": rollout
        })
    }

    fn opts() -> DeployOptions {
        DeployOptions {
            wait: false,
            strategy: None,
            max_surge: None,
            max_unavailable: None,
            pause_after: None,
        }
    }

    #[test]
    fn deploy_params_send_only_what_is_given() {
        assert_eq!(
            deploy_params("/m", &opts()).unwrap(),
            json!({ "path": "/m" })
        );
        let o = DeployOptions {
            strategy: Some(Strategy::Rolling),
            max_surge: Some(2),
            max_unavailable: Some(1),
            pause_after: Some(4),
            ..opts()
        };
        assert_eq!(
            deploy_params("/m", &o).unwrap(),
            json!({ "path": "/m", "strategy": "rolling", "max_surge": 2,
                    "max_unavailable": 1, "pause_after": 4 })
        );
        let stuck = DeployOptions {
            max_surge: Some(0),
            max_unavailable: Some(0),
            ..opts()
        };
        let e = deploy_params("/m", &stuck).unwrap_err();
        assert_eq!(e.exit_code(), crate::ctl::ExitCode::InvalidInput);
        assert_eq!(rollback_params("g", None), json!({ "name": "g" }));
        assert_eq!(
            rollback_params("g", Some(1)),
            json!({ "name": "g", "to": 1 })
        );
    }

    #[test]
    fn outcome_without_wait() {
        let started = json!({
            "module": module(2, "0.1.0", rollout("progressing")),
            "revision": 3, "changed": true, "outcome": "started"
        });
        assert_eq!(
            outcome(&started, None).unwrap(),
            "greeter: revision 3 (0.2.0) rolling out (surge)"
        );
        let unchanged = json!({
            "module": module(2, "0.1.0", Value::Null),
            "revision": 2, "changed": false, "outcome": "unchanged"
        });
        assert_eq!(
            outcome(&unchanged, None).unwrap(),
            "greeter: unchanged (revision 2 is already active)"
        );
        let installed = json!({
            "module": module(1, "0.1.0", Value::Null),
            "revision": 1, "changed": true, "outcome": "installed"
        });
        assert_eq!(
            outcome(&installed, None).unwrap(),
            "installed greeter 0.1.0 (revision 1)"
        );
        // A rollout already over when the reply was sent: no strategy.
        let bare = json!({
            "module": module(2, "0.1.0", Value::Null),
            "revision": 3, "changed": true, "outcome": "started"
        });
        assert_eq!(
            outcome(&bare, None).unwrap(),
            "greeter: revision 3 rolling out"
        );
    }

    #[test]
    fn outcome_after_wait() {
        let seen = rollout("stabilizing");
        let completed = json!({
            "module": module(3, "0.2.0", Value::Null),
            "revision": 3, "changed": true, "outcome": "completed"
        });
        assert_eq!(
            outcome(&completed, Some(&seen)).unwrap(),
            "greeter: rollout of revision 3 (0.2.0) completed"
        );
        let aborted = json!({
            "module": module(2, "0.1.0", Value::Null),
            "revision": 3, "changed": true, "outcome": "aborted",
            "reason": "replica 0 failed to start: init returned an error"
        });
        assert_eq!(
            outcome(&aborted, Some(&seen)).unwrap_err(),
            "greeter: rollout of revision 3 (0.2.0) aborted: replica 0 failed to start: \
             init returned an error; revision 2 is still active"
        );
        // Without the rollout seen, the version of revision 3 is unknown
        // (the module's is revision 2's).
        let rolled_back = json!({
            "module": module(2, "0.1.0", Value::Null),
            "revision": 3, "changed": true, "outcome": "rolled-back"
        });
        assert_eq!(
            outcome(&rolled_back, None).unwrap_err(),
            "greeter: revision 3 rolled back: no reason given; revision 2 is active again"
        );
    }

    #[test]
    fn progress_lines() {
        assert_eq!(
            progress_line(&module(2, "0.1.0", rollout("progressing"))),
            "greeter: revision 3 progressing: new 4/8 ready, old 8"
        );
        assert_eq!(
            progress_line(&module(2, "0.1.0", rollout("paused"))),
            "greeter: revision 3 paused: new 4/8 ready, old 8; \
             resume with `emberctl rollout resume greeter`"
        );
        let mut back = rollout("rolling-back");
        back["reason"] = "replica 2 crashed (signal 11)".into();
        assert_eq!(
            progress_line(&module(2, "0.1.0", back)),
            "greeter: revision 3 rolling-back: new 4/8 ready, old 8 \
             (replica 2 crashed (signal 11))"
        );
        let mut starting = module(1, "0.1.0", Value::Null);
        starting["state"] = "starting".into();
        assert_eq!(progress_line(&starting), "greeter: starting pid 10,11");
        starting["pids"] = json!([]);
        assert_eq!(progress_line(&starting), "greeter: starting");
    }

    #[test]
    fn list_note_and_rollout_state() {
        let mut r = rollout("progressing");
        r["new_ready"] = 2.into();
        assert_eq!(rollout_note(&r), "→ rev 3 (progressing, new 2/8, old 8)");
        assert_eq!(rollout_note(&Value::Null), "");
        assert_eq!(
            rollout_state(&module(2, "0.1.0", Value::Null)),
            "greeter: the rollout has ended; revision 2 (0.1.0) is active"
        );
        assert_eq!(
            rollout_state(&module(2, "0.1.0", rollout("paused"))),
            progress_line(&module(2, "0.1.0", rollout("paused")))
        );
    }

    #[test]
    fn status_rollout_block() {
        let mut r = rollout("paused");
        r["strategy"] = "rolling".into();
        r["max_surge"] = 1.into();
        r["pause_after"] = 4.into();
        r["reason"] = "paused by request".into();
        assert_eq!(
            rollout_fields(&r),
            "     target: revision 3 (0.2.0), from revision 2\n\
            \x20  strategy: rolling (max surge 1, max unavailable 0)\n\
            \x20     phase: paused (4s since the rollout began)\n\
            \x20  replicas: old 8, new 8 (4 ready)\n\
             pause after: 4 new replicas ready\n\
            \x20    reason: paused by request\n"
        );
        // Surge: the batch limits do not apply, no pause, no reason.
        let block = rollout_fields(&rollout("draining"));
        assert!(block.contains("strategy: surge\n"), "{block}");
        assert!(!block.contains("pause after"), "{block}");
        assert!(!block.contains("reason"), "{block}");
    }

    #[test]
    fn history_newest_first() {
        let v = json!({ "revisions": [
            { "revision": 2, "version": "0.1.1",
              "artifact_sha256": "0123456789abcdef0123", "deployed_at": "2026-12-05T16:00:00Z",
              "outcome": "active", "reason": null },
            { "revision": 3, "version": "0.2.0",
              "artifact_sha256": "fedcba9876543210fedc", "deployed_at": "2026-12-05T17:00:00Z",
              "outcome": "aborted", "reason": "aborted by request" },
            { "revision": 1, "version": "0.1.0",
              "artifact_sha256": "aaaaaaaaaaaaaaaaaaaa", "deployed_at": "2026-12-05T15:00:00Z",
              "outcome": "superseded" }
        ]});
        assert_eq!(
            history_table(&v),
            "REV  VERSION  SHA256        DEPLOYED              OUTCOME\n\
             3    0.2.0    fedcba987654  2026-12-05T17:00:00Z  aborted: aborted by request\n\
             2    0.1.1    0123456789ab  2026-12-05T16:00:00Z  active\n\
             1    0.1.0    aaaaaaaaaaaa  2026-12-05T15:00:00Z  superseded\n"
        );
        assert_eq!(
            history_table(&json!({ "revisions": [] })),
            "REV  VERSION  SHA256  DEPLOYED  OUTCOME\n"
        );
    }
}

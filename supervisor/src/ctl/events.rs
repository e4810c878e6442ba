//! `events`, the `status` table of every module, and `--watch`: views fed
//! by emberd's event stream (Varlink `Events` with `more`).

use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use super::client::{Client, CtlError};
use super::commands::{json_text, method};
use super::output::{bytes, cell, table, Printer};
use crate::control::errors;

/// How long `--watch` waits for the rest of a burst of events (an install:
/// its start, its pool refill) before it redraws once for all of them.
const COALESCE: Duration = Duration::from_millis(100);

/// The longest a burst is waited out: a module crash-looping faster than
/// [`COALESCE`] still gets its view redrawn this often.
const COALESCE_MAX: Duration = Duration::from_secs(1);

/// ANSI: cursor home, clear the screen.
const CLEAR: &str = "\x1b[H\x1b[2J";

/// `events [NAME]`: one line (or JSON object) per event, as they happen,
/// until interrupted, stdout closes, or emberd drops this reader.
pub(super) fn follow(
    c: &mut Client,
    out: &mut Printer,
    name: Option<&str>,
    json_out: bool,
) -> Result<(), CtlError> {
    c.start_more(&method("Events"), json!({ "name": name }))?;
    loop {
        let Some(v) = c.next_more(None)? else {
            continue;
        };
        let Some(ev) = v.get("event") else {
            continue;
        };
        if json_out {
            out.line(&ev.to_string())?;
        } else {
            out.line(&event_line(ev))?;
        }
        if out.closed() {
            return Err(CtlError::StdoutClosed);
        }
    }
}

/// `2026-12-05T21:00:00.123Z #42 greeter r0 rev 3 running -> backoff pid
/// 4242: worker killed by signal 9`: one event as `events` prints it.
pub(super) fn event_line(e: &Value) -> String {
    let s = |k: &str| cell(&e[k]);
    let head = format!("{} #{}", s("time"), s("seq"));
    let why = |text: String| match e["reason"].as_str() {
        Some(r) => format!("{text}: {r}"),
        None => text,
    };
    let pid = match e["pid"].as_i64() {
        Some(p) => format!(" pid {p}"),
        None => String::new(),
    };
    let body = match e["kind"].as_str() {
        Some("state") => why(format!(
            "{} r{} rev {} {} -> {}{pid}",
            s("module"),
            s("replica"),
            s("revision"),
            s("from"),
            s("to")
        )),
        Some("installed") => format!(
            "{} installed {} rev {}",
            s("module"),
            s("version"),
            s("revision")
        ),
        Some("uninstalled") => format!("{} uninstalled", s("module")),
        Some("rollout") => why(format!(
            "{} rollout rev {} -> {} {}",
            s("module"),
            s("from_revision"),
            s("revision"),
            s("step")
        )),
        Some("pool") => format!("pool {}{pid}", s("what")),
        Some("zygote") => format!("zygote {}{pid}", s("what")),
        _ => e.to_string(),
    };
    format!("{head} {body}")
}

/// `status` without a name: every module's `Status` as one table (with
/// `--json`: `{"modules": [status…]}`). With `watch` the table leaves out
/// CPU, PSS and uptime: they change without an event, and a watch redraws
/// only on events.
pub(super) fn status_table(
    c: &mut Client,
    json_out: bool,
    watch: bool,
) -> Result<String, CtlError> {
    let list = c.call(&method("List"), json!({}))?;
    let mut statuses = Vec::new();
    for m in list["modules"].as_array().into_iter().flatten() {
        match c.call(&method("Status"), json!({ "name": m["name"] })) {
            Ok(v) => statuses.push((m.clone(), v["status"].clone())),
            // Uninstalled since the list: not shown.
            Err(CtlError::Remote { name, .. }) if name == errors::MODULE_NOT_FOUND => {}
            Err(e) => return Err(e),
        }
    }
    if json_out {
        let all: Vec<&Value> = statuses.iter().map(|(_, s)| s).collect();
        return Ok(json_text(&json!({ "modules": all })));
    }
    Ok(status_rows(&statuses, !watch))
}

/// The table of [`status_table`] from each module's `List` summary and
/// `Status`; CPU, PSS and uptime only with `volatile`.
fn status_rows(statuses: &[(Value, Value)], volatile: bool) -> String {
    let rows: Vec<Vec<String>> = statuses
        .iter()
        .map(|(m, s)| {
            let replicas = s["replicas"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            let ready = replicas.iter().filter(|r| r["state"] == "running").count();
            let pids = match m["pids"].as_array() {
                Some(p) if !p.is_empty() => cell(&m["pids"]),
                _ => "-".into(),
            };
            let cpu = s["cpu_seconds"]
                .as_f64()
                .map_or("-".into(), |c| format!("{c:.2}s"));
            let mem = match &s["memory"] {
                Value::Null => "-".into(),
                m => bytes(&m["pss"]),
            };
            let uptime = match (s["state"].as_str(), s["state_seconds"].as_f64()) {
                (Some("running"), Some(secs)) => duration(secs),
                _ => "-".into(),
            };
            let mut row = vec![
                cell(&s["name"]),
                cell(&s["version"]),
                cell(&s["revision"]),
                cell(&s["state"]),
                format!("{ready}/{}", cell(&m["replicas"])),
                cell(&s["restarts"]),
                pids,
            ];
            if volatile {
                row.extend([cpu, mem, uptime]);
            }
            row
        })
        .collect();
    let mut header = vec![
        "NAME", "VERSION", "REV", "STATE", "READY", "RESTARTS", "PIDS",
    ];
    if volatile {
        header.extend(["CPU", "PSS", "UPTIME"]);
    }
    table(&header, &rows)
}

/// `42s`, `3m12s`, `2h03m`, `1d02h`.
fn duration(secs: f64) -> String {
    let s = secs.max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86_400, s / 3600 % 24),
    }
}

/// Prints what `render` gives; with `watch`, again each time it changes,
/// re-rendered after each burst of events about `name` (all events if
/// `None`) on a second connection: on a terminal the screen is cleared
/// first, otherwise a `---` line separates the drawings. Runs until
/// interrupted or stdout closes.
pub(super) fn view(
    socket: &Path,
    c: &mut Client,
    out: &mut Printer,
    watch: bool,
    name: Option<&str>,
    mut render: impl FnMut(&mut Client) -> Result<String, CtlError>,
) -> Result<(), CtlError> {
    if !watch {
        let text = render(c)?;
        return out.print(&text);
    }
    let tty = std::io::stdout().is_terminal();
    let mut last: Option<String> = None;
    loop {
        // Subscribed before the drawing: nothing that happens after it is
        // missed.
        let mut events = Client::connect(socket)?;
        events.start_more(&method("Events"), json!({ "name": name }))?;
        loop {
            let text = render(c)?;
            if last.as_ref() != Some(&text) {
                match (tty, last.is_some()) {
                    (true, _) => out.print(CLEAR)?,
                    (false, true) => out.line("---")?,
                    (false, false) => {}
                }
                out.print(&text)?;
                last = Some(text);
            }
            if out.closed() {
                return Err(CtlError::StdoutClosed);
            }
            match wait_for_burst(&mut events) {
                Ok(()) => {}
                // Fell behind: subscribe again and redraw.
                Err(CtlError::Remote { name, .. }) if name == errors::EVENTS_LAGGED => break,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Blocks until an event arrives, then until none has for [`COALESCE`]
/// (or [`COALESCE_MAX`] has passed).
fn wait_for_burst(events: &mut Client) -> Result<(), CtlError> {
    while events.next_more(None)?.is_none() {}
    let until = std::time::Instant::now() + COALESCE_MAX;
    while std::time::Instant::now() < until && events.next_more(Some(COALESCE))?.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines() {
        let crash = json!({
            "seq": 42, "time": "2026-12-05T21:00:00.123Z", "kind": "state",
            "module": "greeter", "revision": 3, "replica": 0, "from": "running",
            "to": "backoff", "reason": "worker killed by signal 9", "pid": 4242, "restarts": 0
        });
        assert_eq!(
            event_line(&crash),
            "2026-12-05T21:00:00.123Z #42 greeter r0 rev 3 running -> backoff pid 4242: \
             worker killed by signal 9"
        );
        let rollout = json!({
            "seq": 7, "time": "T", "kind": "rollout", "module": "kv", "revision": 2,
            "from_revision": 1, "step": "started"
        });
        assert_eq!(event_line(&rollout), "T #7 kv rollout rev 1 -> 2 started");
        let miss = json!({ "seq": 8, "time": "T", "kind": "pool", "what": "miss" });
        assert_eq!(event_line(&miss), "T #8 pool miss");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(42.9), "42s");
        assert_eq!(duration(192.0), "3m12s");
        assert_eq!(duration(7380.0), "2h03m");
        assert_eq!(duration(93_600.0), "1d02h");
    }

    #[test]
    fn the_status_table_counts_ready_replicas() {
        let m = json!({ "name": "kv", "replicas": 2, "pids": [10, 11] });
        let s = json!({
            "name": "kv", "version": "1.0.0", "revision": 1, "state": "running",
            "restarts": 1, "state_seconds": 65.0, "cpu_seconds": 0.5,
            "memory": { "pss": 2048 },
            "replicas": [{ "state": "running" }, { "state": "backoff" }]
        });
        let t = status_rows(&[(m.clone(), s.clone())], true);
        let row = t.lines().nth(1).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cols,
            ["kv", "1.0.0", "1", "running", "1/2", "1", "10,11", "0.50s", "2.0", "KiB", "1m05s"]
        );
        // Watching: no column that changes without an event.
        let t = status_rows(&[(m, s)], false);
        let head: Vec<&str> = t.lines().next().unwrap().split_whitespace().collect();
        assert_eq!(
            head,
            ["NAME", "VERSION", "REV", "STATE", "READY", "RESTARTS", "PIDS"]
        );
        let cols: Vec<&str> = t.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(cols, ["kv", "1.0.0", "1", "running", "1/2", "1", "10,11"]);
    }
}

//! One function per verb.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::client::{Client, CtlError};
use super::output::{bytes, cell, fields, table, Printer};
use super::release::{self, rollout_fields, rollout_note};
use super::{Cli, Command};

const IFACE: &str = "io.ember.Supervisor";

pub(super) fn method(m: &str) -> String {
    format!("{IFACE}.{m}")
}

/// `path` made absolute (the daemon's working directory is not ours); it
/// must exist.
pub(super) fn absolute_existing(path: &Path) -> Result<PathBuf, CtlError> {
    let abs = std::path::absolute(path)
        .map_err(|e| CtlError::Input(format!("{}: {e}", path.display())))?;
    if !abs.exists() {
        return Err(CtlError::Input(format!("{} does not exist", abs.display())));
    }
    Ok(abs)
}

/// The library the manifest at `abs` (a module directory or its
/// manifest) names in `entry`, when it is not where the manifest says but
/// a cargo build of it is ([`crate::entry::resolve`]; the target directory
/// is `$CARGO_TARGET_DIR` or `$CARGO_BUILD_TARGET_DIR` if set, else a
/// cargo configuration's `build.target-dir`, else the cargo workspace's
/// `target/`):
/// the `entry` parameter of `Install` and `Deploy`, and a line saying which
/// build was picked (on stderr with `--json`). `None` when the entry is
/// where the manifest says, and when the manifest cannot be read or parsed
/// here: emberd reports that, naming what is wrong. An entry found nowhere
/// is an error listing every place looked.
pub(super) fn pick_entry(
    abs: &Path,
    out: &mut Printer,
    json_out: bool,
) -> Result<Option<PathBuf>, CtlError> {
    let manifest = crate::manifest::locate(abs);
    let cap = crate::config::InstallConfig::default().max_manifest_bytes;
    let Ok(text) = crate::input::read_text(&manifest, cap, "install.max_manifest_bytes") else {
        return Ok(None);
    };
    let Ok(summary) = crate::manifest::parse(&text) else {
        return Ok(None);
    };
    // As cargo: `CARGO_TARGET_DIR`, else `CARGO_BUILD_TARGET_DIR`.
    let target_dir = ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"]
        .into_iter()
        .find_map(|var| {
            std::env::var_os(var)
                .filter(|t| !t.is_empty())
                .map(|t| (var, t))
        })
        .map(|(var, t)| {
            std::path::absolute(&t)
                .map(|t| (t, var))
                .map_err(|e| CtlError::Input(format!("{var} {}: {e}", Path::new(&t).display())))
        })
        .transpose()?;
    // emberctl's own profile: the one emberd and the SDK it offers were
    // built with when one `cargo build [--release]` built them all.
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    match crate::entry::resolve(
        &manifest,
        &summary.entry,
        target_dir.as_ref().map(|(t, var)| (t.as_path(), *var)),
        profile,
    ) {
        Ok(crate::entry::Resolved::AsWritten(_)) => Ok(None),
        Ok(crate::entry::Resolved::Cargo(pick)) => {
            let note = format!("entry {}: {pick}", summary.entry.display());
            if json_out {
                eprintln!("{note}");
            } else {
                out.line(&note)?;
            }
            Ok(Some(pick.path))
        }
        Err(e) => Err(CtlError::Input(e.to_string())),
    }
}

/// `{"path": abs}`, with `entry` when [`pick_entry`] found one.
fn install_params(abs: &Path, entry: Option<&Path>) -> Value {
    match entry {
        Some(e) => json!({ "path": abs, "entry": e }),
        None => json!({ "path": abs }),
    }
}

pub(super) fn run(socket: &Path, cli: &Cli) -> Result<(), CtlError> {
    let mut c = Client::connect(socket)?;
    let out = &mut Printer::new();
    match &cli.command {
        Command::Install { path, wait } => install(&mut c, out, path, *wait, cli.json),
        Command::Deploy { path, options } => release::deploy(&mut c, out, path, options, cli.json),
        Command::Rollback { name, to, wait } => {
            release::rollback(&mut c, out, name, *to, *wait, cli.json)
        }
        Command::History { name } => release::history(&mut c, out, name, cli.json),
        Command::Rollout { action } => release::rollout(&mut c, out, action, cli.json),
        Command::Uninstall { name } => uninstall(&mut c, out, name, cli.json),
        Command::List { watch } => super::events::view(socket, &mut c, out, *watch, None, |c| {
            list_text(c, cli.json)
        }),
        Command::Status {
            name: Some(name),
            watch,
        } => super::events::view(socket, &mut c, out, *watch, Some(name), |c| {
            status_text_of(c, name, cli.json, *watch)
        }),
        Command::Status { name: None, watch } => {
            super::events::view(socket, &mut c, out, *watch, None, |c| {
                super::events::status_table(c, cli.json, *watch)
            })
        }
        Command::Events { name } => super::events::follow(&mut c, out, name.as_deref(), cli.json),
        Command::Logs {
            name,
            follow,
            lines,
        } => logs(&mut c, out, name, *follow, *lines, cli.json),
        Command::Pool { watch } => super::events::view(socket, &mut c, out, *watch, None, |c| {
            pool_text(c, cli.json)
        }),
        Command::Health => health(&mut c, out, cli.json),
        Command::Completions { .. } | Command::Pack { .. } => {
            unreachable!("handled before connecting")
        }
    }
}

fn uninstall(
    c: &mut Client,
    out: &mut Printer,
    name: &str,
    json_out: bool,
) -> Result<(), CtlError> {
    let v = c.call(&method("Uninstall"), json!({ "name": name }))?;
    if json_out {
        out.json(&v)
    } else if v["killed"] == true {
        out.line(&format!(
            "uninstalled {name} (killed: it had not exited by its stop deadline)"
        ))
    } else {
        out.line(&format!("uninstalled {name}"))
    }
}

fn install(
    c: &mut Client,
    out: &mut Printer,
    path: &Path,
    wait: bool,
    json_out: bool,
) -> Result<(), CtlError> {
    let abs = absolute_existing(path)?;
    let params = install_params(&abs, pick_entry(&abs, out, json_out)?.as_deref());
    if wait {
        return install_and_wait(c, out, params, json_out);
    }
    let v = c.call(&method("Install"), params)?;
    if json_out {
        return out.json(&v);
    }
    let m = &v["module"];
    out.line(&format!(
        "installed {} {} ({})",
        cell(&m["name"]),
        cell(&m["version"]),
        cell(&m["state"])
    ))
}

/// `install --wait`: `Install` with `more`. The daemon sends the module's
/// summary each time its state changes until the start settles (running,
/// failed, crashloop, or its first backoff), then the install's own reply
/// once it is on disk; one line is printed per state change (the final
/// reply is not a state change). Fails, naming the state it settled in and
/// why, unless that is `running`.
fn install_and_wait(
    c: &mut Client,
    out: &mut Printer,
    params: Value,
    json_out: bool,
) -> Result<(), CtlError> {
    // The last state change reported: where the start settled.
    let mut settled = Value::Null;
    let mut installed = Value::Null;
    c.call_more(&method("Install"), params, |v, continues| {
        if json_out {
            out.line(&v.to_string())?;
        }
        let m = v["module"].clone();
        if !continues {
            installed = m;
            return Ok(());
        }
        if !json_out {
            let pids = m["pids"]
                .as_array()
                .map(|p| p.iter().map(cell).collect::<Vec<_>>().join(","))
                .filter(|p| !p.is_empty())
                .map(|p| format!(" pid {p}"))
                .unwrap_or_default();
            out.line(&format!(
                "{}: {}{pids}",
                cell(&m["name"]),
                cell(&m["state"])
            ))?;
        }
        settled = m;
        Ok(())
    })?;
    if settled.is_null() {
        settled = installed.clone();
    }
    let name = cell(&settled["name"]);
    let state = cell(&settled["state"]);
    if state == "running" {
        if !json_out {
            out.line(&format!(
                "installed {name} {} (running)",
                cell(&settled["version"])
            ))?;
        }
        return Ok(());
    }
    // The reason of the state it settled in, or (it may have moved on,
    // e.g. from backoff to its restart) the failure it last saw.
    let status = c
        .call(&method("Status"), json!({ "name": name }))
        .unwrap_or(Value::Null);
    let why = [&status["status"]["reason"], &status["status"]["last_error"]]
        .into_iter()
        .find_map(|r| r.as_str().map(str::to_owned))
        .unwrap_or_else(|| format!("see `emberctl status {name}`"));
    Err(CtlError::NotRunning(match state.as_str() {
        "backoff" => format!("{name} is installed but in backoff: {why} (a restart is pending)"),
        "crashloop" => format!(
            "{name} is installed but in crashloop: {why} (restarts continue, with back-off)"
        ),
        _ => format!("{name} is installed but {state}: {why}"),
    }))
}

/// `v` as `--json` prints it: indented, with a newline.
pub(super) fn json_text(v: &Value) -> String {
    serde_json::to_string_pretty(v).expect("a Value always serializes") + "\n"
}

fn list_text(c: &mut Client, json_out: bool) -> Result<String, CtlError> {
    let v = c.call(&method("List"), json!({}))?;
    if json_out {
        return Ok(json_text(&v));
    }
    Ok(list_table(&v))
}

/// `list`'s table; a ROLLOUT column only when a module has a rollout in
/// progress.
fn list_table(v: &Value) -> String {
    let modules = v["modules"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let rollouts = modules.iter().any(|m| !m["rollout"].is_null());
    let rows: Vec<Vec<String>> = modules
        .iter()
        .map(|m| {
            let pids = match m["pids"].as_array() {
                Some(p) if !p.is_empty() => cell(&m["pids"]),
                _ => "-".into(),
            };
            let mut row = vec![
                cell(&m["name"]),
                cell(&m["version"]),
                cell(&m["revision"]),
                cell(&m["state"]),
                cell(&m["replicas"]),
                pids,
                cell(&m["restarts"]),
            ];
            if rollouts {
                row.push(rollout_note(&m["rollout"]));
            }
            row
        })
        .collect();
    let mut header = vec![
        "NAME", "VERSION", "REV", "STATE", "REPLICAS", "PIDS", "RESTARTS",
    ];
    if rollouts {
        header.push("ROLLOUT");
    }
    table(&header, &rows)
}

/// `memory 64.0 MiB (manifest, cgroup-v1), cpu - (none), open files 1024
/// (config)`: each limit, where it comes from and what enforces it.
fn limits(l: &Value) -> String {
    let cpu = l["cpu_cores"]
        .as_f64()
        .map_or("-".into(), |c| format!("{c} cores"));
    let memory = if l["memory_bytes"].is_null() {
        "-".into()
    } else {
        bytes(&l["memory_bytes"])
    };
    // Where a limit comes from, then what enforces it ("none" once).
    let how = |source: &Value, mechanism: &Value| match source.as_str() {
        Some("none") | None => cell(mechanism),
        Some(s) => format!("{s}, {}", cell(mechanism)),
    };
    let mut out = format!(
        "memory {memory} ({}), cpu {cpu} ({})",
        how(&l["memory_source"], &l["memory_mechanism"]),
        how(&l["cpu_source"], &l["cpu_mechanism"]),
    );
    if let Some(n) = l["open_files"].as_u64() {
        out.push_str(&format!(
            ", open files {n} ({}, rlimit)",
            cell(&l["open_files_source"])
        ));
    }
    out
}

/// `uid 1879048192 (own-uid), no-new-privs, not dumpable, seccomp-bpf: …,
/// landlock ABI 7`: the first replica's sandbox that was reported, each
/// layer with its mechanism.
fn sandbox(replicas: &Value) -> String {
    let Some(s) = replicas
        .as_array()
        .and_then(|rs| rs.iter().map(|r| &r["sandbox"]).find(|s| !s.is_null()))
    else {
        return "-".into();
    };
    let flag = |v: &Value, yes: &str, no: &str| {
        if v.as_bool() == Some(true) {
            yes.to_owned()
        } else {
            no.to_owned()
        }
    };
    let mut text = format!(
        "uid {} gid {} ({}), {}, {}, {}, {}",
        cell(&s["uid"]),
        cell(&s["gid"]),
        cell(&s["uid_mechanism"]),
        flag(&s["no_new_privs"], "no-new-privs", "new privileges allowed"),
        flag(&s["dumpable"], "dumpable", "not dumpable"),
        cell(&s["seccomp"]),
        cell(&s["filesystem"]),
    );
    // An emberd that does not send the list: nothing said.
    if let (Some(paths), false) = (s["writable"].as_array(), s["uid_mechanism"] == "none") {
        let paths: Vec<String> = paths.iter().map(cell).collect();
        text.push_str(&format!(
            "; writable: {}",
            if paths.is_empty() {
                "none declared".to_owned()
            } else {
                paths.join(", ")
            }
        ));
    }
    text
}

/// With `watch`, the text says which of its values are as of the drawing:
/// they change without an event, and a watch redraws only on events.
fn status_text_of(
    c: &mut Client,
    name: &str,
    json_out: bool,
    watch: bool,
) -> Result<String, CtlError> {
    let v = c.call(&method("Status"), json!({ "name": name }))?;
    if json_out {
        return Ok(json_text(&v));
    }
    let mut text = status_text(&v["status"]);
    if watch {
        text.push_str(WATCH_NOTE);
    }
    Ok(text)
}

/// Under `status NAME --watch`.
const WATCH_NOTE: &str =
    "(memory, cpu and time in state are as of this drawing: --watch redraws on events only)\n";

/// `status`'s output: the module's fields, its rollout in progress, and a
/// table of its replicas when there are several or a rollout runs.
fn status_text(s: &Value) -> String {
    let mem = &s["memory"];
    let cpu = s["cpu_seconds"]
        .as_f64()
        .map_or("-".into(), |c| format!("{c:.2}s"));
    let mut text = fields(&[
        ("name", cell(&s["name"])),
        ("version", cell(&s["version"])),
        ("revision", cell(&s["revision"])),
        (
            "state",
            format!(
                "{} for {:.0}s",
                cell(&s["state"]),
                s["state_seconds"].as_f64().unwrap_or(0.0)
            ),
        ),
        ("reason", cell(&s["reason"])),
        ("pid", cell(&s["pid"])),
        ("restarts", cell(&s["restarts"])),
        ("last error", cell(&s["last_error"])),
        (
            "memory",
            if mem.is_null() {
                "-".into()
            } else {
                format!(
                    "rss {} pss {} uss {}",
                    bytes(&mem["rss"]),
                    bytes(&mem["pss"]),
                    bytes(&mem["uss"])
                )
            },
        ),
        ("cpu", cpu),
        ("limits", limits(&s["limits"])),
        ("sandbox", sandbox(&s["replicas"])),
        ("artifact", cell(&s["artifact_sha256"])),
        ("listeners", listeners(&s["listeners"])),
        ("imports", imports(&s["imports"])),
    ]);
    let rollout = &s["rollout"];
    if !rollout.is_null() {
        text.push_str("\nrollout:\n");
        for l in rollout_fields(rollout).lines() {
            text.push_str(&format!("  {l}\n"));
        }
    }
    let several = s["replicas"]
        .as_array()
        .filter(|r| r.len() > 1 || !rollout.is_null());
    if let Some(rs) = several {
        let rows: Vec<Vec<String>> = rs
            .iter()
            .map(|r| {
                vec![
                    cell(&r["replica"]),
                    cell(&r["revision"]),
                    cell(&r["state"]),
                    cell(&r["pid"]),
                    cell(&r["restarts"]),
                    if r["memory"].is_null() {
                        "-".into()
                    } else {
                        bytes(&r["memory"]["pss"])
                    },
                    cell(&r["reason"]),
                ]
            })
            .collect();
        text.push('\n');
        text.push_str(&table(
            &[
                "REPLICA", "REV", "STATE", "PID", "RESTARTS", "PSS", "REASON",
            ],
            &rows,
        ));
    }
    text
}

fn logs(
    c: &mut Client,
    out: &mut Printer,
    name: &str,
    follow: bool,
    lines: u32,
    json_out: bool,
) -> Result<(), CtlError> {
    let params = json!({ "name": name, "lines": lines });
    let mut print = |v: Value| {
        if json_out {
            out.line(&v.to_string())?;
        } else if let Some(ls) = v["lines"].as_array() {
            let mut text = String::new();
            for l in ls {
                text.push_str(l.as_str().unwrap_or_default());
                text.push('\n');
            }
            out.print(&text)?;
        }
        // Following for nobody: stop (quietly) rather than forever.
        if out.closed() {
            return Err(CtlError::StdoutClosed);
        }
        Ok(())
    };
    if follow {
        c.call_more(&method("Logs"), params, |v, _| print(v))
    } else {
        let v = c.call(&method("Logs"), params)?;
        print(v)
    }
}

fn pool_text(c: &mut Client, json_out: bool) -> Result<String, CtlError> {
    let v = c.call(&method("Pool"), json!({}))?;
    if json_out {
        return Ok(json_text(&v));
    }
    let p = &v["pool"];
    Ok(fields(&[
        (
            "idle",
            format!(
                "{} (min {}, max {})",
                cell(&p["idle"]),
                cell(&p["min_idle"]),
                cell(&p["max_idle"])
            ),
        ),
        ("hits", cell(&p["hits"])),
        ("misses", cell(&p["misses"])),
        (
            "refills",
            format!(
                "{} ({} in the last minute)",
                cell(&p["refills"]),
                cell(&p["refills_last_minute"])
            ),
        ),
        (
            "fork time",
            format!("{} µs on average", cell(&p["fork_us_avg"])),
        ),
        ("fork failures", cell(&p["fork_failures"])),
        ("idle pids", cell(&p["idle_pids"])),
    ]))
}

fn health(c: &mut Client, out: &mut Printer, json_out: bool) -> Result<(), CtlError> {
    let v = c.call(&method("Health"), json!({}))?;
    if json_out {
        out.json(&v)?;
    } else {
        out.print(&fields(&[
            ("healthy", cell(&v["healthy"])),
            ("version", cell(&v["version"])),
            (
                "uptime",
                format!("{:.0}s", v["uptime_seconds"].as_f64().unwrap_or(0.0)),
            ),
            ("zygote pid", cell(&v["zygote_pid"])),
            (
                "modules",
                format!(
                    "{} ({} running, {} failed)",
                    cell(&v["modules"]),
                    cell(&v["running"]),
                    cell(&v["failed"])
                ),
            ),
            ("memory limits", cell(&v["memory_limits"])),
            ("cpu limits", cell(&v["cpu_limits"])),
            (
                "open files",
                format!(
                    "{} of {}",
                    cell(&v["open_files"]),
                    cell(&v["open_files_limit"])
                ),
            ),
            ("slim modules", runtime_libs(&v["runtime_libs"])),
        ]))?;
    }
    if v["healthy"].as_bool() == Some(false) {
        return Err(CtlError::Remote {
            name: "io.ember.Supervisor.Unhealthy".into(),
            parameters: json!({}),
        });
    }
    Ok(())
}

/// The shared runtime line of `health`: what slim modules must link.
fn runtime_libs(v: &Value) -> String {
    if v["offered"].as_bool() == Some(true) {
        format!(
            "{} + {} ({})",
            cell(&v["sdk"]),
            cell(&v["std"]),
            cell(&v["rustc"])
        )
    } else {
        format!("not offered: {}", cell(&v["reason"]))
    }
}

fn listeners(v: &Value) -> String {
    match v.as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|l| format!("{}={}", cell(&l["name"]), cell(&l["address"])))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "-".into(),
    }
}

/// `kv v1 wired (exporter kv), prices v2 waiting: prices exports version
/// 1`: each import, its version, its state and the module exporting it, or
/// why it waits.
fn imports(v: &Value) -> String {
    match v.as_array() {
        Some(a) if !a.is_empty() => a
            .iter()
            .map(|i| {
                let head = format!(
                    "{} v{} {}",
                    cell(&i["name"]),
                    cell(&i["version"]),
                    cell(&i["state"])
                );
                match (i["reason"].as_str(), i["exporter"].as_str()) {
                    (Some(why), _) => format!("{head}: {why}"),
                    (None, Some(e)) => format!("{head} (exporter {e})"),
                    (None, None) => head,
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
        _ => "-".into(),
    }
}

/// `emberctl pack`: the module at `path` as an OCI image archive
/// ([`crate::oci`]).
pub(super) fn pack(
    path: &Path,
    output: Option<&Path>,
    name: Option<&str>,
    json_out: bool,
) -> Result<(), CtlError> {
    let abs = absolute_existing(path)?;
    let manifest = crate::manifest::locate(&abs);
    let cap = crate::config::InstallConfig::default().max_manifest_bytes;
    let text = crate::input::read_text(&manifest, cap, "install.max_manifest_bytes")
        .map_err(|e| CtlError::Input(crate::error_chain(&e)))?;
    let summary = crate::manifest::parse(&text).map_err(|e| {
        CtlError::Input(format!(
            "invalid manifest {}: {}",
            manifest.display(),
            crate::error_chain(&e)
        ))
    })?;
    let mut out = Printer::new();
    let library = match pick_entry(&abs, &mut out, json_out)? {
        Some(lib) => lib,
        None => manifest
            .parent()
            .unwrap_or(Path::new("/"))
            .join(&summary.entry),
    };
    let packed = crate::oci::pack(&manifest, &library, name)
        .map_err(|e| CtlError::Input(crate::error_chain(&e)))?;
    let file = output.map_or_else(
        || {
            PathBuf::from(format!(
                "{}-{}.oci.tar",
                summary.name,
                summary.version.replace('+', "_")
            ))
        },
        Path::to_owned,
    );
    std::fs::write(&file, &packed.archive)
        .map_err(|e| CtlError::Input(format!("cannot write {}: {e}", file.display())))?;
    if json_out {
        out.json(&json!({
            "path": file,
            "name": packed.name,
            "digest": packed.digest,
            "size": packed.archive.len(),
        }))
    } else {
        out.line(&format!(
            "wrote {} ({} bytes): image {} ({})",
            file.display(),
            packed.archive.len(),
            packed.name,
            packed.digest
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(name: &str, revision: u64, rollout: Value) -> Value {
        json!({
            "name": name, "version": "0.1.0", "state": "running", "pid": 10,
            "pids": [10, 11], "replicas": 2, "restarts": 0,
            "revision": revision, "rollout": rollout
        })
    }

    #[test]
    fn list_shows_revisions_and_rollouts() {
        let quiet = json!({ "modules": [summary("kv", 1, Value::Null)] });
        assert_eq!(
            list_table(&quiet),
            "NAME  VERSION  REV  STATE    REPLICAS  PIDS   RESTARTS\n\
             kv    0.1.0    1    running  2         10,11  0\n"
        );
        let rolling = json!({ "modules": [
            summary("greeter", 2, json!({
                "revision": 3, "from_revision": 2, "version": "0.2.0",
                "strategy": "surge", "max_surge": 2, "max_unavailable": 0,
                "pause_after": null, "phase": "progressing", "old_replicas": 2,
                "new_replicas": 2, "new_ready": 1, "reason": null, "seconds": 1.0
            })),
            summary("kv", 1, Value::Null),
        ]});
        assert_eq!(
            list_table(&rolling),
            "NAME     VERSION  REV  STATE    REPLICAS  PIDS   RESTARTS  ROLLOUT\n\
             greeter  0.1.0    2    running  2         10,11  0         \
             → rev 3 (progressing, new 1/2, old 2)\n\
             kv       0.1.0    1    running  2         10,11  0\n"
        );
        assert_eq!(
            list_table(&json!({ "modules": [] })),
            "NAME  VERSION  REV  STATE  REPLICAS  PIDS  RESTARTS\n"
        );
    }

    fn status(replicas: Value, rollout: Value) -> Value {
        json!({
            "name": "greeter", "version": "0.1.0", "state": "running",
            "reason": null, "pid": 10, "restarts": 0, "last_error": null,
            "artifact_sha256": "ab12", "listeners": [], "state_seconds": 5.0,
            "memory": null, "cpu_seconds": null, "imports": [],
            "limits": {
                "memory_bytes": null, "memory_source": "none",
                "memory_mechanism": "none", "cpu_cores": null,
                "cpu_source": "none", "cpu_mechanism": "none",
                "open_files": null, "open_files_source": "none"
            },
            "replicas": replicas, "revision": 2, "rollout": rollout
        })
    }

    fn replica(i: u64, revision: u64, state: &str) -> Value {
        json!({
            "replica": i, "revision": revision, "state": state, "reason": null,
            "pid": 10 + i, "restarts": 0, "last_error": null,
            "state_seconds": 1.0, "memory": null, "cpu_seconds": null,
            "cgroups": []
        })
    }

    #[test]
    fn status_shows_each_sandbox_layer_with_its_mechanism() {
        let mut r = replica(0, 2, "running");
        let text = status_text(&status(json!([r.clone()]), Value::Null));
        assert!(text.contains("\n   sandbox: -\n"), "{text}");
        r["sandbox"] = json!({
            "uid": 1879048192, "gid": 1879048192, "uid_mechanism": "own-uid",
            "no_new_privs": true, "dumpable": false,
            "seccomp": "seccomp-bpf: 46 syscalls", "filesystem": "landlock ABI 7"
        });
        let text = status_text(&status(json!([r.clone()]), Value::Null));
        assert!(
            text.contains(
                "\n   sandbox: uid 1879048192 gid 1879048192 (own-uid), no-new-privs, \
                 not dumpable, seccomp-bpf: 46 syscalls, landlock ABI 7\n"
            ),
            "{text}"
        );
        r["sandbox"]["writable"] = json!(["/var/lib/m", "/tmp/m"]);
        let text = status_text(&status(json!([r.clone()]), Value::Null));
        assert!(
            text.contains("landlock ABI 7; writable: /var/lib/m, /tmp/m\n"),
            "{text}"
        );
        r["sandbox"]["writable"] = json!([]);
        let text = status_text(&status(json!([r]), Value::Null));
        assert!(
            text.contains("landlock ABI 7; writable: none declared\n"),
            "{text}"
        );
    }

    #[test]
    fn status_shows_revision_rollout_and_replica_revisions() {
        let one = status_text(&status(json!([replica(0, 2, "running")]), Value::Null));
        assert!(one.contains("\n  revision: 2\n"), "{one}");
        assert!(!one.contains("rollout"), "{one}");
        assert!(!one.contains("REPLICA"), "{one}");

        let r = json!({
            "revision": 3, "from_revision": 2, "version": "0.2.0",
            "strategy": "surge", "max_surge": 1, "max_unavailable": 0,
            "pause_after": 1, "phase": "paused", "old_replicas": 1,
            "new_replicas": 1, "new_ready": 1, "reason": null, "seconds": 7.2
        });
        let text = status_text(&status(
            json!([replica(0, 2, "running"), replica(1, 3, "running")]),
            r,
        ));
        assert!(
            text.contains(
                "\nrollout:\n       target: revision 3 (0.2.0), from revision 2\n\
                 \x20    strategy: surge\n\
                 \x20       phase: paused (7s since the rollout began)\n\
                 \x20    replicas: old 1, new 1 (1 ready)\n\
                 \x20 pause after: 1 new replica ready\n\n"
            ),
            "{text}"
        );
        assert!(
            text.ends_with(
                "REPLICA  REV  STATE    PID  RESTARTS  PSS  REASON\n\
                 0        2    running  10   0         -    -\n\
                 1        3    running  11   0         -    -\n"
            ),
            "{text}"
        );
    }
}

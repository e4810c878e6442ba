//! One function per verb.

use std::path::Path;

use serde_json::{json, Value};

use super::client::{Client, CtlError};
use super::output::{bytes, cell, fields, table};
use super::{Cli, Command};

const IFACE: &str = "io.ember.Supervisor";

fn method(m: &str) -> String {
    format!("{IFACE}.{m}")
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

pub(super) fn run(socket: &Path, cli: &Cli) -> Result<(), CtlError> {
    let mut c = Client::connect(socket)?;
    match &cli.command {
        Command::Install { path, wait } => install(&mut c, path, *wait, cli.json),
        Command::Uninstall { name } => {
            let v = c.call(&method("Uninstall"), json!({ "name": name }))?;
            if cli.json {
                print_json(&v);
            } else {
                println!("uninstalled {name}");
            }
            Ok(())
        }
        Command::List => list(&mut c, cli.json),
        Command::Status { name } => status(&mut c, name, cli.json),
        Command::Logs {
            name,
            follow,
            lines,
        } => logs(&mut c, name, *follow, *lines, cli.json),
        Command::Pool => pool(&mut c, cli.json),
        Command::Health => health(&mut c, cli.json),
        Command::Completions { .. } => unreachable!("handled before connecting"),
    }
}

fn install(c: &mut Client, path: &Path, wait: bool, json_out: bool) -> Result<(), CtlError> {
    let abs = std::path::absolute(path)
        .map_err(|e| CtlError::Input(format!("{}: {e}", path.display())))?;
    if !abs.exists() {
        return Err(CtlError::Input(format!("{} does not exist", abs.display())));
    }
    if wait {
        return install_and_wait(c, &abs, json_out);
    }
    let v = c.call(&method("Install"), json!({ "path": abs }))?;
    if json_out {
        print_json(&v);
    } else {
        let m = &v["module"];
        println!(
            "installed {} {} ({})",
            cell(&m["name"]),
            cell(&m["version"]),
            cell(&m["state"])
        );
    }
    Ok(())
}

/// `install --wait`: `Install` with `more`, one line per state the module
/// goes through, then the install's own reply; fails unless it ends running.
fn install_and_wait(c: &mut Client, abs: &Path, json_out: bool) -> Result<(), CtlError> {
    let mut last = Value::Null;
    c.call_more(&method("Install"), json!({ "path": abs }), |v| {
        if json_out {
            println!("{v}");
        } else {
            let m = &v["module"];
            let pids = m["pids"]
                .as_array()
                .map(|p| p.iter().map(cell).collect::<Vec<_>>().join(","))
                .filter(|p| !p.is_empty())
                .map(|p| format!(" pid {p}"))
                .unwrap_or_default();
            println!("{}: {}{pids}", cell(&m["name"]), cell(&m["state"]));
        }
        last = v["module"].clone();
        Ok(())
    })?;
    if last["state"] == "running" {
        if !json_out {
            println!(
                "installed {} {} (running)",
                cell(&last["name"]),
                cell(&last["version"])
            );
        }
        return Ok(());
    }
    let name = cell(&last["name"]);
    let status = c
        .call(&method("Status"), json!({ "name": name }))
        .unwrap_or(Value::Null);
    let why = [&status["status"]["reason"], &status["status"]["last_error"]]
        .into_iter()
        .find_map(|r| r.as_str().map(str::to_owned))
        .unwrap_or_else(|| "see `emberctl status`".into());
    Err(CtlError::NotRunning(format!(
        "{name} is installed but {}: {why}",
        cell(&last["state"])
    )))
}

fn list(c: &mut Client, json_out: bool) -> Result<(), CtlError> {
    let v = c.call(&method("List"), json!({}))?;
    if json_out {
        print_json(&v);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = v["modules"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    let pids = match m["pids"].as_array() {
                        Some(p) if !p.is_empty() => cell(&m["pids"]),
                        _ => "-".into(),
                    };
                    vec![
                        cell(&m["name"]),
                        cell(&m["version"]),
                        cell(&m["state"]),
                        cell(&m["replicas"]),
                        pids,
                        cell(&m["restarts"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    print!(
        "{}",
        table(
            &["NAME", "VERSION", "STATE", "REPLICAS", "PIDS", "RESTARTS"],
            &rows
        )
    );
    Ok(())
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

fn status(c: &mut Client, name: &str, json_out: bool) -> Result<(), CtlError> {
    let v = c.call(&method("Status"), json!({ "name": name }))?;
    if json_out {
        print_json(&v);
        return Ok(());
    }
    let s = &v["status"];
    let mem = &s["memory"];
    let cpu = s["cpu_seconds"]
        .as_f64()
        .map_or("-".into(), |c| format!("{c:.2}s"));
    print!(
        "{}",
        fields(&[
            ("name", cell(&s["name"])),
            ("version", cell(&s["version"])),
            (
                "state",
                format!(
                    "{} for {:.0}s",
                    cell(&s["state"]),
                    s["state_seconds"].as_f64().unwrap_or(0.0)
                )
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
                }
            ),
            ("cpu", cpu),
            ("limits", limits(&s["limits"])),
            ("artifact", cell(&s["artifact_sha256"])),
            ("listeners", listeners(&s["listeners"])),
        ])
    );
    if let Some(rs) = s["replicas"].as_array().filter(|r| r.len() > 1) {
        let rows: Vec<Vec<String>> = rs
            .iter()
            .map(|r| {
                vec![
                    cell(&r["replica"]),
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
        println!();
        print!(
            "{}",
            table(
                &["REPLICA", "STATE", "PID", "RESTARTS", "PSS", "REASON"],
                &rows
            )
        );
    }
    Ok(())
}

fn logs(
    c: &mut Client,
    name: &str,
    follow: bool,
    lines: u32,
    json_out: bool,
) -> Result<(), CtlError> {
    let params = json!({ "name": name, "lines": lines });
    let print = |v: Value| {
        if json_out {
            println!("{v}");
        } else if let Some(ls) = v["lines"].as_array() {
            for l in ls {
                println!("{}", l.as_str().unwrap_or_default());
            }
        }
        Ok(())
    };
    if follow {
        c.call_more(&method("Logs"), params, print)
    } else {
        let v = c.call(&method("Logs"), params)?;
        print(v)
    }
}

fn pool(c: &mut Client, json_out: bool) -> Result<(), CtlError> {
    let v = c.call(&method("Pool"), json!({}))?;
    if json_out {
        print_json(&v);
        return Ok(());
    }
    let p = &v["pool"];
    print!(
        "{}",
        fields(&[
            (
                "idle",
                format!(
                    "{} (min {}, max {})",
                    cell(&p["idle"]),
                    cell(&p["min_idle"]),
                    cell(&p["max_idle"])
                )
            ),
            ("hits", cell(&p["hits"])),
            ("misses", cell(&p["misses"])),
            (
                "refills",
                format!(
                    "{} ({} in the last minute)",
                    cell(&p["refills"]),
                    cell(&p["refills_last_minute"])
                )
            ),
            (
                "fork time",
                format!("{} µs on average", cell(&p["fork_us_avg"]))
            ),
            ("fork failures", cell(&p["fork_failures"])),
            ("idle pids", cell(&p["idle_pids"])),
        ])
    );
    Ok(())
}

fn health(c: &mut Client, json_out: bool) -> Result<(), CtlError> {
    let v = c.call(&method("Health"), json!({}))?;
    if json_out {
        print_json(&v);
    } else {
        print!(
            "{}",
            fields(&[
                ("healthy", cell(&v["healthy"])),
                ("version", cell(&v["version"])),
                (
                    "uptime",
                    format!("{:.0}s", v["uptime_seconds"].as_f64().unwrap_or(0.0))
                ),
                ("zygote pid", cell(&v["zygote_pid"])),
                (
                    "modules",
                    format!(
                        "{} ({} running, {} failed)",
                        cell(&v["modules"]),
                        cell(&v["running"]),
                        cell(&v["failed"])
                    )
                ),
                ("memory limits", cell(&v["memory_limits"])),
                ("cpu limits", cell(&v["cpu_limits"])),
            ])
        );
    }
    if v["healthy"].as_bool() == Some(false) {
        return Err(CtlError::Remote {
            name: "io.ember.Supervisor.Unhealthy".into(),
            parameters: json!({}),
        });
    }
    Ok(())
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

//! A real `emberd` process on a temporary socket and state directory,
//! driven over its Varlink control socket (`docs/control-protocol.md`).
//! Everything it started is stopped, and the directory removed, on drop.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::artifacts::TempDir;
use crate::launch::Base;
use crate::varlink::{Client, VarlinkError};

/// The daemon could not be started or did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Preparing its directory failed.
    #[error("cannot prepare the daemon directory")]
    Dir(#[source] std::io::Error),
    /// `emberd` could not be run.
    #[error("cannot run {}", path.display())]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `emberd` exited.
    #[error("emberd exited ({status}); its log:\n{log}")]
    Exited {
        /// Its status.
        status: ExitStatus,
        /// The end of its log.
        log: String,
    },
    /// A control call failed.
    #[error("control call {method} failed")]
    Call {
        /// The method.
        method: String,
        /// Why.
        #[source]
        source: VarlinkError,
    },
    /// Something did not happen in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// A module reached a state it will not leave by itself.
    #[error("module `{name}` is {state}: {reason}")]
    ModuleFailed {
        /// The module.
        name: String,
        /// Its state.
        state: String,
        /// Its reason or last error.
        reason: String,
    },
}

impl DaemonError {
    /// The Varlink error a control call was answered with (e.g.
    /// `org.varlink.service.MethodNotFound`), if that is what this is.
    pub fn remote(&self) -> Option<&str> {
        match self {
            DaemonError::Call {
                source: VarlinkError::Remote { error, .. },
                ..
            } => Some(error),
            _ => None,
        }
    }
}

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct Options {
    /// The base plugin to preload.
    pub base: Option<Base>,
    /// Warm pool policy.
    pub min_idle: usize,
    /// Warm pool policy.
    pub max_idle: usize,
    /// Let emberd write to our stderr instead of `DIR/emberd.log`.
    pub inherit_output: bool,
    /// How long plugin init may take before the socket answers.
    pub start_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            base: None,
            min_idle: 2,
            max_idle: 4,
            inherit_output: false,
            start_timeout: Duration::from_secs(180),
        }
    }
}

/// A running `emberd`.
#[derive(Debug)]
pub struct Emberd {
    child: Option<Child>,
    client: Client,
    /// A second connection, for watching while a call is in flight.
    socket: PathBuf,
    state: PathBuf,
    log: PathBuf,
    poll: Duration,
    dir: TempDir,
}

/// One reply to a call with `more` ([`Emberd::call_more`]).
#[derive(Debug, Clone)]
pub struct MoreReply {
    /// When it was read.
    pub at: Instant,
    /// Its parameters.
    pub params: Value,
    /// Whether more replies followed.
    pub continues: bool,
}

/// One progress reply of a rollout, as [`rollout_times`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutProgress {
    /// Since the call.
    pub at: Duration,
    /// `module.rollout.phase`.
    pub phase: String,
    /// `module.rollout.old_replicas`.
    pub old_replicas: u64,
    /// `module.rollout.new_replicas`.
    pub new_replicas: u64,
    /// `module.rollout.new_ready`.
    pub new_ready: u64,
}

/// A `Deploy` or `Rollback` called with `more`, timed from its replies.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutTimes {
    /// Call → the first progress reply in phase `stabilizing` (only the
    /// new revision runs: every new replica ready, every old one exited),
    /// or the final reply if none says so.
    pub done: Duration,
    /// Call → the first reply whose `new_ready` reaches `replicas`.
    pub cutover: Option<Duration>,
    /// Call → the final reply.
    pub total: Duration,
    /// The final reply's `outcome`.
    pub outcome: String,
    /// The final reply's `reason` (empty if none).
    pub reason: String,
    /// Every reply that carried a rollout.
    pub progress: Vec<RolloutProgress>,
}

/// Times a rollout from the replies [`Emberd::call_more`] returned for a
/// call sent at `call` to a module of `replicas` replicas.
pub fn rollout_times(call: Instant, replies: &[MoreReply], replicas: u64) -> RolloutTimes {
    let mut done = None;
    let mut cutover = None;
    let mut progress = Vec::new();
    for r in replies {
        let at = r.at.saturating_duration_since(call);
        let ro = &r.params["module"]["rollout"];
        if ro.is_null() {
            continue;
        }
        let n = |k: &str| ro[k].as_u64().unwrap_or(0);
        let phase = ro["phase"].as_str().unwrap_or("").to_owned();
        if r.continues && phase == "stabilizing" {
            done.get_or_insert(at);
        }
        if n("new_ready") >= replicas {
            cutover.get_or_insert(at);
        }
        progress.push(RolloutProgress {
            at,
            phase,
            old_replicas: n("old_replicas"),
            new_replicas: n("new_replicas"),
            new_ready: n("new_ready"),
        });
    }
    let (total, outcome, reason) = match replies.last() {
        Some(last) => (
            last.at.saturating_duration_since(call),
            last.params["outcome"].as_str().unwrap_or("").to_owned(),
            last.params["reason"].as_str().unwrap_or("").to_owned(),
        ),
        None => (Duration::ZERO, String::new(), String::new()),
    };
    RolloutTimes {
        done: done.unwrap_or(total),
        cutover,
        total,
        outcome,
        reason,
        progress,
    }
}

/// `emberd` in a profile directory.
pub fn emberd_bin(profile: &Path) -> PathBuf {
    profile.join("emberd")
}

impl Emberd {
    /// Starts `emberd` (binary `bin`) with `opts` in a fresh temporary
    /// directory and waits until its control socket answers `Health`.
    pub fn start(bin: &Path, opts: &Options) -> Result<Self, DaemonError> {
        let dir = TempDir::new("ember-emberd").map_err(DaemonError::Dir)?;
        let socket = dir.path().join("control.sock");
        let state = dir.path().join("state");
        let log = dir.path().join("emberd.log");
        let config = dir.path().join("emberd.toml");
        std::fs::write(&config, config_text(opts)).map_err(DaemonError::Dir)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            .stdin(Stdio::null())
            // Its own process group: a terminal's Ctrl-C reaches only us,
            // and we stop emberd in order.
            .process_group(0);
        if !opts.inherit_output {
            let f = std::fs::File::create(&log).map_err(DaemonError::Dir)?;
            let f2 = f.try_clone().map_err(DaemonError::Dir)?;
            cmd.stdout(f).stderr(f2);
        }
        // SAFETY: runs between fork and exec and only calls prctl,
        // sigemptyset and sigprocmask, which are async-signal-safe. emberd
        // stops (and takes its workers with it) if we die, and starts with
        // an empty signal mask: a caller that blocked SIGTERM/SIGINT to
        // read them from a signalfd (the demo) would otherwise pass the
        // mask on, and emberd would never see SIGTERM.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
                libc::sigemptyset(set.as_mut_ptr());
                if libc::sigprocmask(libc::SIG_SETMASK, set.as_ptr(), std::ptr::null_mut()) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| DaemonError::Spawn {
            path: bin.to_owned(),
            source,
        })?;
        let mut child = Some(child);
        let end = Instant::now() + opts.start_timeout;
        let client = loop {
            if let Some(c) = child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    return Err(DaemonError::Exited {
                        status,
                        log: tail(&log),
                    });
                }
            }
            if let Ok(mut c) = Client::connect(&socket) {
                if c.ember("Health", json!({})).is_ok() {
                    break c;
                }
            }
            if Instant::now() > end {
                if let Some(mut c) = child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(DaemonError::Timeout(
                    opts.start_timeout,
                    "the control socket".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Self {
            child,
            client,
            socket,
            state,
            log,
            poll: Duration::ZERO,
            dir,
        })
    }

    /// emberd's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether emberd is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The control socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    /// The temporary directory holding everything.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's log file (empty with `inherit_output`).
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Calls `io.ember.Supervisor.<method>`.
    pub fn call(&mut self, method: &str, params: Value) -> Result<Value, DaemonError> {
        self.client
            .ember(method, params)
            .map_err(|source| DaemonError::Call {
                method: method.to_owned(),
                source,
            })
    }

    /// `Install` of a module directory.
    pub fn install(&mut self, dir: &Path) -> Result<Value, DaemonError> {
        self.call("Install", json!({"path": dir}))
    }

    /// `Install` of a module directory, timed the way a user sees it: the
    /// call goes out with `more`, so emberd reports each state the module
    /// goes through (`emberctl install --wait` does the same), and the clock
    /// stops at the first reply saying `running`; the call's last reply
    /// comes once the desired state is on disk. Returns (Install → running,
    /// Install → last reply).
    pub fn install_until_running(
        &mut self,
        dir: &Path,
        name: &str,
        timeout: Duration,
    ) -> Result<(Duration, Duration), DaemonError> {
        let call = |method: &str| {
            let method = method.to_owned();
            move |source| DaemonError::Call { method, source }
        };
        let t = Instant::now();
        self.client
            .send_more("io.ember.Supervisor.Install", json!({"path": dir}))
            .map_err(call("Install"))?;
        let mut running = None;
        loop {
            let (reply, continues) = self.client.receive_more().map_err(call("Install"))?;
            let state = reply["module"]["state"].as_str().unwrap_or("").to_owned();
            match state.as_str() {
                "running" => {
                    running.get_or_insert_with(|| t.elapsed());
                }
                "failed" | "crashloop" | "backoff" | "stopped" => {
                    return Err(DaemonError::ModuleFailed {
                        name: name.into(),
                        state,
                        reason: "see Status".into(),
                    })
                }
                _ => {}
            }
            if !continues {
                break;
            }
            if t.elapsed() > timeout {
                return Err(DaemonError::Timeout(timeout, format!("`{name}` to run")));
            }
        }
        let running = running.ok_or_else(|| DaemonError::ModuleFailed {
            name: name.into(),
            state: "not running".into(),
            reason: "Install ended before the module ran".into(),
        })?;
        Ok((running, t.elapsed()))
    }

    /// Calls `io.ember.Supervisor.<method>` with `more` and reads its
    /// replies until one without `continues` (or `timeout`), each stamped
    /// on arrival. Returns the instant just before the call was sent and
    /// the replies; a Varlink error reply ends the call with `Err`.
    pub fn call_more(
        &mut self,
        method: &str,
        params: Value,
        timeout: Duration,
    ) -> Result<(Instant, Vec<MoreReply>), DaemonError> {
        let err = |source| DaemonError::Call {
            method: method.to_owned(),
            source,
        };
        let t = Instant::now();
        self.client
            .send_more(&format!("io.ember.Supervisor.{method}"), params)
            .map_err(err)?;
        let mut replies = Vec::new();
        loop {
            let (params, continues) = self.client.receive_more().map_err(err)?;
            replies.push(MoreReply {
                at: Instant::now(),
                params,
                continues,
            });
            if !continues {
                return Ok((t, replies));
            }
            if t.elapsed() > timeout {
                return Err(DaemonError::Timeout(
                    timeout,
                    format!("the last reply to {method}"),
                ));
            }
        }
    }

    /// `Uninstall`.
    pub fn uninstall(&mut self, name: &str) -> Result<(), DaemonError> {
        self.call("Uninstall", json!({"name": name})).map(drop)
    }

    /// `Status` (the `status` object).
    pub fn status(&mut self, name: &str) -> Result<Value, DaemonError> {
        Ok(self.call("Status", json!({"name": name}))?["status"].take())
    }

    /// `Pool` (the `pool` object).
    pub fn pool(&mut self) -> Result<Value, DaemonError> {
        Ok(self.call("Pool", json!({}))?["pool"].take())
    }

    /// Pause between two `Status` calls in [`Emberd::wait_running`]
    /// (default: none).
    pub fn set_poll_interval(&mut self, d: Duration) {
        self.poll = d;
    }

    /// Polls `Status` until every replica of `name` is
    /// `running`; returns that status.
    pub fn wait_running(&mut self, name: &str, timeout: Duration) -> Result<Value, DaemonError> {
        let end = Instant::now() + timeout;
        loop {
            let s = self.status(name)?;
            let state = s["state"].as_str().unwrap_or("");
            match state {
                "running" => return Ok(s),
                "failed" | "crashloop" | "backoff" | "stopped" => {
                    return Err(DaemonError::ModuleFailed {
                        name: name.into(),
                        state: state.into(),
                        reason: s["reason"]
                            .as_str()
                            .or(s["last_error"].as_str())
                            .unwrap_or("no reason given")
                            .into(),
                    })
                }
                _ => {}
            }
            if Instant::now() > end {
                return Err(DaemonError::Timeout(timeout, format!("`{name}` to run")));
            }
            if !self.poll.is_zero() {
                std::thread::sleep(self.poll);
            }
        }
    }

    /// Waits until the warm pool holds at least `n` idle workers.
    pub fn wait_pool_idle(&mut self, n: u64, timeout: Duration) -> Result<(), DaemonError> {
        let end = Instant::now() + timeout;
        while self.pool()?["idle"].as_u64().unwrap_or(0) < n {
            if Instant::now() > end {
                return Err(DaemonError::Timeout(timeout, format!("{n} idle workers")));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }

    /// Stops emberd with SIGTERM (SIGKILL after `grace`), waits for it and
    /// returns its exit status.
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let end = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(s)) => return Some(s),
                Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
                _ => {
                    let _ = child.kill();
                    return child.wait().ok();
                }
            }
        }
    }
}

impl Drop for Emberd {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(15));
    }
}

/// The daemon config for `opts`.
pub fn config_text(opts: &Options) -> String {
    let mut t = toml::Table::new();
    let mut plugins = Vec::new();
    if let Some(b) = &opts.base {
        let mut p = toml::Table::new();
        p.insert(
            "path".into(),
            b.plugin.to_string_lossy().into_owned().into(),
        );
        p.insert("config".into(), b.config.clone().into());
        plugins.push(toml::Value::Table(p));
    }
    t.insert("plugins".into(), plugins.into());
    let mut pool = toml::Table::new();
    pool.insert("min_idle".into(), (opts.min_idle as i64).into());
    pool.insert("max_idle".into(), (opts.max_idle as i64).into());
    t.insert("pool".into(), pool.into());
    // The module sandbox is on, as by default; `EMBER_BENCH_SANDBOX=off`
    // turns it off to measure what it costs a launch.
    if std::env::var("EMBER_BENCH_SANDBOX").is_ok_and(|v| v == "off") {
        let mut sandbox = toml::Table::new();
        sandbox.insert("enabled".into(), false.into());
        t.insert("sandbox".into(), sandbox.into());
    }
    toml::to_string(&t).expect("a TOML table serializes")
}

/// The last 40 lines of a log file.
pub fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Whether emberd's worker `pid` really runs a module: it maps an artifact,
/// either the sealed copy an install hands its workers (`memfd:ember-artifact`)
/// or one from the state directory's `artifacts/` (restored modules). Idle
/// workers and a stand-in would map neither.
pub fn runs_module_artifact(pid: u32, state_dir: &Path) -> bool {
    crate::mem::maps_contain(pid, "/memfd:ember-artifact")
        || crate::mem::maps_contain(pid, &state_dir.join("artifacts").to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollouts_are_timed_from_their_replies() {
        let call = Instant::now();
        let reply = |ms: u64, rollout: Value, continues: bool, outcome: &str| MoreReply {
            at: call + Duration::from_millis(ms),
            params: json!({"module": {"name": "g", "rollout": rollout}, "outcome": outcome}),
            continues,
        };
        let ro = |phase: &str, old: u64, new: u64, ready: u64| json!({"phase": phase, "old_replicas": old, "new_replicas": new, "new_ready": ready});
        let replies = [
            reply(2, ro("progressing", 2, 2, 0), true, ""),
            reply(9, ro("draining", 2, 2, 2), true, ""),
            reply(15, ro("stabilizing", 0, 2, 2), true, ""),
            reply(320, Value::Null, false, "completed"),
        ];
        let t = rollout_times(call, &replies, 2);
        assert_eq!(t.done, Duration::from_millis(15));
        assert_eq!(t.cutover, Some(Duration::from_millis(9)));
        assert_eq!(t.total, Duration::from_millis(320));
        assert_eq!(t.outcome, "completed");
        assert_eq!(t.progress.len(), 3);
        assert_eq!(t.progress[2].old_replicas, 0);
        // Aborted: never stabilizing, never every new replica ready.
        let replies = [
            reply(2, ro("progressing", 2, 2, 0), true, ""),
            reply(40, Value::Null, false, "aborted"),
        ];
        let t = rollout_times(call, &replies, 2);
        assert_eq!((t.done, t.cutover), (Duration::from_millis(40), None));
        assert_eq!(t.outcome, "aborted");
    }

    #[test]
    fn config_lists_the_plugin_and_pool() {
        let opts = Options {
            base: Some(Base::catalog(Path::new("/p"), 16)),
            min_idle: 0,
            max_idle: 0,
            ..Options::default()
        };
        let t: toml::Table = toml::from_str(&config_text(&opts)).unwrap();
        assert_eq!(t["plugins"][0]["path"].as_str(), Some("/p/libcatalog.so"));
        assert_eq!(t["plugins"][0]["config"]["size_mb"].as_integer(), Some(16));
        assert_eq!(t["pool"]["max_idle"].as_integer(), Some(0));
    }
}

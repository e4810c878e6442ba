//! Per-module OS resource limits through cgroups.
//!
//! At start-up [`detect`] looks at a cgroup file-system root (normally
//! `/sys/fs/cgroup`) and at `/proc/self/cgroup`, and finds for the memory and
//! the CPU controller where emberd may create cgroups of its own: cgroup v2
//! (the unified hierarchy, at the root or at `unified/` in hybrid mode, with
//! the controller listed in our cgroup's `cgroup.controllers` and delegated
//! to its subtree), else cgroup v1 (a mounted, writable `memory` or `cpu`
//! hierarchy), else nothing. Detection is a pure function of that tree, so it
//! is unit-tested against fake trees.
//!
//! [`Limiter`] then creates only cgroups of its own, below our own cgroup in
//! each hierarchy: a parent `ember-<emberd pid>` and, per instance, a child
//! `<module>.<replica>.<worker pid>` (module names have no `.`), into which
//! the idle worker is moved before its launch order is sent. An instance's
//! cgroup is removed once its worker has exited and been reaped, the parent
//! at a clean shutdown; parents left by a dead emberd (`ember-<pid>` whose
//! pid is gone) are removed at start-up: a worker of it still exiting
//! (its parent-death signal on its way) is killed, and the removal retried
//! until it has gone.
//!
//! Where no memory controller is usable, or an instance got no cgroup, the
//! [memory watch](crate::memwatch) (an emberd thread sampling the worker's
//! private resident memory) enforces `limits.memory` instead.
//!
//! ```
//! use supervisor::cgroup::{detect, Mechanism};
//! let d = detect(std::path::Path::new("/nonexistent"), "0::/\n");
//! assert_eq!(d.memory_mechanism(), Mechanism::PrivateRssWatch);
//! assert_eq!(d.cpu_mechanism(), Mechanism::None);
//! ```

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::memwatch::MemoryWatch;

/// The default cgroup file-system root.
pub const ROOT: &str = "/sys/fs/cgroup";

/// CFS period used for CPU limits, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// What enforces a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mechanism {
    /// A cgroup v2 controller.
    CgroupV2,
    /// A cgroup v1 controller.
    CgroupV1,
    /// emberd's [memory watch](crate::memwatch): the worker's private
    /// resident memory, sampled (memory only).
    PrivateRssWatch,
    /// Nothing.
    None,
}

impl Mechanism {
    /// The name used on the wire and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::CgroupV2 => "cgroup-v2",
            Mechanism::CgroupV1 => "cgroup-v1",
            Mechanism::PrivateRssWatch => "private-rss-watch",
            Mechanism::None => "none",
        }
    }
}

impl std::fmt::Display for Mechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A cgroup version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Legacy, one hierarchy per controller.
    V1,
    /// Unified.
    V2,
}

/// A controller emberd can use: in which version, and the directory (our
/// own cgroup) below which it creates `ember-<pid>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Version.
    pub version: Version,
    /// Our own cgroup's directory in that hierarchy.
    pub base: PathBuf,
    /// In v2 at the root cgroup: the controller must still be enabled in
    /// the root's `cgroup.subtree_control`.
    pub enable_in_base: bool,
}

impl Hierarchy {
    fn mechanism(&self) -> Mechanism {
        match self.version {
            Version::V1 => Mechanism::CgroupV1,
            Version::V2 => Mechanism::CgroupV2,
        }
    }
}

/// What [`detect`] found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Detection {
    /// Where memory limits go.
    pub memory: Option<Hierarchy>,
    /// Where CPU limits go.
    pub cpu: Option<Hierarchy>,
}

impl Detection {
    /// What enforces `limits.memory`.
    pub fn memory_mechanism(&self) -> Mechanism {
        self.memory
            .as_ref()
            .map_or(Mechanism::PrivateRssWatch, Hierarchy::mechanism)
    }

    /// What enforces `limits.cpu`.
    pub fn cpu_mechanism(&self) -> Mechanism {
        self.cpu
            .as_ref()
            .map_or(Mechanism::None, Hierarchy::mechanism)
    }
}

/// A cgroup controller emberd sets limits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    /// `memory`.
    Memory,
    /// `cpu`.
    Cpu,
}

impl Controller {
    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
        }
    }

    /// A file a v1 hierarchy of this controller has.
    fn v1_marker(self) -> &'static str {
        match self {
            Controller::Memory => "memory.limit_in_bytes",
            Controller::Cpu => "cpu.cfs_quota_us",
        }
    }
}

/// Our cgroup path in the v2 hierarchy (`0::/path`) or in the v1 hierarchy
/// of `controller`, from the text of `/proc/self/cgroup`.
fn own_path<'a>(self_cgroup: &'a str, controller: Option<&str>) -> Option<&'a str> {
    self_cgroup.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_id, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = match controller {
            None => ctrls.is_empty(),
            Some(c) => ctrls.split(',').any(|x| x == c),
        };
        hit.then_some(path)
    })
}

fn join_cgroup(mount: &Path, path: &str) -> PathBuf {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        mount.to_path_buf()
    } else {
        mount.join(rel)
    }
}

fn writable(p: &Path) -> bool {
    p.is_dir() && nix::unistd::access(p, nix::unistd::AccessFlags::W_OK).is_ok()
}

fn lists(file: &Path, word: &str) -> bool {
    std::fs::read_to_string(file).is_ok_and(|s| s.split_whitespace().any(|w| w == word))
}

/// Finds, per controller, where emberd can create its cgroups. `root` is
/// the cgroup file-system root (`/sys/fs/cgroup`), `self_cgroup` the text of
/// `/proc/self/cgroup`. cgroup v2 is preferred to v1.
pub fn detect(root: &Path, self_cgroup: &str) -> Detection {
    let pick =
        |c: Controller| detect_v2(root, self_cgroup, c).or_else(|| detect_v1(root, self_cgroup, c));
    Detection {
        memory: pick(Controller::Memory),
        cpu: pick(Controller::Cpu),
    }
}

fn detect_v2(root: &Path, self_cgroup: &str, c: Controller) -> Option<Hierarchy> {
    let mount = [root.to_path_buf(), root.join("unified")]
        .into_iter()
        .find(|m| m.join("cgroup.controllers").is_file())?;
    let path = own_path(self_cgroup, None)?;
    let base = join_cgroup(&mount, path);
    if !lists(&base.join("cgroup.controllers"), c.name()) || !writable(&base) {
        return None;
    }
    // Below a non-root cgroup the controller must already be delegated to
    // the subtree (we may not enable it there: our cgroup holds processes).
    let at_root = base == mount;
    let delegated = lists(&base.join("cgroup.subtree_control"), c.name());
    (delegated || at_root).then_some(Hierarchy {
        version: Version::V2,
        base,
        enable_in_base: at_root && !delegated,
    })
}

fn detect_v1(root: &Path, self_cgroup: &str, c: Controller) -> Option<Hierarchy> {
    let mount = root.join(c.name());
    if !mount.join(c.v1_marker()).is_file() {
        return None;
    }
    let path = own_path(self_cgroup, Some(c.name())).unwrap_or("/");
    let base = join_cgroup(&mount, path);
    (base.join(c.v1_marker()).is_file() && writable(&base)).then_some(Hierarchy {
        version: Version::V1,
        base,
        enable_in_base: false,
    })
}

/// The limits of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Limits {
    /// `limits.memory`, bytes.
    pub memory: Option<u64>,
    /// `limits.cpu`, cores.
    pub cpu: Option<f64>,
    /// Descriptor cap (`RLIMIT_NOFILE`, from the daemon configuration's
    /// `limits.open_files`); not a cgroup setting.
    pub open_files: Option<u64>,
}

/// The name of emberd's parent cgroup.
pub fn parent_name(pid: u32) -> String {
    format!("ember-{pid}")
}

/// The pid in a parent cgroup's name, if it is one of ours.
pub fn parse_parent_name(name: &str) -> Option<i32> {
    let digits = name.strip_prefix("ember-")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The name of one instance's cgroup.
pub fn instance_name(module: &str, replica: u32, pid: i32) -> String {
    format!("{module}.{replica}.{pid}")
}

/// CFS quota for `cores`, in microseconds per [`CPU_PERIOD_US`] (at least
/// 1 ms, the kernel's minimum).
pub fn cpu_quota_us(cores: f64) -> u64 {
    ((cores * CPU_PERIOD_US as f64).round() as u64).max(1000)
}

/// The files to write, in order, to apply `limits` to a cgroup of
/// `version` for `controller`: (file name, value).
pub fn settings(
    version: Version,
    controller: Controller,
    limits: &Limits,
) -> Vec<(&'static str, String)> {
    match (version, controller) {
        (Version::V2, Controller::Memory) => limits
            .memory
            .map(|b| {
                vec![
                    ("memory.max", b.to_string()),
                    ("memory.swap.max", "0".into()),
                ]
            })
            .unwrap_or_default(),
        (Version::V2, Controller::Cpu) => limits
            .cpu
            .map(|c| vec![("cpu.max", format!("{} {CPU_PERIOD_US}", cpu_quota_us(c)))])
            .unwrap_or_default(),
        (Version::V1, Controller::Memory) => limits
            .memory
            .map(|b| {
                vec![
                    ("memory.limit_in_bytes", b.to_string()),
                    ("memory.memsw.limit_in_bytes", b.to_string()),
                ]
            })
            .unwrap_or_default(),
        (Version::V1, Controller::Cpu) => limits
            .cpu
            .map(|c| {
                vec![
                    ("cpu.cfs_period_us", CPU_PERIOD_US.to_string()),
                    ("cpu.cfs_quota_us", cpu_quota_us(c).to_string()),
                ]
            })
            .unwrap_or_default(),
    }
}

/// The number of OOM kills recorded in a cgroup's `memory.events` (v2) or
/// `memory.oom_control` (v1): the value of its `oom_kill` line.
pub fn parse_oom_kills(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("oom_kill")).then(|| w.next()?.parse().ok())?
    })
}

/// Optional settings: a kernel without swap accounting has no such file.
fn optional(file: &str) -> bool {
    matches!(file, "memory.swap.max" | "memory.memsw.limit_in_bytes")
}

/// Creating an instance's cgroup failed.
#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}")]
pub struct CgroupError {
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> CgroupError + '_ {
    move |source| CgroupError {
        path: path.to_path_buf(),
        source,
    }
}

/// emberd's cgroups: what was detected and the parents it created; and
/// the memory watch for instances whose memory limit no cgroup holds.
#[derive(Debug)]
pub struct Limiter {
    detection: Detection,
    /// Our parent cgroup per usable hierarchy (one for v2, up to two in v1).
    parents: Vec<(Controller, Version, PathBuf)>,
    /// Parents of dead emberds still to remove.
    stale: Vec<PathBuf>,
    memory_watch: MemoryWatch,
}

impl Limiter {
    /// A limiter that enforces nothing (the fallback everywhere).
    pub fn disabled() -> Self {
        Self {
            detection: Detection::default(),
            parents: Vec::new(),
            stale: Vec::new(),
            memory_watch: MemoryWatch::new(),
        }
    }

    /// Detects under `root`, removes stale parents of dead emberds and
    /// creates ours (`ember-<pid>`). A controller whose parent cannot be
    /// created is dropped (and logged).
    pub fn start(root: &Path, self_cgroup: &str, pid: u32) -> Self {
        let mut detection = detect(root, self_cgroup);
        let mut parents: Vec<(Controller, Version, PathBuf)> = Vec::new();
        let mut stale = Vec::new();
        for c in [Controller::Memory, Controller::Cpu] {
            let slot = match c {
                Controller::Memory => &mut detection.memory,
                Controller::Cpu => &mut detection.cpu,
            };
            let Some(h) = slot.clone() else { continue };
            stale.extend(remove_stale(&h.base, pid));
            let dir = h.base.join(parent_name(pid));
            let made = (|| -> Result<(), CgroupError> {
                if h.enable_in_base {
                    let f = h.base.join("cgroup.subtree_control");
                    std::fs::write(&f, format!("+{}", c.name())).map_err(io_at(&f))?;
                }
                match std::fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_at(&dir)(e)),
                }
                if h.version == Version::V2 {
                    let f = dir.join("cgroup.subtree_control");
                    std::fs::write(&f, format!("+{}", c.name())).map_err(io_at(&f))?;
                }
                Ok(())
            })();
            match made {
                Ok(()) => parents.push((c, h.version, dir)),
                Err(e) => {
                    tracing::warn!(controller = c.name(), error = %crate::error_chain(&e), "cgroup unusable; falling back");
                    let _ = std::fs::remove_dir(&dir);
                    *slot = None;
                }
            }
        }
        Self {
            detection,
            parents,
            stale,
            memory_watch: MemoryWatch::new(),
        }
    }

    /// Parents of dead emberds that [`Limiter::start`] could not remove
    /// yet (a worker was still exiting): retry with
    /// [`remove_stale_parent`].
    pub fn stale(&self) -> &[PathBuf] {
        &self.stale
    }

    /// What was detected (and is in use).
    pub fn detection(&self) -> &Detection {
        &self.detection
    }

    /// The memory watch: enforces `limits.memory` for the instances whose
    /// cgroup does not ([`Instance::enforces_memory`]).
    pub fn memory_watch(&self) -> &MemoryWatch {
        &self.memory_watch
    }

    /// The cgroup directories of one instance, one per hierarchy in use.
    pub fn instance_dirs(&self, module: &str, replica: u32, pid: i32) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for (_, _, parent) in &self.parents {
            let d = parent.join(instance_name(module, replica, pid));
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
        dirs
    }

    /// The name of an idle worker's cgroup.
    fn idle_name(pid: i32) -> String {
        format!("idle.{pid}")
    }

    /// Puts a fresh idle worker into a cgroup of its own (`idle.<pid>`),
    /// ahead of any launch; [`Limiter::enter`] then only renames the
    /// directory and writes the limits.
    ///
    /// A parent attaching a process (writing its pid to `cgroup.procs`)
    /// takes the kernel's global threadgroup lock, which waits for an RCU
    /// grace period: 5 to 15 ms on this project's VMs, the tail of a launch
    /// that found no idle worker. A single-threaded process that moves its
    /// own thread does not (Linux 5.19 and later). So in a v1 hierarchy
    /// this returns the cgroup's `tasks` file, opened for writing, for the
    /// worker to join itself (`ToWorker::JoinCgroups`, before anything
    /// else it is sent); in a v2 hierarchy, where a thread cannot move
    /// between domain cgroups on its own, emberd attaches it here.
    pub fn adopt(&self, pid: i32) -> Result<Vec<OwnedFd>, CgroupError> {
        let mut join: Vec<OwnedFd> = Vec::new();
        let mut done: Vec<PathBuf> = Vec::new();
        for (_, version, parent) in &self.parents {
            let dir = parent.join(Self::idle_name(pid));
            if done.contains(&dir) {
                continue;
            }
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_at(&dir)(e)),
            }
            let attached = match version {
                Version::V1 => {
                    let f = dir.join("tasks");
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&f)
                        .map(|file| join.push(OwnedFd::from(file)))
                        .map_err(io_at(&f))
                }
                Version::V2 => {
                    let f = dir.join("cgroup.procs");
                    std::fs::write(&f, pid.to_string()).map_err(io_at(&f))
                }
            };
            if let Err(e) = attached {
                let _ = std::fs::remove_dir(&dir);
                return Err(e);
            }
            done.push(dir);
        }
        Ok(join)
    }

    /// Removes the cgroup of an idle worker that died or was discarded
    /// before any launch (it must have exited).
    pub fn release_idle(&self, pid: i32) {
        for (_, _, parent) in &self.parents {
            let _ = std::fs::remove_dir(parent.join(Self::idle_name(pid)));
        }
    }

    /// Creates the instance's cgroup(s) (or renames the idle worker's, see
    /// [`Limiter::adopt`]), sets `limits` and moves `pid` into it: a worker
    /// that was not adopted (forked for a launch that was waiting) joins a
    /// v1 cgroup by itself, through the `tasks` files
    /// [`Instance::take_join`] hands out, which the caller sends it
    /// (`ToWorker::JoinCgroups`) before the launch order; emberd attaches it
    /// to a v2 cgroup here. On error what was created is removed again.
    pub fn enter(
        &self,
        module: &str,
        replica: u32,
        pid: i32,
        limits: &Limits,
    ) -> Result<Instance, CgroupError> {
        if let Some(n) = limits.open_files {
            // Not a cgroup setting, but the same moment: the worker is idle
            // and runs no module code yet. A failure leaves the inherited
            // limit (and the cgroup limits still apply).
            if let Err(e) = set_open_files(pid, n) {
                tracing::warn!(pid, open_files = n, error = %e, "cannot set the descriptor limit");
            }
        }
        let mut inst = Instance {
            dirs: Vec::new(),
            memory: None,
            limit: limits.memory,
            join: Vec::new(),
        };
        let name = instance_name(module, replica, pid);
        // Directories the worker is already in (adopted while idle), and
        // the hierarchy of each one made here.
        let mut joined: Vec<PathBuf> = Vec::new();
        let mut made: Vec<(PathBuf, Version)> = Vec::new();
        for (c, version, parent) in &self.parents {
            let dir = parent.join(&name);
            if !inst.dirs.contains(&dir) {
                let idle = parent.join(Self::idle_name(pid));
                if std::fs::rename(&idle, &dir).is_ok() {
                    joined.push(dir.clone());
                } else {
                    std::fs::create_dir(&dir).map_err(io_at(&dir))?;
                    made.push((dir.clone(), *version));
                }
                inst.dirs.push(dir.clone());
            }
            for (file, value) in settings(*version, *c, limits) {
                let f = dir.join(file);
                match std::fs::write(&f, &value) {
                    Ok(()) => {}
                    Err(_) if optional(file) => {}
                    Err(e) => {
                        inst.remove();
                        return Err(io_at(&f)(e));
                    }
                }
            }
            if *c == Controller::Memory {
                inst.memory = Some((*version, dir));
            }
        }
        for (dir, version) in made {
            let attached = match version {
                Version::V1 => {
                    let f = dir.join("tasks");
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&f)
                        .map(|file| inst.join.push(OwnedFd::from(file)))
                        .map_err(io_at(&f))
                }
                Version::V2 => {
                    let f = dir.join("cgroup.procs");
                    std::fs::write(&f, pid.to_string()).map_err(io_at(&f))
                }
            };
            if let Err(e) = attached {
                inst.join.clear();
                inst.remove();
                return Err(e);
            }
        }
        Ok(inst)
    }

    /// Changes the limits of a running instance (`UpdateContainer`): the
    /// settings of `limits` that are set, written to its cgroups. A limit
    /// no cgroup of this emberd holds cannot be changed while it runs.
    pub fn update(
        &self,
        module: &str,
        replica: u32,
        pid: i32,
        limits: &Limits,
    ) -> Result<(), CgroupError> {
        let name = instance_name(module, replica, pid);
        for (wanted, c) in [
            (limits.memory.is_some(), Controller::Memory),
            (limits.cpu.is_some(), Controller::Cpu),
        ] {
            if !wanted {
                continue;
            }
            let Some((_, version, parent)) = self.parents.iter().find(|(k, _, _)| *k == c) else {
                return Err(CgroupError {
                    path: PathBuf::from(name.clone()),
                    source: std::io::Error::other(format!(
                        "no {} cgroup controller is in use",
                        c.name()
                    )),
                });
            };
            let dir = parent.join(&name);
            let write = |files: &[(&'static str, String)]| -> Result<(), CgroupError> {
                for (file, value) in files {
                    let f = dir.join(file);
                    match std::fs::write(&f, value) {
                        Ok(()) => {}
                        Err(_) if optional(file) => {}
                        Err(e) => return Err(io_at(&f)(e)),
                    }
                }
                Ok(())
            };
            let mut files = settings(*version, c, limits);
            // v1 keeps memory.limit_in_bytes at most memory.memsw's: a
            // raise writes memsw first.
            if write(&files).is_err() {
                files.reverse();
                write(&files)?;
            }
        }
        Ok(())
    }

    /// Removes our parents (and any empty instance cgroups left in them).
    pub fn shutdown(&self) {
        for (_, _, parent) in &self.parents {
            if parent.exists() {
                remove_tree(parent);
            }
        }
    }
}

/// One instance's cgroups.
#[derive(Debug)]
pub struct Instance {
    dirs: Vec<PathBuf>,
    memory: Option<(Version, PathBuf)>,
    limit: Option<u64>,
    /// `tasks` files of v1 cgroups the worker is still to join.
    join: Vec<OwnedFd>,
}

impl Instance {
    /// The `tasks` files (v1) of the cgroups the worker is to join by
    /// itself before its launch order (`ToWorker::JoinCgroups`); empty
    /// when it is in them already.
    pub fn take_join(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.join)
    }

    /// Whether a memory limit is set on this instance's cgroup (the kernel
    /// enforces it; the memory watch need not).
    pub fn enforces_memory(&self) -> bool {
        self.memory.is_some() && self.limit.is_some()
    }

    /// If the kernel OOM-killed a process of this cgroup: a reason naming
    /// the mechanism and the limit.
    pub fn oom_reason(&self) -> Option<String> {
        let (version, dir) = self.memory.as_ref()?;
        let (file, mechanism) = match version {
            Version::V2 => ("memory.events", Mechanism::CgroupV2),
            Version::V1 => ("memory.oom_control", Mechanism::CgroupV1),
        };
        let text = std::fs::read_to_string(dir.join(file)).ok()?;
        let kills = parse_oom_kills(&text).unwrap_or(0);
        (kills > 0).then(|| oom_reason(mechanism, self.limit))
    }

    /// Removes the directories; true once none is left (they can be
    /// removed only once no process is in them).
    pub fn remove(&mut self) -> bool {
        self.dirs
            .retain(|d| std::fs::remove_dir(d).is_err() && d.exists());
        self.dirs.is_empty()
    }
}

/// Sets `pid`'s soft and hard `RLIMIT_NOFILE` to `n`, or to its hard limit
/// if that is lower (raising it needs privileges and is not what a cap
/// is for).
pub fn set_open_files(pid: i32, n: u64) -> std::io::Result<()> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit only reads `new` (null: none) and writes `old`, a
    // valid, exclusively borrowed rlimit on our stack; `pid` is a plain
    // number (a wrong one fails with ESRCH/EPERM).
    if unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let cap = (n as libc::rlim_t).min(old.rlim_max);
    let new = libc::rlimit {
        rlim_cur: cap,
        rlim_max: cap,
    };
    // SAFETY: as above; `new` is a valid rlimit on our stack, `old` is not
    // asked for (null).
    if unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &new, std::ptr::null_mut()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The failure reason for a kill by a cgroup memory limit.
pub fn oom_reason(mechanism: Mechanism, limit: Option<u64>) -> String {
    let limit = limit.map_or_else(|| "its".to_owned(), |b| format!("the {} MiB", b >> 20));
    format!("MemoryLimitExceeded: OOM-killed by the kernel at {limit} memory limit ({mechanism}, limits.memory)")
}

/// Removes `dir` and the empty cgroups directly below it.
fn remove_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
    if let Err(e) = std::fs::remove_dir(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove cgroup");
    }
}

fn alive(pid: i32) -> bool {
    !matches!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
        Err(nix::errno::Errno::ESRCH)
    )
}

/// Removes `ember-<pid>` parents below `base` whose emberd is dead; returns
/// those that could not be removed yet. A worker of a dead emberd may still
/// be exiting (its parent-death signal is on its way) when the next emberd
/// starts: each process left in such a cgroup is sent SIGKILL, and the
/// caller retries the removal with [`remove_stale_parent`].
fn remove_stale(base: &Path, own: u32) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut left = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(parse_parent_name) else {
            continue;
        };
        if pid as u32 == own || pid <= 0 || alive(pid) {
            continue;
        }
        tracing::info!(dir = %e.path().display(), "removing stale cgroup of a dead emberd");
        if !remove_stale_parent(&e.path()) {
            left.push(e.path());
        }
    }
    left
}

/// Kills what is left in a dead emberd's parent cgroup `dir` (its workers
/// only ever run there) and removes it with the empty cgroups below it;
/// true once it is gone.
pub fn remove_stale_parent(dir: &Path) -> bool {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        {
            let procs = std::fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = std::fs::remove_dir(e.path());
        }
    }
    std::fs::remove_dir(dir).is_ok() || !dir.exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tree(PathBuf);

    impl Tree {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "ember-cg-test-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Tree(p)
        }
        fn file(&self, rel: &str, text: &str) {
            let f = self.0.join(rel);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, text).unwrap();
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const HYBRID: &str = "4:memory:/svc/x\n1:cpu,cpuacct:/\n0::/\n";

    #[test]
    fn v2_with_controllers_at_root() {
        let t = Tree::new("v2");
        t.file("cgroup.controllers", "cpuset cpu io memory pids\n");
        t.file("cgroup.subtree_control", "\n");
        let d = detect(&t.0, "0::/\n");
        assert_eq!(d.memory_mechanism(), Mechanism::CgroupV2);
        assert_eq!(d.cpu_mechanism(), Mechanism::CgroupV2);
        let m = d.memory.unwrap();
        assert_eq!(m.base, t.0);
        assert!(m.enable_in_base);
    }

    #[test]
    fn v2_delegated_subtree() {
        let t = Tree::new("v2d");
        t.file("cgroup.controllers", "cpu memory\n");
        t.file("app/ember.service/cgroup.controllers", "memory\n");
        t.file("app/ember.service/cgroup.subtree_control", "memory\n");
        let d = detect(&t.0, "0::/app/ember.service\n");
        let m = d.memory.clone().unwrap();
        assert_eq!(m.base, t.0.join("app/ember.service"));
        assert!(!m.enable_in_base);
        // cpu is not available to our cgroup: no v1 either.
        assert_eq!(d.cpu_mechanism(), Mechanism::None);
    }

    #[test]
    fn v2_not_delegated_falls_back() {
        let t = Tree::new("v2n");
        t.file("cgroup.controllers", "memory\n");
        t.file("app/cgroup.controllers", "memory\n");
        t.file("app/cgroup.subtree_control", "\n");
        let d = detect(&t.0, "0::/app\n");
        assert_eq!(d.memory_mechanism(), Mechanism::PrivateRssWatch);
    }

    #[test]
    fn v1_only_hybrid_without_v2_controllers() {
        let t = Tree::new("v1");
        t.file("unified/cgroup.controllers", "\n");
        t.file("memory/memory.limit_in_bytes", "max\n");
        t.file("memory/svc/x/memory.limit_in_bytes", "max\n");
        t.file("cpu/cpu.cfs_quota_us", "-1\n");
        let d = detect(&t.0, HYBRID);
        assert_eq!(d.memory_mechanism(), Mechanism::CgroupV1);
        assert_eq!(d.cpu_mechanism(), Mechanism::CgroupV1);
        assert_eq!(d.memory.unwrap().base, t.0.join("memory/svc/x"));
        assert_eq!(d.cpu.unwrap().base, t.0.join("cpu"));
    }

    #[test]
    fn nothing() {
        let t = Tree::new("none");
        let d = detect(&t.0, HYBRID);
        assert_eq!(d, Detection::default());
        assert_eq!(d.memory_mechanism(), Mechanism::PrivateRssWatch);
        assert_eq!(d.cpu_mechanism(), Mechanism::None);
        assert_eq!(
            serde_json::to_value(Mechanism::PrivateRssWatch).unwrap(),
            "private-rss-watch"
        );
    }

    #[test]
    fn names() {
        assert_eq!(parent_name(42), "ember-42");
        assert_eq!(parse_parent_name("ember-42"), Some(42));
        assert_eq!(parse_parent_name("ember-"), None);
        assert_eq!(parse_parent_name("ember-4x"), None);
        assert_eq!(parse_parent_name("emberd-4"), None);
        assert_eq!(instance_name("kv", 1, 77), "kv.1.77");
    }

    #[test]
    fn values() {
        let l = Limits {
            memory: Some(64 << 20),
            cpu: Some(0.5),
            open_files: None,
        };
        assert_eq!(
            settings(Version::V2, Controller::Memory, &l),
            vec![
                ("memory.max", "67108864".into()),
                ("memory.swap.max", "0".into())
            ]
        );
        assert_eq!(
            settings(Version::V2, Controller::Cpu, &l),
            vec![("cpu.max", "50000 100000".into())]
        );
        assert_eq!(
            settings(Version::V1, Controller::Memory, &l)[0],
            ("memory.limit_in_bytes", "67108864".into())
        );
        assert_eq!(
            settings(Version::V1, Controller::Cpu, &l),
            vec![
                ("cpu.cfs_period_us", "100000".into()),
                ("cpu.cfs_quota_us", "50000".into())
            ]
        );
        assert!(settings(Version::V1, Controller::Cpu, &Limits::default()).is_empty());
        assert_eq!(cpu_quota_us(0.001), 1000);
        assert_eq!(cpu_quota_us(2.0), 200_000);
    }

    #[test]
    fn oom_counts() {
        assert_eq!(
            parse_oom_kills("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 0\n"),
            Some(1)
        );
        assert_eq!(
            parse_oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"),
            Some(3)
        );
        assert_eq!(parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n"), None);
        assert!(oom_reason(Mechanism::CgroupV1, Some(64 << 20)).contains("64 MiB"));
    }

    #[test]
    fn limiter_on_a_fake_v1_tree() {
        let t = Tree::new("lim");
        t.file("memory/memory.limit_in_bytes", "max\n");
        // A stale parent of a dead emberd, and a foreign directory.
        t.file("memory/ember-999999999/kv.0.5/memory.limit_in_bytes", "");
        std::fs::remove_file(t.0.join("memory/ember-999999999/kv.0.5/memory.limit_in_bytes"))
            .unwrap();
        std::fs::create_dir_all(t.0.join("memory/other")).unwrap();
        let l = Limiter::start(&t.0, "4:memory:/\n0::/\n", 7);
        assert!(!t.0.join("memory/ember-999999999").exists());
        assert!(t.0.join("memory/other").exists());
        assert!(t.0.join("memory/ember-7").is_dir());
        assert_eq!(
            l.instance_dirs("kv", 0, 5),
            vec![t.0.join("memory/ember-7/kv.0.5")]
        );
        // v1: adopting opens the idle cgroup's `tasks` file for the worker
        // to join itself; emberd writes no pid.
        t.file("memory/ember-7/idle.6/tasks", "");
        let tasks = l.adopt(6).unwrap();
        assert_eq!(tasks.len(), 1);
        nix::unistd::write(&tasks[0], b"0").unwrap();
        assert_eq!(
            std::fs::read_to_string(t.0.join("memory/ember-7/idle.6/tasks")).unwrap(),
            "0"
        );
        // Without the file (not a cgroup), the error names it and the
        // directory made for it is removed again.
        let e = l.adopt(8).unwrap_err();
        assert_eq!(e.path, t.0.join("memory/ember-7/idle.8/tasks"));
        assert!(!t.0.join("memory/ember-7/idle.8").exists());
        drop(tasks);
        // An adopted worker's cgroup is renamed: it is in it already, and
        // has nothing to join.
        let none = Limits {
            memory: None,
            cpu: None,
            open_files: None,
        };
        let mut inst = l.enter("kv", 0, 6, &none).unwrap();
        assert!(inst.take_join().is_empty());
        assert!(t.0.join("memory/ember-7/kv.0.6/tasks").is_file());
        std::fs::remove_file(t.0.join("memory/ember-7/kv.0.6/tasks")).unwrap();
        assert!(inst.remove());
        // One that was not adopted gets a new directory, whose `tasks` file
        // it is handed to join by itself (here: none, not a cgroup, so the
        // error names it and the directory is removed).
        let e = l.enter("kv", 1, 9, &none).unwrap_err();
        assert_eq!(e.path, t.0.join("memory/ember-7/kv.1.9/tasks"));
        assert!(!t.0.join("memory/ember-7/kv.1.9").exists());
        l.shutdown();
        assert!(!t.0.join("memory/ember-7").exists());
    }
}

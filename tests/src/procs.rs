//! Processes seen through `/proc`: a daemon's children, and the zygote and
//! workers an `emberd` started (which name it in their command line), to
//! prove none outlives it and none is left over after a release.

/// Whether `pid` runs and is not a zombie.
fn alive(pid: i32) -> bool {
    !crate::daemon::dead(pid)
}

/// The parent pid of `pid`, if it exists.
pub fn ppid(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // pid (comm) state ppid …
    s.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Every live (not zombie) process.
fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|&p| alive(p))
                .collect()
        })
        .unwrap_or_default()
}

/// Live children of `parent`. emberd's are its zygote and every worker
/// (re-parented to it, a child subreaper, from the zygote's intermediate
/// process).
pub fn children_of(parent: i32) -> Vec<i32> {
    all_pids()
        .into_iter()
        .filter(|&p| ppid(p) == Some(parent))
        .collect()
}

/// Live processes started for the `emberd` whose pid was `emberd`: its
/// zygote and the workers forked from it run `emberd-zygote --zygote FD
/// EMBERD_PID`, so they are found even once emberd is gone.
pub fn zygote_family(emberd: i32) -> Vec<i32> {
    let me = emberd.to_string();
    all_pids()
        .into_iter()
        .filter(|p| {
            let Ok(raw) = std::fs::read(format!("/proc/{p}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = raw.split(|&b| b == 0).filter(|a| !a.is_empty()).collect();
            args.first() == Some(&&b"emberd-zygote"[..]) && args.last() == Some(&me.as_bytes())
        })
        .collect()
}

/// Reaps the zombies of zygotes and workers that were handed to this
/// process (a child subreaper) when their emberd was killed: children of
/// ours named `ember-zygote`, `ember-worker` or `ember: …`, never the `emberd`
/// processes other tests hold a `Child` for.
pub fn reap_orphans() {
    let me = std::process::id() as i32;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for pid in dir
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
    {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // Workers rename themselves `ember: warm` / `ember: NAME@VERSION#N`.
        let comm = comm.trim();
        let ours = matches!(comm, "ember-zygote" | "ember-worker") || comm.starts_with("ember: ");
        if ours && ppid(pid) == Some(me) && crate::daemon::dead(pid) {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}

/// How many descriptors `pid` has open (`/proc/PID/fd`).
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// `pid`'s resident set in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

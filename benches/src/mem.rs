//! Memory figures from `/proc`: per process (`smaps_rollup`, `status`) and
//! for the host (`meminfo`).

use std::time::Duration;

/// Resident, proportional and unique set sizes of one process, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rollup {
    /// Resident set.
    pub rss_kib: u64,
    /// Proportional set (shared pages divided among their sharers).
    pub pss_kib: u64,
    /// Unique set: private clean + private dirty + private hugetlb.
    pub uss_kib: u64,
}

fn field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Parses the text of `/proc/PID/smaps_rollup`.
pub fn parse_rollup(text: &str) -> Rollup {
    let f = |n| field(text, n).unwrap_or(0);
    Rollup {
        rss_kib: f("Rss"),
        pss_kib: f("Pss"),
        uss_kib: f("Private_Clean") + f("Private_Dirty") + f("Private_Hugetlb"),
    }
}

/// `/proc/PID/smaps_rollup` of `pid`.
pub fn rollup(pid: u32) -> std::io::Result<Rollup> {
    Ok(parse_rollup(&std::fs::read_to_string(format!(
        "/proc/{pid}/smaps_rollup"
    ))?))
}

/// Page tables of `pid` (`VmPTE`), in KiB.
pub fn page_tables_kib(pid: u32) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(field(&text, "VmPTE").unwrap_or(0))
}

/// Threads of `pid`.
pub fn threads(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// A `/proc/meminfo` field in KiB (e.g. `MemAvailable`).
pub fn meminfo_kib(name: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| field(&t, name))
        .unwrap_or(0)
}

/// `MemAvailable` after letting the system settle: the median of 5 samples
/// 100 ms apart.
pub fn settled_available_kib() -> u64 {
    let mut v: Vec<u64> = (0..5)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(100));
            meminfo_kib("MemAvailable")
        })
        .collect();
    v.sort_unstable();
    v[2]
}

/// Kernel memory that grows with each process: page tables and kernel
/// stacks (`PageTables` + `KernelStack` in `/proc/meminfo`), in KiB.
/// Unlike `MemAvailable` it barely moves when unrelated processes (a
/// compiler, the page cache) come and go, so its delta over a launch is
/// a usable per-process figure on a busy machine.
pub fn kernel_per_process_kib() -> u64 {
    meminfo_kib("PageTables") + meminfo_kib("KernelStack")
}

/// Shared memory (memfd/tmpfs pages) the kernel holds, in KiB: data a
/// process created in a memfd (such as a plugin table built with
/// `share_from_fn`) and has not touched through a mapping since shows in no
/// process's RSS, only here.
pub fn shmem_kib() -> u64 {
    meminfo_kib("Shmem")
}

/// Whether `pid` maps a file whose path contains `needle` (e.g. whether a
/// worker really loaded a module `cdylib`).
pub fn maps_contain(pid: u32, needle: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.contains(needle))
}

/// Whether `pid` still exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rfind(')')
            .and_then(|i| s[i + 1..].split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rollup() {
        let text = "55d0c-7ffd [rollup]\nRss:  2048 kB\nPss:  1024 kB\nPss_Anon: 512 kB\nPrivate_Clean: 256 kB\nPrivate_Dirty: 512 kB\nPrivate_Hugetlb: 0 kB\n";
        assert_eq!(
            parse_rollup(text),
            Rollup {
                rss_kib: 2048,
                pss_kib: 1024,
                uss_kib: 768
            }
        );
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        let r = rollup(me).unwrap();
        assert!(r.uss_kib > 0 && r.uss_kib <= r.rss_kib);
        assert!(alive(me));
        assert!(meminfo_kib("MemTotal") > 0);
    }
}

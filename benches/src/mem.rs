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

/// Where a process's unique pages are, by kind of mapping, in KiB
/// (`Private_Clean + Private_Dirty` of each mapping in `/proc/PID/smaps`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UssBreakdown {
    /// The module's own image (`/memfd:ember-artifact`).
    pub module_image: u64,
    /// The shared runtime of slim modules (`libstd-*.so`, `libember_sdk*.so`).
    pub runtime_libs: u64,
    /// Other files: the executable the process was forked from (emberd, a
    /// benchmark) and the plugins, i.e. the base's data written after the
    /// fork.
    pub base_image: u64,
    /// System libraries (`/lib`, `/usr/lib`: libc, the dynamic loader,
    /// libgcc).
    pub system_libs: u64,
    /// The main heap (`[heap]`).
    pub heap: u64,
    /// The main thread's stack (`[stack]`).
    pub stack: u64,
    /// Anonymous mappings: other threads' stacks, malloc arenas, TLS blocks.
    pub anon: u64,
    /// Anything else (other memfds, shared-memory segments, `[vdso]`).
    pub other: u64,
}

impl UssBreakdown {
    /// The sum: the process's USS.
    pub fn total(&self) -> u64 {
        self.module_image
            + self.runtime_libs
            + self.base_image
            + self.system_libs
            + self.heap
            + self.stack
            + self.anon
            + self.other
    }

    /// Adds `other`, field by field.
    pub fn add(&mut self, other: &UssBreakdown) {
        self.module_image += other.module_image;
        self.runtime_libs += other.runtime_libs;
        self.base_image += other.base_image;
        self.system_libs += other.system_libs;
        self.heap += other.heap;
        self.stack += other.stack;
        self.anon += other.anon;
        self.other += other.other;
    }

    /// `(name, KiB)` for each field.
    pub fn fields(&self) -> [(&'static str, u64); 8] {
        [
            ("module_image", self.module_image),
            ("runtime_libs", self.runtime_libs),
            ("base_image", self.base_image),
            ("system_libs", self.system_libs),
            ("heap", self.heap),
            ("stack", self.stack),
            ("anon", self.anon),
            ("other", self.other),
        ]
    }
}

/// Parses the text of `/proc/PID/smaps` into a [`UssBreakdown`].
pub fn parse_smaps(text: &str) -> UssBreakdown {
    let mut b = UssBreakdown::default();
    let mut slot: Option<&mut u64> = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: `start-end perms offset dev inode [name]`.
            let name = words.nth(4).unwrap_or("");
            let file = name.rsplit('/').next().unwrap_or(name);
            slot = Some(if name.starts_with("/memfd:ember-artifact") {
                &mut b.module_image
            } else if file.starts_with("libstd-") || file.starts_with("libember_sdk") {
                &mut b.runtime_libs
            } else if name == "[heap]" {
                &mut b.heap
            } else if name == "[stack]" {
                &mut b.stack
            } else if name.is_empty() {
                &mut b.anon
            } else if name.starts_with("/memfd:") || !name.starts_with('/') {
                &mut b.other
            } else if ["/lib/", "/lib64/", "/usr/lib/", "/usr/lib64/"]
                .iter()
                .any(|p| name.starts_with(p))
            {
                &mut b.system_libs
            } else {
                &mut b.base_image
            });
            continue;
        }
        if first == "Private_Clean:" || first == "Private_Dirty:" {
            let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if let Some(s) = slot.as_deref_mut() {
                *s += kib;
            }
        }
    }
    b
}

/// [`parse_smaps`] of `/proc/PID/smaps`.
pub fn uss_breakdown(pid: u32) -> std::io::Result<UssBreakdown> {
    Ok(parse_smaps(&std::fs::read_to_string(format!(
        "/proc/{pid}/smaps"
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
    fn parses_smaps_by_kind() {
        let text = "\
7f00-7f01 r-xp 00000000 00:01 5 /memfd:ember-artifact (deleted)
Private_Clean:        8 kB
Private_Dirty:        4 kB
7f02-7f03 rw-p 00000000 08:01 7 /home/u/target/release/libember_sdk.so
Private_Dirty:       12 kB
7f04-7f05 rw-p 00000000 08:01 9 /usr/lib/x86_64-linux-gnu/libc.so.6
Private_Dirty:        8 kB
5500-5501 rw-p 00000000 08:01 3 /usr/local/bin/emberd
Private_Dirty:       16 kB
5600-5700 rw-p 00000000 00:00 0                          [heap]
Private_Dirty:       40 kB
7f06-7f07 rw-p 00000000 00:00 0 
Private_Dirty:       20 kB
7ffc-7ffd rw-p 00000000 00:00 0                          [stack]
Private_Dirty:       24 kB
7f08-7f09 rw-s 00000000 00:01 11 /memfd:ember-ring (deleted)
Private_Dirty:        4 kB
";
        let b = parse_smaps(text);
        assert_eq!(
            b,
            UssBreakdown {
                module_image: 12,
                runtime_libs: 12,
                base_image: 16,
                system_libs: 8,
                heap: 40,
                stack: 24,
                anon: 20,
                other: 4,
            }
        );
        assert_eq!(b.total(), 136);
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

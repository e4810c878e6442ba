//! Per-process metrics from `/proc`: memory from `smaps_rollup`, CPU from
//! `stat`.
//!
//! Not through `sysinfo`: it has RSS and CPU but no PSS or USS (the numbers
//! that show what copy-on-write sharing saves), and refreshing one process
//! through it reads more of `/proc` than these two files.

use std::path::PathBuf;

use serde::Serialize;

/// Memory of one process, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Memory {
    /// Resident set size.
    pub rss: u64,
    /// Proportional set size (shared pages divided among sharers).
    pub pss: u64,
    /// Unique set size (private pages only).
    pub uss: u64,
}

/// Metrics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The `/proc` file could not be read (the process may be gone).
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file's format was not understood.
    #[error("unexpected format in {}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
    },
}

fn read(path: PathBuf) -> Result<(String, PathBuf), MetricsError> {
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok((s, path)),
        Err(source) => Err(MetricsError::Read { path, source }),
    }
}

/// Parses the text of `/proc/PID/smaps_rollup`.
pub fn parse_smaps_rollup(text: &str) -> Option<Memory> {
    let mut m = Memory::default();
    let mut seen_rss = false;
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let kb = || -> Option<u64> { rest.split_whitespace().next()?.parse::<u64>().ok() };
        match key {
            "Rss" => {
                m.rss = kb()? * 1024;
                seen_rss = true;
            }
            "Pss" => m.pss = kb()? * 1024,
            "Private_Clean" | "Private_Dirty" | "Private_Hugetlb" => m.uss += kb()? * 1024,
            _ => {}
        }
    }
    seen_rss.then_some(m)
}

/// Memory of process `pid`.
pub fn memory(pid: i32) -> Result<Memory, MetricsError> {
    let (text, path) = read(PathBuf::from(format!("/proc/{pid}/smaps_rollup")))?;
    parse_smaps_rollup(&text).ok_or(MetricsError::Format { path })
}

/// How long a memory reading is reused.
pub const MEMORY_TTL: std::time::Duration = std::time::Duration::from_secs(1);

/// Memory readings, reused for [`MEMORY_TTL`]: `smaps_rollup` walks the page
/// tables of the whole process (about a millisecond for a worker that
/// inherited a base of hundreds of MiB), and a client polling `Status` must
/// not turn that into the daemon's main load.
#[derive(Debug, Default)]
pub struct MemoryCache {
    entries: std::sync::Mutex<std::collections::HashMap<i32, (std::time::Instant, Memory)>>,
}

impl MemoryCache {
    /// Memory of `pid`, read at most once per [`MEMORY_TTL`].
    pub fn memory(&self, pid: i32) -> Option<Memory> {
        let now = std::time::Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, m)) = entries.get(&pid) {
            if now.duration_since(*at) < MEMORY_TTL {
                return Some(*m);
            }
        }
        let m = memory(pid).ok()?;
        if entries.len() > 256 {
            entries.retain(|_, (at, _)| now.duration_since(*at) < MEMORY_TTL);
        }
        entries.insert(pid, (now, m));
        Some(m)
    }
}

/// Parses `utime + stime` (clock ticks) out of `/proc/PID/stat`.
pub fn parse_stat_ticks(text: &str) -> Option<u64> {
    // The command name is in parentheses and may itself contain spaces or
    // parentheses: fields resume after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ')' come field 3 (state) onward; utime is field 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// User plus system CPU time of process `pid`, in seconds.
pub fn cpu_seconds(pid: i32) -> Result<f64, MetricsError> {
    let (text, path) = read(PathBuf::from(format!("/proc/{pid}/stat")))?;
    let ticks = parse_stat_ticks(&text).ok_or(MetricsError::Format { path })?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|&v| v > 0)
        .unwrap_or(100);
    Ok(ticks as f64 / hz as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_cache_reads_a_live_process_and_reuses_it() {
        let cache = MemoryCache::default();
        let me = std::process::id() as i32;
        let first = cache.memory(me).expect("own smaps_rollup");
        assert!(first.rss > 0);
        // Within the TTL the same reading comes back even though the
        // process has grown meanwhile.
        let grown = vec![1u8; 8 << 20];
        assert_eq!(cache.memory(me), Some(first));
        drop(grown);
        assert_eq!(cache.memory(-1), None);
    }

    #[test]
    fn parses_smaps_rollup() {
        let text = "55d0c-7ffd [rollup]\nRss:                2048 kB\nPss:                1024 kB\nPss_Anon:            512 kB\nShared_Clean:       1024 kB\nPrivate_Clean:       256 kB\nPrivate_Dirty:       512 kB\nPrivate_Hugetlb:       0 kB\n";
        assert_eq!(
            parse_smaps_rollup(text),
            Some(Memory {
                rss: 2048 * 1024,
                pss: 1024 * 1024,
                uss: 768 * 1024
            })
        );
        assert_eq!(parse_smaps_rollup("garbage"), None);
    }

    #[test]
    fn parses_stat_with_odd_comm() {
        let text = "1234 (a b) c)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_stat_ticks(text), Some(300));
        assert_eq!(parse_stat_ticks("1 (x) S"), None);
    }

    #[test]
    fn reads_own_process() {
        let pid = std::process::id() as i32;
        let m = memory(pid).unwrap();
        assert!(m.rss > 0 && m.pss > 0 && m.uss > 0 && m.uss <= m.rss);
        assert!(cpu_seconds(pid).unwrap() >= 0.0);
        assert!(memory(i32::MAX).is_err());
    }
}

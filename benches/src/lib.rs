//! Shared helpers for the benchmarks (and the demo): latency statistics, the
//! JSON line every benchmark prints last, and the harness that builds the
//! examples ([`artifacts`]), runs a real `emberd` ([`daemon`]) over its
//! control socket ([`varlink`]), starts modules without the supervisor
//! ([`launch`]: cold starts and an in-process zygote), loads HTTP modules
//! ([`http`]), reads memory figures ([`mem`]) and draws charts ([`svg`]).
//!
//! ```no_run
//! use ember_benches::{JsonLine, Samples};
//! let mut s = Samples::default();
//! s.push(std::time::Duration::from_micros(900));
//! let mut j = JsonLine::default();
//! j.num("warm_launch_p50_ms", s.percentile(50.0) as f64 / 1e6);
//! println!("{}", j.render());
//! ```

#![warn(missing_docs)]

pub mod artifacts;
pub mod daemon;
pub mod http;
pub mod launch;
pub mod mem;
pub mod svg;
pub mod varlink;

use std::time::Duration;

/// Latency samples in nanoseconds.
#[derive(Debug, Default, Clone)]
pub struct Samples(Vec<u64>);

impl Samples {
    /// Room for `n` samples.
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    /// Records one sample.
    pub fn push(&mut self, d: Duration) {
        self.0.push(d.as_nanos() as u64);
    }

    /// The `p`-th percentile (0..=100), nearest rank.
    pub fn percentile(&mut self, p: f64) -> u64 {
        assert!(!self.0.is_empty(), "no samples");
        self.0.sort_unstable();
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0[rank.clamp(1, self.0.len()) - 1]
    }

    /// Adds every sample of `other`.
    pub fn extend(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Ordered `key: value` pairs printed as one JSON object on one line.
#[derive(Debug, Default)]
pub struct JsonLine(Vec<(String, String)>);

impl JsonLine {
    /// Adds an integer field.
    pub fn int(&mut self, key: &str, v: u64) -> &mut Self {
        self.0.push((key.to_string(), v.to_string()));
        self
    }

    /// Adds a number field, rounded to 3 decimals.
    pub fn num(&mut self, key: &str, v: f64) -> &mut Self {
        self.0.push((key.to_string(), format!("{:.3}", v)));
        self
    }

    /// Adds a string field.
    pub fn str(&mut self, key: &str, v: &str) -> &mut Self {
        self.0.push((key.to_string(), format!("{v:?}")));
        self
    }

    /// Adds a boolean field.
    pub fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.0.push((key.to_string(), v.to_string()));
        self
    }

    /// The object as one line of JSON.
    pub fn render(&self) -> String {
        let body: Vec<String> = self.0.iter().map(|(k, v)| format!("{k:?}:{v}")).collect();
        format!("{{{}}}", body.join(","))
    }
}

/// Wrapping sum of the little-endian u64 words of `bytes` (and its tail
/// bytes): a cheap way to make a receiver read every byte.
pub fn word_sum(bytes: &[u8]) -> u64 {
    let mut chunks = bytes.chunks_exact(8);
    let mut sum = 0u64;
    for c in &mut chunks {
        sum = sum.wrapping_add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
    }
    chunks
        .remainder()
        .iter()
        .fold(sum, |s, &b| s.wrapping_add(b as u64))
}

/// Waits up to 10 s for a child the bench started to exit, then kills
/// (by its pid, through `Child`) and reaps it.
pub fn reap(child: &mut std::process::Child) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether `--json` was passed.
pub fn json_requested() -> bool {
    std::env::args().any(|a| a == "--json")
}

/// The value after `--name` on the command line, if any.
pub fn arg_value(name: &str) -> Option<String> {
    let mut args = std::env::args();
    while let Some(a) = args.next() {
        if a == name {
            return args.next();
        }
        if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            return Some(v.to_owned());
        }
    }
    None
}

/// `--name N` parsed, or `default`.
pub fn arg_num(name: &str, default: u64) -> u64 {
    arg_value(name)
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} expects a number, got {v:?}"))
        })
        .unwrap_or(default)
}

/// Milliseconds of a nanosecond sample.
pub fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

impl Samples {
    /// The samples in milliseconds, in recording order (or sorted, after a
    /// percentile was taken).
    pub fn ms(&self) -> Vec<f64> {
        self.0.iter().map(|&n| ms(n)).collect()
    }
}

/// The machine, in one line: CPU model, CPUs, memory, kernel.
pub fn machine_summary() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = mem::meminfo_kib("MemTotal") as f64 / (1024.0 * 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    format!("{cpu}, {cpus} CPUs, {mem_gib:.1} GiB RAM, Linux {kernel}")
}

/// Writes `svg` to `DIR/name` when `--chart DIR` was passed; returns the
/// path. A relative `DIR` is taken from the workspace root (`cargo bench`
/// runs benchmarks in the package directory).
pub fn write_chart(name: &str, svg: &str) -> Option<std::path::PathBuf> {
    let dir = artifacts::workspace_root().join(arg_value("--chart")?);
    std::fs::create_dir_all(&dir).expect("create chart directory");
    let path = dir.join(name);
    std::fs::write(&path, svg).expect("write chart");
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let mut s = Samples::default();
        for n in 1..=100 {
            s.push(Duration::from_nanos(n));
        }
        assert_eq!(
            (s.percentile(50.0), s.percentile(99.0), s.percentile(100.0)),
            (50, 99, 100)
        );
    }

    #[test]
    fn json_line_is_one_object() {
        let mut j = JsonLine::default();
        j.int("a", 1).num("b", 0.5).str("c", "x").bool("d", true);
        assert_eq!(j.render(), r#"{"a":1,"b":0.500,"c":"x","d":true}"#);
    }

    #[test]
    fn word_sum_reads_tails() {
        assert_eq!(word_sum(&[1, 0, 0, 0, 0, 0, 0, 0, 5]), 6);
    }
}

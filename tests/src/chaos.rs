//! Tools of the reliability suite (`tests/tests/reliability.rs`): a seeded
//! random number generator whose seed is printed and can be replayed, the
//! suite's length (short in CI, long with `EMBER_RELIABILITY_LONG=1`), and
//! the cgroups an `emberd` creates for its workers.

use std::collections::BTreeSet;
use std::path::PathBuf;

/// `EMBER_RELIABILITY_LONG=1`: the long run (hundreds of kills, thousands
/// of cycles) instead of CI's.
pub fn long_mode() -> bool {
    std::env::var("EMBER_RELIABILITY_LONG").is_ok_and(|v| v == "1")
}

/// A small, seeded pseudo-random generator (SplitMix64): the same seed
/// gives the same rounds.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// The generator for `test`, seeded from `EMBER_RELIABILITY_SEED` if
    /// set, else from the clock; prints the seed and how to replay it.
    pub fn from_env(test: &str) -> Self {
        let seed = match std::env::var("EMBER_RELIABILITY_SEED") {
            Ok(s) => s
                .parse()
                .unwrap_or_else(|_| panic!("EMBER_RELIABILITY_SEED={s:?} is not a u64")),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
        };
        eprintln!("{test}: seed {seed} (replay with EMBER_RELIABILITY_SEED={seed})");
        Self(seed)
    }

    /// A generator with this seed.
    pub fn seeded(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// One of `items`.
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// The directories under which an `emberd` started by this process creates
/// its cgroup parents (`ember-<pid>`), one per controller it uses: what
/// `supervisor::cgroup::detect` finds from our own `/proc/self/cgroup`,
/// which emberd inherits. Empty where cgroups are unusable.
pub fn cgroup_bases() -> Vec<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let d = supervisor::cgroup::detect(std::path::Path::new(supervisor::cgroup::ROOT), &own);
    let mut bases: Vec<PathBuf> = [d.memory, d.cpu]
        .into_iter()
        .flatten()
        .map(|h| h.base)
        .collect();
    bases.dedup();
    bases
}

/// The parent cgroups of the emberd with pid `emberd` that exist.
pub fn cgroup_parents(emberd: i32) -> Vec<PathBuf> {
    cgroup_bases()
        .into_iter()
        .map(|b| b.join(supervisor::cgroup::parent_name(emberd as u32)))
        .filter(|p| p.is_dir())
        .collect()
}

/// The cgroups below the emberd's parents: `<module>.<replica>.<pid>` per
/// running instance, `idle.<pid>` per idle worker.
pub fn cgroup_children(emberd: i32) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for p in cgroup_parents(emberd) {
        if let Ok(rd) = std::fs::read_dir(&p) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.insert(e.file_name().to_string_lossy().into_owned());
                }
            }
        }
    }
    out
}

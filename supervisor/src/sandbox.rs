//! The module sandbox as emberd plans it: the `[sandbox]` configuration,
//! each module's own uid and gid (allocated from `uid_range`, stable per
//! name, recorded in the state), the syscalls a manifest may be granted, and
//! the [`SandboxOrder`] a worker applies (module-runtime's `host::sandbox`)
//! before it loads the module. Design and limits: `docs/design.md`, "Trust".

use module_runtime::manifest::Manifest;
use module_runtime::protocol::SandboxOrder;
use serde::Deserialize;
use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};

/// The default `uid_range`: 0x70000000–0x7000FFFF. Above regular users
/// (1000–60000), systemd-homed (60001–60513), systemd's `DynamicUser=`
/// range (61184–65519), `nobody` (65534), the `/etc/subuid` ranges
/// (100000 upwards, 65536 a user) and systemd-nspawn's container range
/// (524288–1879048191); below 2^31, where signed-uid bugs and systemd's
/// foreign-uid range (2147352576 upwards) begin.
pub const DEFAULT_UID_RANGE: [u32; 2] = [0x7000_0000, 0x7000_FFFF];

/// The first id `uid_range` may not reach: 2^31. Above it lie systemd's
/// foreign-uid range, signed-uid bugs and 4294967295, which is -1 to
/// `setresuid`/`setresgid` ("leave unchanged": the worker would stay root).
pub const UID_LIMIT: u32 = 1 << 31;

/// `[sandbox]` of emberd's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// Sandbox every module (the default); `false` runs them as emberd
    /// runs, and `emberctl status` says so.
    pub enabled: bool,
    /// First and last uid (and gid) given to modules, inclusive.
    pub uid_range: [u32; 2],
    /// Denied syscalls a manifest may ask for (`[sandbox] allow_syscalls`).
    pub grantable_syscalls: Vec<String>,
    /// Directories under which a manifest may ask for write access
    /// (`[sandbox] writable`); see [`default_writable_roots`].
    pub writable_roots: Vec<PathBuf>,
}

/// The default `writable_roots`: `/tmp` and `/var/tmp`, the directories
/// every user of the host may already write (sticky, so the modules' own
/// uids keep their files apart). A persistent data directory is the host's
/// decision: the operator adds its parent (`/var/lib/modules`…).
pub fn default_writable_roots() -> Vec<PathBuf> {
    vec![PathBuf::from("/tmp"), PathBuf::from("/var/tmp")]
}

impl Default for SandboxConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            uid_range: DEFAULT_UID_RANGE,
            grantable_syscalls: Vec::new(),
            writable_roots: default_writable_roots(),
        }
    }
}

impl SandboxConfig {
    /// What is wrong with it, naming the field.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let [first, last] = self.uid_range;
        if first == 0 || first > last || last >= UID_LIMIT {
            return Err((
                "sandbox.uid_range",
                format!(
                    "[{first}, {last}] must be [first, last] with 0 < first <= last < \
                     {UID_LIMIT} (2^31: ids above are signed-uid trouble, and 4294967295 is \
                     -1 to setresuid, which leaves the worker root)"
                ),
            ));
        }
        if let Some(n) = self
            .grantable_syscalls
            .iter()
            .find(|n| !module_runtime::host::sandbox::is_denied(n))
        {
            return Err((
                "sandbox.grantable_syscalls",
                format!("`{n}` is not a syscall the sandbox denies"),
            ));
        }
        for r in &self.writable_roots {
            normalize(r).map_err(|why| ("sandbox.writable_roots", why))?;
        }
        Ok(())
    }

    /// Refuses a manifest's `writable` path outside every `writable_roots`
    /// entry, or that is, holds or lies in one of `protected` (emberd's
    /// state directory and its control socket's: never writable to a
    /// module, whatever the configuration says). Lexical: paths are
    /// normalized (`.` and repeated `/` dropped), `..` is refused. Returns
    /// the index of the refused path and why.
    pub fn check_writable(
        &self,
        writable: &[PathBuf],
        protected: &[PathBuf],
    ) -> Result<(), (usize, String)> {
        for (i, p) in writable.iter().enumerate() {
            let n = normalize(p).map_err(|why| (i, why))?;
            if !self
                .writable_roots
                .iter()
                .any(|r| normalize(r).is_ok_and(|r| n.starts_with(r)))
            {
                let roots: Vec<String> = self
                    .writable_roots
                    .iter()
                    .map(|r| r.display().to_string())
                    .collect();
                return Err((
                    i,
                    format!(
                        "{} is not inside a directory of `sandbox.writable_roots` in \
                         emberd's configuration ({})",
                        p.display(),
                        if roots.is_empty() {
                            "none".to_owned()
                        } else {
                            roots.join(", ")
                        }
                    ),
                ));
            }
            if let Some(d) = protected
                .iter()
                .find(|d| n.starts_with(d) || d.starts_with(&n))
            {
                return Err((
                    i,
                    format!(
                        "{} is, holds or lies in {}, emberd's state or control socket \
                         directory (never writable to a module, whatever \
                         `sandbox.writable_roots` says)",
                        p.display(),
                        d.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The first syscall of `allow` the configuration does not grant.
    pub fn ungranted<'a>(&self, allow: &'a [String]) -> Option<&'a str> {
        allow
            .iter()
            .find(|n| !self.grantable_syscalls.contains(n))
            .map(String::as_str)
    }

    /// The order for a worker of the module `manifest`, whose recorded uid
    /// is `uid`; `None` when the sandbox is off. `root`: emberd can switch
    /// uids (else the module keeps emberd's). Errors name what refuses it.
    /// `protected`: see [`SandboxConfig::check_writable`].
    pub fn order(
        &self,
        root: bool,
        uid: Option<u32>,
        manifest: &Manifest,
        protected: &[PathBuf],
    ) -> Result<Option<SandboxOrder>, String> {
        if !self.enabled {
            return Ok(None);
        }
        if let Some(n) = self.ungranted(&manifest.sandbox.allow_syscalls) {
            return Err(not_granted(n));
        }
        // Recorded before the rule, or the configuration changed since.
        self.check_writable(&manifest.sandbox.writable, protected)
            .map_err(|(i, why)| format!("writable[{i}]: {why}"))?;
        let ids = match (root, uid) {
            (false, _) => None,
            (true, Some(u)) => Some((u, u)),
            (true, None) => return Err("no uid allocated to the module".into()),
        };
        Ok(Some(SandboxOrder {
            ids,
            allow_syscalls: manifest.sandbox.allow_syscalls.clone(),
            writable: manifest.sandbox.writable.clone(),
        }))
    }

    /// A uid for the module `name`: the one its name hashes to in the
    /// range, else the next free one, skipping `taken` (other modules')
    /// and ids `in_use` says the system has (passwd, group). Deterministic,
    /// so a module installed again after an uninstall gets its uid back.
    pub fn allocate(
        &self,
        name: &str,
        taken: &HashSet<u32>,
        in_use: impl Fn(u32) -> bool,
    ) -> Option<u32> {
        self.free_candidates(name, taken, in_use, 1)
            .first()
            .copied()
    }

    /// The first `n` uids [`SandboxConfig::allocate`] would consider for
    /// `name`, in its order, that are neither `taken` nor `in_use`. Install
    /// and deploy compute them on the blocking pool (`in_use` asks NSS,
    /// which may be LDAP or sssd over the network) with `taken` as it was
    /// when the request came; the actor then takes the first one no module
    /// holds by then (the `n - 1` spares cover installs that raced).
    pub fn free_candidates(
        &self,
        name: &str,
        taken: &HashSet<u32>,
        in_use: impl Fn(u32) -> bool,
        n: usize,
    ) -> Vec<u32> {
        let [first, last] = self.uid_range;
        let size = u64::from(last - first) + 1;
        // FNV-1a: stable across builds and platforms (std's hasher is not).
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        (0..size.min(1 << 20))
            .map(|i| first + ((h.wrapping_add(i)) % size) as u32)
            .filter(|id| !taken.contains(id) && !in_use(*id))
            .take(n)
            .collect()
    }

    /// Gives each module of `state` without a uid (state written before
    /// the sandbox existed) one, as an install would; whether any was
    /// given. Asks NSS: call it where blocking harms no one (emberd calls
    /// it at start-up, before its runtime and the control socket serve).
    pub fn assign_missing_uids(&self, state: &mut crate::store::DesiredState) -> bool {
        let names: Vec<String> = state
            .modules
            .values()
            .filter(|r| r.uid.is_none())
            .map(|r| r.name.clone())
            .collect();
        let mut changed = false;
        for name in names {
            let taken: HashSet<u32> = state.modules.values().filter_map(|r| r.uid).collect();
            let uid = self.allocate(&name, &taken, id_in_use);
            if let Some(r) = state.modules.get_mut(&name) {
                r.uid = uid;
                changed |= uid.is_some();
            }
        }
        changed
    }
}

/// `path` made absolute-only and lexical: `.` and repeated separators
/// dropped; `..` and relative paths refused (a lexical check cannot follow
/// them).
pub fn normalize(path: &Path) -> Result<PathBuf, String> {
    if !path.is_absolute() {
        return Err(format!("{} is not an absolute path", path.display()));
    }
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(s) => out.push(s),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(format!("{} contains `..`", path.display()))
            }
        }
    }
    Ok(out)
}

/// The refusal of a syscall the configuration does not grant.
pub fn not_granted(syscall: &str) -> String {
    format!(
        "`{syscall}` is not granted by emberd's configuration (add it to `sandbox.grantable_syscalls`)"
    )
}

/// Whether the system's user or group databases know `id` (either way it
/// is not free for a module).
pub fn id_in_use(id: u32) -> bool {
    use nix::unistd::{Gid, Group, Uid, User};
    // A lookup that fails is taken as "in use": never hand out an id the
    // system may know.
    !matches!(User::from_uid(Uid::from_raw(id)), Ok(None))
        || !matches!(Group::from_gid(Gid::from_raw(id)), Ok(None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn manifest(extra: &str) -> Manifest {
        Manifest::parse(&format!(
            "name = \"m\"\nversion = \"1.0.0\"\nentry = \"libm.so\"\n{extra}"
        ))
        .unwrap()
    }

    #[test]
    fn uids_are_stable_distinct_and_skip_known_ids() {
        let c = SandboxConfig {
            uid_range: [1000, 1009],
            ..Default::default()
        };
        let none = HashSet::new();
        let a = c.allocate("hello", &none, |_| false).unwrap();
        assert_eq!(c.allocate("hello", &none, |_| false), Some(a), "stable");
        assert!((1000..=1009).contains(&a));
        // Taken by another module, or known to the system: the next one.
        let b = c.allocate("hello", &HashSet::from([a]), |_| false).unwrap();
        assert_ne!(a, b);
        assert_eq!(c.allocate("hello", &none, |id| id == a), Some(b));
        // A full range has nothing to give.
        let all: HashSet<u32> = (1000..=1009).collect();
        assert_eq!(c.allocate("hello", &all, |_| false), None);
        // The default range starts above every range systemd reserves.
        assert!(SandboxConfig::default().uid_range[0] > 1_879_048_191);
        assert!(id_in_use(0), "root is in passwd");
    }

    #[test]
    fn orders_follow_the_configuration() {
        let c = SandboxConfig::default();
        let m = manifest("[sandbox]\nwritable = [\"/var/tmp/m\"]\n");
        let o = c.order(true, Some(7), &m, &[]).unwrap().unwrap();
        assert_eq!(o.ids, Some((7, 7)));
        assert_eq!(o.writable, [PathBuf::from("/var/tmp/m")]);
        // Not root: no switch, said so by the worker's report.
        assert_eq!(c.order(false, Some(7), &m, &[]).unwrap().unwrap().ids, None);
        let off = SandboxConfig {
            enabled: false,
            ..Default::default()
        };
        assert_eq!(off.order(true, Some(7), &m, &[]).unwrap(), None);
        // A syscall the configuration does not grant.
        let m = manifest("[sandbox]\nallow_syscalls = [\"ptrace\"]\n");
        let e = c.order(true, Some(7), &m, &[]).unwrap_err();
        assert!(
            e.contains("`ptrace`") && e.contains("sandbox.grantable_syscalls"),
            "{e}"
        );
        let granting = SandboxConfig {
            grantable_syscalls: vec!["ptrace".into()],
            ..Default::default()
        };
        let o = granting.order(true, Some(7), &m, &[]).unwrap().unwrap();
        assert_eq!(o.allow_syscalls, ["ptrace"]);
        assert!(granting.check().is_ok());
        let bad = SandboxConfig {
            grantable_syscalls: vec!["read".into()],
            ..Default::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "sandbox.grantable_syscalls");
        for range in [
            [5, 4],
            [0, 10],
            [1, u32::MAX],
            [UID_LIMIT, UID_LIMIT],
            [7, UID_LIMIT],
        ] {
            let bad = SandboxConfig {
                uid_range: range,
                ..Default::default()
            };
            let (field, why) = bad.check().unwrap_err();
            assert_eq!(field, "sandbox.uid_range", "{range:?}");
            assert!(why.contains("< 2147483648"), "{why}");
        }
        let top = SandboxConfig {
            uid_range: [UID_LIMIT - 10, UID_LIMIT - 1],
            ..Default::default()
        };
        assert!(top.check().is_ok());
    }

    #[test]
    fn writable_paths_stay_inside_the_roots_and_off_emberds_directories() {
        let c = SandboxConfig::default();
        let state = [PathBuf::from("/var/tmp/ember/state")];
        let ok = |p: &str| c.check_writable(&[PathBuf::from(p)], &state);
        assert!(ok("/tmp/m").is_ok());
        assert!(ok("/var/tmp//m/./data").is_ok());
        assert!(ok("/tmp").is_ok(), "a root itself");
        // Outside every root: named, with the key.
        for p in ["/", "/var/lib/m", "/tmpfoo", "/var"] {
            let (i, why) = ok(p).unwrap_err();
            assert_eq!(i, 0);
            assert!(
                why.starts_with(&format!("{p} is not inside"))
                    && why.contains("sandbox.writable_roots"),
                "{why}"
            );
        }
        // `..` is not followed, it is refused.
        let (_, why) = ok("/tmp/../var/lib/ember").unwrap_err();
        assert!(why.contains("`..`"), "{why}");
        // The state directory, an ancestor, a descendant: never, even
        // inside a root.
        for p in [
            "/var/tmp/ember/state",
            "/var/tmp/ember",
            "/var/tmp/ember/state/artifacts",
            "/var/tmp",
        ] {
            let (_, why) = ok(p).unwrap_err();
            assert!(
                why.contains("/var/tmp/ember/state, emberd's state"),
                "{p}: {why}"
            );
        }
        assert!(
            ok("/var/tmp/embers").is_ok(),
            "component-wise, not by string"
        );
        // The second path is the one named.
        let e = c
            .check_writable(&[PathBuf::from("/tmp/a"), PathBuf::from("/etc")], &state)
            .unwrap_err();
        assert_eq!(e.0, 1);
        // The order refuses it too (a state recorded before the rule).
        let m = manifest("[sandbox]\nwritable = [\"/var/tmp/ember\"]\n");
        let e = c.order(true, Some(7), &m, &state).unwrap_err();
        assert!(
            e.starts_with("writable[0]: /var/tmp/ember is, holds"),
            "{e}"
        );
        // Roots are checked like paths.
        let bad = SandboxConfig {
            writable_roots: vec![PathBuf::from("tmp")],
            ..Default::default()
        };
        assert_eq!(bad.check().unwrap_err().0, "sandbox.writable_roots");
        let none = SandboxConfig {
            writable_roots: Vec::new(),
            ..Default::default()
        };
        assert!(none
            .check_writable(&[PathBuf::from("/tmp/m")], &[])
            .unwrap_err()
            .1
            .contains("(none)"));
    }
}

//! The module manifest, `module.toml`. Format: `docs/module-manifest.md`.
//!
//! ```
//! let m = module_runtime::manifest::Manifest::parse(r#"
//!     name = "hello"
//!     version = "0.1.0"
//!     entry = "libhello.so"
//!     [limits]
//!     start_deadline = "2s"
//! "#).unwrap();
//! assert_eq!(m.limits.start_deadline.as_secs(), 2);
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Why a manifest was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The manifest file could not be read.
    #[error("cannot read manifest {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// TOML syntax, a type mismatch, a missing or an unknown field; the
    /// source (toml's error) names the field and the line.
    #[error("invalid manifest")]
    Parse(#[source] toml::de::Error),
    /// A field parsed but its value is not allowed.
    #[error("invalid manifest: field `{field}`: {reason}")]
    Invalid {
        /// Dotted path of the field, e.g. `listeners[1].name`.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// A parsed and validated `module.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Module name: `[a-z0-9][a-z0-9_-]*`, at most 64 bytes.
    pub name: String,
    /// Module version (semver `MAJOR.MINOR.PATCH[-pre]`).
    pub version: String,
    /// Path of the `cdylib`, relative to the manifest's directory.
    pub entry: PathBuf,
    /// How many instances the supervisor keeps running (1 to
    /// [`MAX_REPLICAS`]).
    #[serde(default = "one")]
    pub replicas: u32,
    /// Services this module serves.
    #[serde(default)]
    pub exports: Vec<Service>,
    /// Services this module calls.
    #[serde(default)]
    pub imports: Vec<Import>,
    /// Sockets the supervisor binds and hands in.
    #[serde(default)]
    pub listeners: Vec<Listener>,
    /// Plugins the module looks up (checked by the supervisor before launch).
    #[serde(default)]
    pub plugins: Vec<PluginDep>,
    /// Shared data sets the module reads.
    #[serde(default)]
    pub shared_data: Vec<SharedData>,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// How a new revision replaces a running one (`emberctl deploy`).
    #[serde(default)]
    pub rollout: Rollout,
    /// What the module needs beyond the default sandbox.
    #[serde(default)]
    pub sandbox: Sandbox,
    /// Free-form configuration handed to the module.
    #[serde(default)]
    pub config: toml::Table,
}

fn one() -> u32 {
    1
}

/// An exported service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// Service name, unique on the host.
    pub name: String,
    /// Schema version of its request/response types (≥ 1).
    #[serde(default = "one")]
    pub version: u32,
}

/// An imported service.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Import {
    /// Service name.
    pub name: String,
    /// Schema version required (≥ 1).
    #[serde(default = "one")]
    pub version: u32,
    /// Whether the module can start without it.
    #[serde(default)]
    pub optional: bool,
}

/// A listener the supervisor binds and hands to every replica.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    /// Name the module asks for (`LISTEN_FDNAMES` entry).
    pub name: String,
    /// Address to bind, e.g. `127.0.0.1:8080` or `unix:/run/x.sock`.
    pub address: String,
}

/// A plugin dependency.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginDep {
    /// Plugin name.
    pub name: String,
    /// Table version required.
    pub table_version: u32,
}

/// A shared data set read by the module.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedData {
    /// Data set name.
    pub name: String,
}

/// Resource limits, all optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory the module may add on top of the warm worker, e.g. `"256MiB"`.
    /// Enforced by the supervisor: the instance's cgroup where one is
    /// usable, else its memory watch (private resident memory, sampled from
    /// outside the worker), with an address-space cap in the worker as a
    /// backstop.
    #[serde(default, deserialize_with = "de_bytes")]
    pub memory: Option<u64>,
    /// CPU share in cores (e.g. `0.5`); enforced by the supervisor.
    #[serde(default)]
    pub cpu: Option<f64>,
    /// Time from the launch order's arrival at the worker (loading
    /// included) until the module must be ready; positive.
    #[serde(default = "default_start", deserialize_with = "de_duration")]
    pub start_deadline: Duration,
    /// Time from a stop request until the process must have exited;
    /// positive.
    #[serde(default = "default_stop", deserialize_with = "de_duration")]
    pub stop_deadline: Duration,
}

/// How a new revision of the module is rolled out; the names mirror a
/// Kubernetes Deployment's strategy. `emberctl deploy` flags override them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// `surge` (start every new replica beside the old ones, then drain the
    /// old ones) or `rolling` (batches bounded by the two below).
    #[serde(default)]
    pub strategy: Strategy,
    /// Replicas that may run above `replicas` during a rollout (default:
    /// `replicas` for surge, 1 for rolling).
    #[serde(default)]
    pub max_surge: Option<u32>,
    /// Replicas that may be missing below `replicas` during a rollout
    /// (default 0).
    #[serde(default)]
    pub max_unavailable: Option<u32>,
    /// How long the new revision must run without a crash, once it has
    /// taken over, before it is committed; a crash within it rolls back.
    #[serde(default = "default_stable_after", deserialize_with = "de_duration")]
    pub stable_after: Duration,
}

impl Default for Rollout {
    fn default() -> Self {
        Self {
            strategy: Strategy::default(),
            max_surge: None,
            max_unavailable: None,
            stable_after: default_stable_after(),
        }
    }
}

fn default_stable_after() -> Duration {
    Duration::from_secs(10)
}

/// What a module asks of the sandbox beyond its defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sandbox {
    /// Absolute paths (directories or files) the module may write; the rest
    /// of the filesystem is read-only to it where the kernel has Landlock.
    #[serde(default)]
    pub writable: Vec<PathBuf>,
    /// Syscalls of the sandbox's deny list the module needs; emberd
    /// refuses the install unless its `[sandbox] grantable_syscalls` lists
    /// each.
    #[serde(default)]
    pub allow_syscalls: Vec<String>,
}

/// A rollout strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// Every new replica beside the old ones, then the old ones drain.
    #[default]
    Surge,
    /// Batches bounded by `max_surge` and `max_unavailable`.
    Rolling,
}

impl Strategy {
    /// The wire and manifest name.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Surge => "surge",
            Strategy::Rolling => "rolling",
        }
    }
}

fn default_start() -> Duration {
    Duration::from_secs(10)
}

fn default_stop() -> Duration {
    Duration::from_secs(5)
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory: None,
            cpu: None,
            start_deadline: default_start(),
            stop_deadline: default_stop(),
        }
    }
}

/// Parses `"1500ms"`, `"2s"`, `"1m"`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(
        s.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(s.len()),
    );
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like \"500ms\", \"5s\" or \"1m\""))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        other => return Err(format!("unknown duration unit `{other}` (use ms, s or m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| e.to_string())
}

/// Parses `"256MiB"`, `"1GiB"`, `"512K"`, or a bare number of bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size like \"256MiB\""))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => return Err(format!("unknown size unit `{other}` (use KiB, MiB or GiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` is too large"))
}

#[derive(Deserialize)]
#[serde(untagged)]
enum StrOrNum {
    Str(String),
    Int(u64),
    Float(f64),
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match StrOrNum::deserialize(d)? {
        StrOrNum::Str(s) => parse_duration(&s).map_err(serde::de::Error::custom),
        StrOrNum::Int(n) => Ok(Duration::from_secs(n)),
        StrOrNum::Float(f) => Duration::try_from_secs_f64(f).map_err(serde::de::Error::custom),
    }
}

fn de_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match StrOrNum::deserialize(d)? {
        StrOrNum::Str(s) => parse_bytes(&s).map(Some).map_err(serde::de::Error::custom),
        StrOrNum::Int(n) => Ok(Some(n)),
        StrOrNum::Float(_) => Err(serde::de::Error::custom(
            "a size must be an integer or a string like \"256MiB\"",
        )),
    }
}

/// The most replicas a manifest may ask for: each is a process, and a typo
/// (`replicas = 100000`) must not fork the host to death.
pub const MAX_REPLICAS: u32 = 256;

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ManifestError {
    ManifestError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

fn check_name(field: &str, name: &str) -> Result<(), ManifestError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("`{name}` must match [a-z0-9][a-z0-9_-]* and be at most 64 bytes"),
        ))
    }
}

fn check_unique<'a>(list: &str, names: impl Iterator<Item = &'a str>) -> Result<(), ManifestError> {
    let mut seen = std::collections::HashSet::new();
    for (i, n) in names.enumerate() {
        check_name(&format!("{list}[{i}].name"), n)?;
        if !seen.insert(n) {
            return Err(invalid(
                format!("{list}[{i}].name"),
                format!("`{n}` appears twice"),
            ));
        }
    }
    Ok(())
}

impl Manifest {
    /// Parses and validates manifest text.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let m: Manifest = toml::from_str(text).map_err(ManifestError::Parse)?;
        m.validate()?;
        Ok(m)
    }

    /// Reads, parses and validates a manifest file.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text)
    }

    /// The `cdylib` path, resolved against the manifest's directory.
    pub fn entry_path(&self, manifest_dir: &Path) -> PathBuf {
        manifest_dir.join(&self.entry)
    }

    /// `name@version#replica`, the identity used in process names and logs.
    pub fn identity(&self, replica: u32) -> String {
        format!("{}@{}#{}", self.name, self.version, replica)
    }

    /// Whether the manifest declares a grant of `kind` named `name`
    /// (listeners, imports, exports, shared data; the host's own `Stdio` and
    /// `Artifact` grants are always allowed).
    pub fn declares(&self, kind: crate::abi::GrantKind, name: &str) -> bool {
        use crate::abi::GrantKind;
        match kind {
            GrantKind::Listener => self.listeners.iter().any(|l| l.name == name),
            GrantKind::Import => self.imports.iter().any(|i| i.name == name),
            GrantKind::Export => self.exports.iter().any(|e| e.name == name),
            GrantKind::SharedData => self.shared_data.iter().any(|d| d.name == name),
            // Output redirection and the artifact are the host's, not
            // manifest resources.
            GrantKind::Stdio | GrantKind::Artifact => true,
        }
    }

    /// The `[config]` table as TOML text.
    pub fn config_toml(&self) -> String {
        toml::to_string(&self.config).unwrap_or_default()
    }

    fn validate(&self) -> Result<(), ManifestError> {
        check_name("name", &self.name)?;
        let v = self.version.split(['-', '+']).next().unwrap_or("");
        let parts: Vec<_> = v.split('.').collect();
        if parts.len() != 3
            || parts
                .iter()
                .any(|p| p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(invalid(
                "version",
                format!("`{}` is not a semver version like 1.2.3", self.version),
            ));
        }
        if self.entry.as_os_str().is_empty() {
            return Err(invalid("entry", "must name the module's cdylib"));
        }
        if self.replicas == 0 {
            return Err(invalid("replicas", "must be at least 1"));
        }
        if self.replicas > MAX_REPLICAS {
            return Err(invalid(
                "replicas",
                format!("at most {MAX_REPLICAS} (each replica is a process)"),
            ));
        }
        if self.rollout.stable_after > Duration::from_secs(3600) {
            return Err(invalid("rollout.stable_after", "at most 1h"));
        }
        if let Some(n) = self.rollout.max_surge.filter(|n| *n > MAX_REPLICAS) {
            return Err(invalid(
                "rollout.max_surge",
                format!("{n} is more than {MAX_REPLICAS}"),
            ));
        }
        if self.rollout.strategy == Strategy::Rolling
            && self.rollout.max_surge == Some(0)
            && self.rollout.max_unavailable.unwrap_or(0) == 0
        {
            return Err(invalid(
                "rollout.max_unavailable",
                "max_surge and max_unavailable cannot both be 0: the rollout could not move",
            ));
        }
        check_unique("exports", self.exports.iter().map(|s| s.name.as_str()))?;
        check_unique("imports", self.imports.iter().map(|s| s.name.as_str()))?;
        check_unique("listeners", self.listeners.iter().map(|s| s.name.as_str()))?;
        check_unique("plugins", self.plugins.iter().map(|s| s.name.as_str()))?;
        check_unique(
            "shared_data",
            self.shared_data.iter().map(|s| s.name.as_str()),
        )?;
        for (i, l) in self.listeners.iter().enumerate() {
            if l.address.is_empty() {
                return Err(invalid(
                    format!("listeners[{i}].address"),
                    "must not be empty",
                ));
            }
        }
        if let Some(cpu) = self.limits.cpu {
            if !(cpu > 0.0 && cpu.is_finite()) {
                return Err(invalid("limits.cpu", "must be a positive number of cores"));
            }
        }
        for (i, e) in self.exports.iter().enumerate() {
            if e.version == 0 {
                return Err(invalid(
                    format!("exports[{i}].version"),
                    "must be at least 1 (schema versions start at 1)",
                ));
            }
        }
        for (i, e) in self.imports.iter().enumerate() {
            if e.version == 0 {
                return Err(invalid(
                    format!("imports[{i}].version"),
                    "must be at least 1 (schema versions start at 1)",
                ));
            }
        }
        for (i, p) in self.sandbox.writable.iter().enumerate() {
            if !p.is_absolute() {
                return Err(invalid(
                    format!("sandbox.writable[{i}]"),
                    format!("{} is not an absolute path", p.display()),
                ));
            }
        }
        for (i, n) in self.sandbox.allow_syscalls.iter().enumerate() {
            if !crate::host::sandbox::is_denied(n) {
                return Err(invalid(
                    format!("sandbox.allow_syscalls[{i}]"),
                    format!(
                        "`{n}` is not a syscall the sandbox denies (see docs/module-manifest.md)"
                    ),
                ));
            }
        }
        if self.limits.start_deadline.is_zero() {
            return Err(invalid(
                "limits.start_deadline",
                "must be positive (e.g. \"500ms\")",
            ));
        }
        if self.limits.stop_deadline.is_zero() {
            return Err(invalid(
                "limits.stop_deadline",
                "must be positive (e.g. \"500ms\"): a module needs time to stop",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
name = "greeter"
version = "0.2.0"
entry = "libgreeter.so"
replicas = 2
imports = [{ name = "kv" }]
plugins = [{ name = "catalog", table_version = 1 }]

[[listeners]]
name = "http"
address = "127.0.0.1:8080"

[limits]
memory = "256MiB"
cpu = 0.5
start_deadline = "1500ms"

[config]
greeting = "hi"
"#;

    #[test]
    fn parses_a_full_manifest() {
        let m = Manifest::parse(FULL).unwrap();
        assert_eq!(m.identity(1), "greeter@0.2.0#1");
        assert_eq!(
            m.imports[0],
            Import {
                name: "kv".into(),
                version: 1,
                optional: false
            }
        );
        assert_eq!(m.limits.memory, Some(256 << 20));
        assert_eq!(m.limits.start_deadline, Duration::from_millis(1500));
        assert_eq!(m.limits.stop_deadline, Duration::from_secs(5));
        assert_eq!(m.config["greeting"].as_str(), Some("hi"));
        assert_eq!(m.entry_path(Path::new("/m")), Path::new("/m/libgreeter.so"));
        assert!(m.config_toml().contains("greeting"));
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let e =
            Manifest::parse("name = \"a\"\nversion = \"1.0.0\"\nentry = \"a.so\"\nreplica = 3\n")
                .unwrap_err();
        // toml's message is the source, said once.
        assert_eq!(e.to_string(), "invalid manifest");
        let msg = crate::sdk::error_chain(&e);
        assert!(msg.contains("replica") && msg.contains("line 4"), "{msg}");
        assert_eq!(msg.matches("TOML parse error").count(), 1, "{msg}");
        let e = Manifest::parse(
            "name = \"a\"\nversion = \"1.0.0\"\nentry = \"a.so\"\n[limits]\nmemroy = 1\n",
        )
        .unwrap_err();
        let msg = crate::sdk::error_chain(&e);
        assert!(msg.contains("memroy") && msg.contains("line 5"), "{msg}");
    }

    #[test]
    fn missing_and_invalid_fields_are_named() {
        let e = Manifest::parse("name = \"a\"\nentry = \"a.so\"\n").unwrap_err();
        let msg = crate::sdk::error_chain(&e);
        assert!(msg.contains("version"), "{msg}");
        let e = Manifest::parse("name = \"a\"\nversion = \"1.0\"\nentry = \"a.so\"\n").unwrap_err();
        assert!(e.to_string().contains("field `version`"), "{e}");
        let e =
            Manifest::parse("name = \"A b\"\nversion = \"1.0.0\"\nentry = \"a.so\"\n").unwrap_err();
        assert!(e.to_string().contains("field `name`"), "{e}");
        let e = Manifest::parse("name = \"a\"\nversion = \"1.0.0\"\nentry = \"a.so\"\n[limits]\nstart_deadline = \"5 parsecs\"\n")
            .unwrap_err();
        let msg = crate::sdk::error_chain(&e);
        assert!(
            msg.contains("line 5")
                && msg.contains("start_deadline")
                && msg.contains("unknown duration unit `parsecs`"),
            "{msg}"
        );
        let text = "name = \"a\"\nversion = \"1.0.0\"\nentry = \"a.so\"\n[[listeners]]\nname=\"h\"\naddress=\"x\"\n[[listeners]]\nname=\"h\"\naddress=\"y\"\n";
        let e = Manifest::parse(text).unwrap_err();
        assert!(e.to_string().contains("listeners[1].name"), "{e}");
    }

    #[test]
    fn the_rollout_section_is_checked() {
        let with = |rollout: &str| {
            Manifest::parse(&format!(
                "name = \"a\"\nversion = \"1.0.0\"\nentry = \"a.so\"\nreplicas = 4\n[rollout]\n{rollout}"
            ))
        };
        let m = with("stable_after = \"250ms\"").unwrap();
        assert_eq!(m.rollout.strategy, Strategy::Surge);
        assert_eq!(m.rollout.stable_after, Duration::from_millis(250));
        let m = with("strategy = \"rolling\"\nmax_surge = 1\nmax_unavailable = 1").unwrap();
        assert_eq!(m.rollout.strategy, Strategy::Rolling);
        // A surge's max_surge below replicas is refused when it is installed
        // or deployed (the supervisor's check), not by the parser: stored
        // manifests keep loading.
        assert!(with("max_surge = 2").is_ok());
        let e = with("strategy = \"rolling\"\nmax_surge = 0").unwrap_err();
        assert!(
            crate::sdk::error_chain(&e).contains("rollout.max_unavailable"),
            "{e}"
        );
        let e = with("strategy = \"blue-green\"").unwrap_err();
        assert!(crate::sdk::error_chain(&e).contains("strategy"), "{e}");
        let e = with("stable_after = \"2h\"").unwrap_err();
        assert!(
            crate::sdk::error_chain(&e).contains("unknown duration unit"),
            "{e}"
        );
        let e = with("stable_after = \"61m\"").unwrap_err();
        assert!(
            crate::sdk::error_chain(&e).contains("rollout.stable_after"),
            "{e}"
        );
    }

    #[test]
    fn replicas_are_bounded() {
        let with = |n: u32| {
            Manifest::parse(&format!(
                "name = \"a\"\nversion = \"1.0.0\"\nentry = \"a.so\"\nreplicas = {n}\n"
            ))
        };
        assert_eq!(with(MAX_REPLICAS).unwrap().replicas, MAX_REPLICAS);
        for n in [0, MAX_REPLICAS + 1, 100_000] {
            let e = with(n).unwrap_err();
            assert!(
                matches!(&e, ManifestError::Invalid { field, .. } if field == "replicas"),
                "{n}: {e}"
            );
        }
        assert!(with(100_000)
            .unwrap_err()
            .to_string()
            .contains("at most 256"));
    }

    #[test]
    fn zero_deadlines_and_versions_are_refused_naming_the_field() {
        let base = "name = \"a\"\nversion = \"1.0.0\"\nentry = \"a.so\"\n";
        for (extra, field) in [
            ("[limits]\nstop_deadline = \"0s\"\n", "limits.stop_deadline"),
            ("[limits]\nstop_deadline = 0\n", "limits.stop_deadline"),
            (
                "[limits]\nstart_deadline = \"0ms\"\n",
                "limits.start_deadline",
            ),
            (
                "[[exports]]\nname = \"kv\"\nversion = 0\n",
                "exports[0].version",
            ),
            (
                "[[imports]]\nname = \"kv\"\n[[imports]]\nname = \"db\"\nversion = 0\n",
                "imports[1].version",
            ),
        ] {
            let e = Manifest::parse(&format!("{base}{extra}")).unwrap_err();
            assert!(
                matches!(&e, ManifestError::Invalid { field: f, .. } if f == field),
                "{extra}: {e}"
            );
            assert!(
                e.to_string()
                    .starts_with(&format!("invalid manifest: field `{field}`: must be")),
                "{e}"
            );
        }
        // The smallest useful values are fine.
        let m = Manifest::parse(&format!(
            "{base}[[exports]]\nname = \"kv\"\nversion = 1\n[limits]\nstop_deadline = \"1ms\"\n"
        ))
        .unwrap();
        assert_eq!(m.limits.stop_deadline, Duration::from_millis(1));
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("12").unwrap(), 12);
        assert!(parse_bytes("12 furlongs").is_err());
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("-1s").is_err());
    }

    proptest::proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,200}") {
            let _ = Manifest::parse(&s);
        }
    }
}

//! `emberd` configuration: an embedded default, a TOML file, and
//! command-line overrides.
//!
//! ```toml
//! socket = "/run/ember/control.sock"
//! state_dir = "/var/lib/ember"
//! socket_mode = "0660"
//! allowed_uids = [1000]
//! allowed_gids = [990]
//! plugins = [
//!     "/opt/base/libtls.so",
//!     { path = "/opt/base/libcatalog.so", config = { size_mb = 64 } },
//! ]
//!
//! [pool]
//! min_idle = 2
//! max_idle = 4
//!
//! [lifecycle]
//! start_timeout_ms = 10000
//!
//! [limits]            # for modules whose manifest leaves a limit unset
//! memory_bytes = 268435456
//! open_files = 1024
//!
//! [runtime_libs]     # the shared runtime of slim modules
//! dir = "/usr/lib/ember"
//!
//! [logging]           # "auto" (journal when stderr is the journal), "journal", "plain"
//! format = "auto"
//!
//! [sandbox]
//! enabled = true
//! uid_range = [1879048192, 1879113727]
//! grantable_syscalls = ["perf_event_open"]
//! writable_roots = ["/tmp", "/var/tmp", "/var/lib/modules"]
//! ```
//!
//! Errors name the file, the line and column, and the dotted key:
//! `/etc/ember/emberd.toml:4:12: field `pool.min_idle`: invalid type: …`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cgroup::Limits;
use crate::lifecycle::Policy;

/// The configuration used when `--config` is not given.
pub const DEFAULT_CONFIG: &str = include_str!("default-config.toml");

/// A configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or a field is unknown or has the wrong
    /// type.
    #[error("{}:{line}:{column}: {}{message}", path.display(), field_prefix(.field.as_deref()))]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending field.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The dotted key of the offending field (`pool.min_idle`,
        /// `plugins[1].path`), when the error is inside one.
        field: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range.
    #[error("{}:{}field `{field}`: {message}", path.display(), location_prefix(*.location))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line and column of the field's key, when the file sets
        /// it (a default that conflicts with a value set has none).
        location: Option<(usize, usize)>,
        /// The dotted key of the field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

fn field_prefix(field: Option<&str>) -> String {
    field.map_or_else(String::new, |f| format!("field `{f}`: "))
}

fn location_prefix(location: Option<(usize, usize)>) -> String {
    location.map_or_else(|| " ".to_owned(), |(l, c)| format!("{l}:{c}: "))
}

/// Warm pool policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Refill in the background while fewer workers than this are idle.
    #[serde(default = "default_min_idle")]
    pub min_idle: usize,
    /// Never keep more idle workers than this.
    #[serde(default = "default_max_idle")]
    pub max_idle: usize,
    /// How long a new zygote may take to load and initialize the plugins
    /// (its answer to `Hello`). At start-up emberd then exits with an
    /// error; after a zygote restart the launches waiting for it fail and
    /// the restart is retried with back-off.
    #[serde(default = "default_zygote_start_timeout_ms")]
    pub zygote_start_timeout_ms: u64,
}

fn default_zygote_start_timeout_ms() -> u64 {
    60_000
}

impl PoolConfig {
    /// [`PoolConfig::zygote_start_timeout_ms`] as a duration.
    pub fn zygote_start_timeout(&self) -> Duration {
        Duration::from_millis(self.zygote_start_timeout_ms)
    }
}

/// Caps on what an install or deploy reads from the files a client names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstallConfig {
    /// The largest `module.toml` accepted, in bytes.
    pub max_manifest_bytes: u64,
    /// The largest artifact (`entry`) accepted, in bytes.
    pub max_artifact_bytes: u64,
}

impl Default for InstallConfig {
    fn default() -> Self {
        Self {
            max_manifest_bytes: 1 << 20,
            max_artifact_bytes: 512 << 20,
        }
    }
}

fn default_min_idle() -> usize {
    2
}
fn default_max_idle() -> usize {
    4
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            min_idle: default_min_idle(),
            max_idle: default_max_idle(),
            zygote_start_timeout_ms: default_zygote_start_timeout_ms(),
        }
    }
}

/// Lifecycle timings, in milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// A module that is not ready this long after launch is killed.
    pub start_timeout_ms: u64,
    /// Uninstall waits this long after SIGTERM before SIGKILL.
    pub stop_timeout_ms: u64,
    /// First restart delay.
    pub backoff_initial_ms: u64,
    /// Largest restart delay.
    pub backoff_max_ms: u64,
    /// Consecutive crashes after which the module is in crash loop.
    pub crash_loop_after: u32,
    /// A module up this long has its back-off reset.
    pub stable_after_ms: u64,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        let p = Policy::default();
        Self {
            start_timeout_ms: p.start_timeout.as_millis() as u64,
            stop_timeout_ms: p.stop_timeout.as_millis() as u64,
            backoff_initial_ms: p.backoff_initial.as_millis() as u64,
            backoff_max_ms: p.backoff_max.as_millis() as u64,
            crash_loop_after: p.crash_loop_after,
            stable_after_ms: p.stable_after.as_millis() as u64,
        }
    }
}

impl LifecycleConfig {
    /// The policy these timings describe.
    pub fn policy(&self) -> Policy {
        Policy {
            start_timeout: Duration::from_millis(self.start_timeout_ms),
            stop_timeout: Duration::from_millis(self.stop_timeout_ms),
            backoff_initial: Duration::from_millis(self.backoff_initial_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            crash_loop_after: self.crash_loop_after,
            stable_after: Duration::from_millis(self.stable_after_ms),
            restart: true,
        }
    }
}

/// Default resource limits for modules whose manifest leaves them unset.
///
/// Each field is a default on its own: a manifest that sets
/// `limits.memory` but not `limits.cpu` keeps its memory limit and gets
/// `cpu_cores` from here. The effective limits go the same way as a
/// manifest's (see [`LimitsConfig::resolve`]): memory and CPU into the
/// instance's cgroup (memory to emberd's memory watch instead when no
/// cgroup enforces it), `open_files` as the worker's `RLIMIT_NOFILE`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Memory a module may add on top of the warm worker, in bytes (the
    /// manifest's `limits.memory`).
    pub memory_bytes: Option<u64>,
    /// CPU share in cores (the manifest's `limits.cpu`).
    pub cpu_cores: Option<f64>,
    /// Open descriptor cap of each worker (soft and hard `RLIMIT_NOFILE`;
    /// never raised above the hard limit emberd has). Manifests have no
    /// such field: this applies to every module.
    pub open_files: Option<u64>,
}

/// Where a module's effective limit comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitSource {
    /// The module's manifest (`[limits]`).
    Manifest,
    /// The daemon configuration's `[limits]` default.
    Config,
    /// The container's resources (`RunContainer`, `UpdateContainer`: the
    /// pod spec's limits).
    Container,
    /// Neither sets it: no limit.
    #[default]
    None,
}

/// The source of each of a module's effective limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitSources {
    /// Of `memory`.
    pub memory: LimitSource,
    /// Of `cpu`.
    pub cpu: LimitSource,
    /// Of `open_files`.
    pub open_files: LimitSource,
}

impl LimitsConfig {
    /// A module's effective limits: each of its manifest's, else this
    /// default; and where each came from.
    pub fn resolve(&self, memory: Option<u64>, cpu: Option<f64>) -> (Limits, LimitSources) {
        fn pick<T>(manifest: Option<T>, config: Option<T>) -> (Option<T>, LimitSource) {
            match (manifest, config) {
                (Some(v), _) => (Some(v), LimitSource::Manifest),
                (None, Some(v)) => (Some(v), LimitSource::Config),
                (None, None) => (None, LimitSource::None),
            }
        }
        let (memory, memory_from) = pick(memory, self.memory_bytes);
        let (cpu, cpu_from) = pick(cpu, self.cpu_cores);
        let (open_files, files_from) = pick(None, self.open_files);
        (
            Limits {
                memory,
                cpu,
                open_files,
            },
            LimitSources {
                memory: memory_from,
                cpu: cpu_from,
                open_files: files_from,
            },
        )
    }
}

/// The manifest text a worker is launched with when its memory limit is
/// the configuration's default: the module's manifest with
/// `limits.memory` set, so the worker caps its address space by it where
/// no cgroup enforces the limit. `None` if the text does not parse (the worker
/// then refuses it itself).
pub fn manifest_with_memory(manifest: &str, bytes: u64) -> Option<String> {
    let mut doc: toml::Table = toml::from_str(manifest).ok()?;
    let limits = doc
        .entry("limits")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    let table = limits.as_table_mut()?;
    table.insert(
        "memory".into(),
        toml::Value::Integer(i64::try_from(bytes).ok()?),
    );
    toml::to_string(&doc).ok()
}

/// The whole daemon configuration.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Control socket path; default per [`crate::paths::default_socket`].
    pub socket: Option<PathBuf>,
    /// State directory; default per [`crate::paths::default_state_dir`].
    pub state_dir: Option<PathBuf>,
    /// Socket file mode, an octal string such as `"0660"`.
    #[serde(default = "default_mode")]
    pub socket_mode: String,
    /// Numeric owner uid of the socket file (default: the daemon's).
    pub socket_uid: Option<u32>,
    /// Numeric group gid of the socket file (default: the daemon's).
    pub socket_gid: Option<u32>,
    /// Peers with these uids may use the socket (root and the daemon's own
    /// uid always may).
    #[serde(default)]
    pub allowed_uids: Vec<u32>,
    /// Peers in one of these groups (primary or supplementary, from
    /// `SO_PEERGROUPS`) may use the socket.
    #[serde(default)]
    pub allowed_gids: Vec<u32>,
    /// Plugins the zygote loads before forking any worker: paths, or
    /// tables `{ path = "…", config = { … } }`.
    #[serde(default)]
    pub plugins: Vec<crate::plugins::PluginEntry>,
    /// Warm pool policy.
    #[serde(default)]
    pub pool: PoolConfig,
    /// Lifecycle timings.
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
    /// Default limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Caps on the files an install reads.
    #[serde(default)]
    pub install: InstallConfig,
    /// The module sandbox.
    #[serde(default)]
    pub sandbox: crate::sandbox::SandboxConfig,
    /// Where the shared runtime of slim modules is.
    #[serde(default)]
    pub runtime_libs: RuntimeLibsConfig,
    /// Where `/metrics` (Prometheus) is served: an IP address and port such
    /// as `"127.0.0.1:9464"`; unset, no metrics listener.
    pub metrics_address: Option<String>,
    /// Log format and the journal ([`crate::journal`]).
    #[serde(default)]
    pub logging: crate::journal::LoggingConfig,
    /// The event stream (`emberctl events`).
    #[serde(default)]
    pub events: EventsConfig,
}

/// The event stream ([`crate::daemon::events`]).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// Events a subscriber may fall behind by before it is dropped (with
    /// `EventsLagged` naming how many it missed).
    pub buffer: usize,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            buffer: crate::daemon::events::DEFAULT_CAPACITY,
        }
    }
}

/// Where the shared runtime of slim modules is ([`crate::runtime_libs`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeLibsConfig {
    /// The directory holding `libember_sdk.so`, the SDK build slim modules
    /// are linked against (a `target/release` where they were built), and
    /// optionally `libstd-<hash>.so` of the compiler that built emberd
    /// (else it is taken from that compiler's toolchain). Default: the
    /// directory of the `emberd` binary. A directory set here without the
    /// SDK stops emberd at start.
    pub dir: Option<PathBuf>,
}

/// An IP address and port; the message says what is wrong.
fn parse_metrics_address(a: &str) -> Result<std::net::SocketAddr, String> {
    a.parse::<std::net::SocketAddr>().map_err(|_| {
        format!("{a:?} is not an IP address and port like \"127.0.0.1:9464\" or \"[::1]:9464\"")
    })
}

fn default_mode() -> String {
    "0660".into()
}

impl Config {
    /// The metrics address, if set (validated at load).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_address
            .as_deref()
            .and_then(|a| parse_metrics_address(a).ok())
    }

    /// Sets the metrics address from the command line (`--metrics`).
    pub fn set_metrics_address(&mut self, addr: &str) -> Result<(), ConfigError> {
        parse_metrics_address(addr).map_err(|message| ConfigError::Invalid {
            path: PathBuf::from("<command line>"),
            location: None,
            field: "--metrics",
            message,
        })?;
        self.metrics_address = Some(addr.to_owned());
        Ok(())
    }

    /// The embedded default.
    pub fn embedded() -> Self {
        Self::parse(DEFAULT_CONFIG, Path::new("<embedded default>"))
            .expect("the embedded default config is valid")
    }

    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses and validates TOML text; `path` is used in errors, which
    /// name the file, the line and column, and the dotted key of the field.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            let (line, column) = line_col(text, offset);
            // The spanned document, as far as it parses, tells which key
            // the error is in (toml's message does not).
            let (doc, _) = toml::de::DeTable::parse_recoverable(text);
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                field: e.span().and_then(|_| key_at(doc.get_ref(), offset, "")),
                message: e.message().trim().to_owned(),
            }
        })?;
        cfg.validate(text, path)?;
        Ok(cfg)
    }

    fn validate(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let doc = toml::de::DeTable::parse(text).ok();
        // Blames the first of `fields` the file sets (its key's line), else
        // the first.
        let invalid = |fields: &[&'static str], message: String| {
            let found = fields.iter().find_map(|f| {
                let span = key_span(doc.as_ref()?.get_ref(), f)?;
                Some((*f, line_col(text, span.start)))
            });
            ConfigError::Invalid {
                path: path.to_owned(),
                location: found.map(|(_, at)| at),
                field: found.map_or(fields[0], |(f, _)| f),
                message,
            }
        };
        if let Some(a) = &self.metrics_address {
            parse_metrics_address(a).map_err(|m| invalid(&["metrics_address"], m))?;
        }
        self.mode().map_err(|m| {
            invalid(
                &["socket_mode"],
                format!("{m:?} is not an octal mode like \"0660\""),
            )
        })?;
        if self.pool.min_idle > self.pool.max_idle {
            return Err(invalid(
                &["pool.min_idle", "pool.max_idle"],
                format!(
                    "min_idle ({}) is larger than max_idle ({})",
                    self.pool.min_idle, self.pool.max_idle
                ),
            ));
        }
        if self.pool.max_idle > 256 {
            return Err(invalid(&["pool.max_idle"], "at most 256".into()));
        }
        if self.pool.zygote_start_timeout_ms == 0 {
            return Err(invalid(
                &["pool.zygote_start_timeout_ms"],
                "must be positive".into(),
            ));
        }
        if self.install.max_manifest_bytes == 0 || self.install.max_artifact_bytes == 0 {
            return Err(invalid(
                &["install.max_manifest_bytes", "install.max_artifact_bytes"],
                "must be positive".into(),
            ));
        }
        if self
            .runtime_libs
            .dir
            .as_ref()
            .is_some_and(|d| !d.is_absolute())
        {
            return Err(invalid(
                &["runtime_libs.dir"],
                "must be an absolute path".into(),
            ));
        }
        let l = &self.lifecycle;
        if l.backoff_initial_ms == 0 || l.backoff_initial_ms > l.backoff_max_ms {
            return Err(invalid(
                &["lifecycle.backoff_initial_ms", "lifecycle.backoff_max_ms"],
                "must be positive and not above backoff_max_ms".into(),
            ));
        }
        if self.events.buffer == 0 || self.events.buffer > 1 << 20 {
            return Err(invalid(
                &["events.buffer"],
                "must be between 1 and 1048576".into(),
            ));
        }
        if l.crash_loop_after == 0 {
            return Err(invalid(
                &["lifecycle.crash_loop_after"],
                "must be positive".into(),
            ));
        }
        let limits = &self.limits;
        if limits.memory_bytes == Some(0) {
            return Err(invalid(&["limits.memory_bytes"], "must be positive".into()));
        }
        if limits.cpu_cores.is_some_and(|c| !c.is_finite() || c <= 0.0) {
            return Err(invalid(
                &["limits.cpu_cores"],
                "must be a positive number of cores".into(),
            ));
        }
        if limits.open_files.is_some_and(|n| n < MIN_OPEN_FILES) {
            return Err(invalid(
                &["limits.open_files"],
                format!("at least {MIN_OPEN_FILES} (a worker needs descriptors for its channels, log and listeners)"),
            ));
        }
        if let Err((field, message)) = self.sandbox.check() {
            return Err(invalid(&[field], message));
        }
        for (field, p) in [("socket", &self.socket), ("state_dir", &self.state_dir)] {
            if let Some(p) = p {
                if !p.is_absolute() {
                    return Err(invalid(
                        &[field],
                        format!("{} is not an absolute path", p.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The socket file mode.
    pub fn mode(&self) -> Result<u32, String> {
        let s = self.socket_mode.trim_start_matches("0o");
        match u32::from_str_radix(s, 8) {
            Ok(m) if m <= 0o777 && !s.is_empty() => Ok(m),
            _ => Err(self.socket_mode.clone()),
        }
    }

    /// The plugins to preload, in order.
    pub fn plugin_specs(&self) -> Vec<crate::plugins::PluginSpec> {
        self.plugins.iter().map(|p| p.spec()).collect()
    }

    /// The socket path in force.
    pub fn socket_path(&self) -> PathBuf {
        self.socket
            .clone()
            .unwrap_or_else(crate::paths::default_socket)
    }

    /// The state directory in force.
    pub fn state_path(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(crate::paths::default_state_dir)
    }
}

/// The smallest `limits.open_files` accepted.
pub const MIN_OPEN_FILES: u64 = 16;

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, column)
}

/// The dotted key (`pool.min_idle`, `plugins[1].path`) of the innermost
/// key or value of `table` whose span holds `offset`.
pub(crate) fn key_at(table: &toml::de::DeTable<'_>, offset: usize, prefix: &str) -> Option<String> {
    for (k, v) in table.iter() {
        let path = if prefix.is_empty() {
            k.get_ref().to_string()
        } else {
            format!("{prefix}.{}", k.get_ref())
        };
        if let Some(inner) = value_key_at(v, offset, &path) {
            return Some(inner);
        }
        if k.span().contains(&offset) || v.span().contains(&offset) {
            return Some(path);
        }
    }
    None
}

fn value_key_at(
    v: &toml::Spanned<toml::de::DeValue<'_>>,
    offset: usize,
    path: &str,
) -> Option<String> {
    match v.get_ref() {
        toml::de::DeValue::Table(t) => key_at(t, offset, path),
        toml::de::DeValue::Array(a) => a.iter().enumerate().find_map(|(i, item)| {
            let p = format!("{path}[{i}]");
            value_key_at(item, offset, &p).or_else(|| item.span().contains(&offset).then_some(p))
        }),
        _ => None,
    }
}

/// The span of the last key of a dotted `field` (`pool.min_idle`), if the
/// document sets it.
fn key_span(table: &toml::de::DeTable<'_>, field: &str) -> Option<std::ops::Range<usize>> {
    let mut table = table;
    let mut parts = field.split('.').peekable();
    while let Some(part) = parts.next() {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref() == part)?;
        if parts.peek().is_none() {
            return Some(k.span());
        }
        table = match v.get_ref() {
            toml::de::DeValue::Table(t) => t,
            _ => return None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/etc/ember/emberd.toml"))
    }

    #[test]
    fn metrics_address_is_an_ip_and_port() {
        assert_eq!(Config::embedded().metrics_addr(), None);
        let c = parse("metrics_address = \"127.0.0.1:9464\"\n").unwrap();
        assert_eq!(c.metrics_addr(), Some("127.0.0.1:9464".parse().unwrap()));
        let e = parse("socket_mode = \"0660\"\nmetrics_address = \"localhost\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/ember/emberd.toml:2:1: field `metrics_address`: \"localhost\" is not an IP \
             address and port like \"127.0.0.1:9464\" or \"[::1]:9464\""
        );
        let mut c = Config::embedded();
        let e = c.set_metrics_address("9464").unwrap_err();
        assert!(e.to_string().contains("field `--metrics`: \"9464\""), "{e}");
        c.set_metrics_address("[::1]:0").unwrap();
        assert_eq!(c.metrics_addr(), Some("[::1]:0".parse().unwrap()));
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded();
        assert_eq!(c.mode().unwrap(), 0o660);
        assert!(c.plugins.is_empty());
        assert!(c.pool.min_idle <= c.pool.max_idle);
        assert_eq!(c.sandbox, crate::sandbox::SandboxConfig::default());
        assert!(c.sandbox.enabled);
    }

    #[test]
    fn full_file() {
        let c = parse(
            r#"
socket = "/tmp/x.sock"
state_dir = "/tmp/state"
socket_mode = "0600"
allowed_uids = [1000, 1001]
plugins = ["/opt/p.so", { path = "/opt/q.so", config = { size_mb = 64 } }]
[pool]
min_idle = 1
max_idle = 3
[lifecycle]
start_timeout_ms = 500
[limits]
memory_bytes = 1048576
"#,
        )
        .unwrap();
        assert_eq!(c.mode().unwrap(), 0o600);
        assert_eq!(c.plugin_specs()[1].config["size_mb"].as_integer(), Some(64));
        assert_eq!(c.plugin_specs()[0].path, PathBuf::from("/opt/p.so"));
        assert_eq!(
            c.pool,
            PoolConfig {
                min_idle: 1,
                max_idle: 3,
                zygote_start_timeout_ms: 60_000,
            }
        );
        assert_eq!(
            c.lifecycle.policy().start_timeout,
            Duration::from_millis(500)
        );
        assert_eq!(
            c.lifecycle.stop_timeout_ms,
            LifecycleConfig::default().stop_timeout_ms
        );
    }

    #[test]
    fn type_errors_name_file_line_column_and_dotted_key() {
        let e = parse("socket_mode = \"0660\"\n\n[pool]\nmin_idle = \"lots\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/ember/emberd.toml:4:12: field `pool.min_idle`: invalid type"),
            "{e}"
        );
        // The same key written dotted, and nested deeper.
        let e = parse("pool.min_idle = \"lots\"\n").unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/ember/emberd.toml:1:17: field `pool.min_idle`: "),
            "{e}"
        );
        let e = parse("[lifecycle]\nstart_timeout_ms = -1\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/ember/emberd.toml:2:20: field `lifecycle.start_timeout_ms`: "),
            "{e}"
        );
        let e = parse("allowed_uids = [1, \"x\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/ember/emberd.toml:1:20: field `allowed_uids[1]`: "),
            "{e}"
        );
        let e = parse("plugins = [\"/a.so\", { path = \"/b.so\", confg = {} }]\n")
            .unwrap_err()
            .to_string();
        // An untagged entry is reported on the array as a whole.
        assert!(
            e.starts_with("/etc/ember/emberd.toml:1:11: field `plugins`: "),
            "{e}"
        );
    }

    #[test]
    fn unknown_fields_name_their_dotted_key() {
        let e = parse("socket = \"/x\"\n[pool]\nmin_idel = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/ember/emberd.toml:3:1: field `pool.min_idel`: unknown field"),
            "{e}"
        );
        let e = parse("\nsockett = \"/x\"\n").unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/ember/emberd.toml:2:1: field `sockett`: unknown field"),
            "{e}"
        );
        let e = parse("[limits]\nmemory = 1\n").unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/ember/emberd.toml:2:1: field `limits.memory`: unknown field"),
            "{e}"
        );
    }

    #[test]
    fn syntax_errors_name_line_and_column() {
        let e = parse("[pool]\nmin_idle = = 3\n").unwrap_err().to_string();
        assert!(e.starts_with("/etc/ember/emberd.toml:2:"), "{e}");
    }

    #[test]
    fn validation_errors_name_the_line_of_the_key_set() {
        let e = parse("[pool]\nmin_idle = 5\nmax_idle = 1\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/etc/ember/emberd.toml:2:1: field `pool.min_idle`: min_idle (5) is larger than max_idle (1)"
        );
        // min_idle left at its default (2): the key the file sets is blamed.
        let e = parse("\n[pool]\nmax_idle = 1\n").unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/ember/emberd.toml:3:1: field `pool.max_idle`: "),
            "{e}"
        );
        let e = parse("socket_mode = \"rw\"\n").unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/ember/emberd.toml:1:1: field `socket_mode`: "),
            "{e}"
        );
        let e = parse("plugins = []\nsocket = \"relative\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/ember/emberd.toml:2:1: field `socket`: "),
            "{e}"
        );
        let e = parse("[limits]\nopen_files = 3\n").unwrap_err().to_string();
        assert!(
            e.starts_with("/etc/ember/emberd.toml:2:1: field `limits.open_files`: at least 16"),
            "{e}"
        );
        let e = parse("[sandbox]\ngrantable_syscalls = [\"read\"]\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/etc/ember/emberd.toml:2:1: field `sandbox.grantable_syscalls`: `read` is not a syscall the sandbox denies"
        );
        let e = parse("[sandbox]\nwritable_roots = [\"/tmp\", \"/srv/../etc\"]\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "/etc/ember/emberd.toml:2:1: field `sandbox.writable_roots`: /srv/../etc contains `..`"
        );
        let e = parse("[limits]\ncpu_cores = 0.0\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains(":2:1: field `limits.cpu_cores`"), "{e}");
        let e = parse("[lifecycle]\n  backoff_initial_ms = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/etc/ember/emberd.toml:2:3: field `lifecycle.backoff_initial_ms`"),
            "{e}"
        );
    }

    #[test]
    fn manifest_limits_win_over_config_defaults_field_by_field() {
        let c =
            parse("[limits]\nmemory_bytes = 1048576\ncpu_cores = 0.5\nopen_files = 256\n").unwrap();
        let (l, from) = c.limits.resolve(None, None);
        assert_eq!(
            l,
            Limits {
                memory: Some(1 << 20),
                cpu: Some(0.5),
                open_files: Some(256)
            }
        );
        assert_eq!(
            from,
            LimitSources {
                memory: LimitSource::Config,
                cpu: LimitSource::Config,
                open_files: LimitSource::Config
            }
        );
        let (l, from) = c.limits.resolve(Some(64 << 20), None);
        assert_eq!(
            (l.memory, from.memory),
            (Some(64 << 20), LimitSource::Manifest)
        );
        assert_eq!((l.cpu, from.cpu), (Some(0.5), LimitSource::Config));
        let (l, from) = LimitsConfig::default().resolve(None, Some(2.0));
        assert_eq!(
            (l.memory, from.memory, l.cpu, from.cpu),
            (None, LimitSource::None, Some(2.0), LimitSource::Manifest)
        );
        assert_eq!((l.open_files, from.open_files), (None, LimitSource::None));
        assert_eq!(
            serde_json::to_value(LimitSource::Config).unwrap(),
            serde_json::json!("config")
        );
    }

    #[test]
    fn default_memory_reaches_the_workers_manifest() {
        use module_runtime::manifest::Manifest;
        let plain = "name = \"m\"\nversion = \"1.0.0\"\nentry = \"libm.so\"\n";
        let out = manifest_with_memory(plain, 32 << 20).unwrap();
        assert_eq!(Manifest::parse(&out).unwrap().limits.memory, Some(32 << 20));
        // A [limits] table with other fields keeps them.
        let with_cpu = format!("{plain}[limits]\ncpu = 0.5\nstop_deadline = \"2s\"\n");
        let m = Manifest::parse(&manifest_with_memory(&with_cpu, 1 << 20).unwrap()).unwrap();
        assert_eq!(m.limits.memory, Some(1 << 20));
        assert_eq!(m.limits.cpu, Some(0.5));
        assert_eq!(m.limits.stop_deadline, Duration::from_secs(2));
        assert_eq!(manifest_with_memory("not = = toml", 1), None);
    }
}

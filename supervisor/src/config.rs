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
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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
    /// The file is not valid TOML or has a bad field.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the offending field.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, naming the field.
        message: String,
    },
    /// A value is out of range.
    #[error("{}: field `{field}`: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
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
        }
    }
}

/// Default resource limits for modules whose manifest sets none. Recorded
/// and reported; enforcement belongs to the worker launch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Address-space / memory cap in bytes.
    pub memory_bytes: Option<u64>,
    /// Open descriptor cap.
    pub open_files: Option<u64>,
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
    /// Peers whose primary gid is one of these may use the socket.
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
}

fn default_mode() -> String {
    "0660".into()
}

impl Config {
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

    /// Parses and validates TOML text; `path` is used in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().trim().to_owned(),
            }
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            message,
        };
        self.mode().map_err(|m| {
            invalid(
                "socket_mode",
                format!("{m:?} is not an octal mode like \"0660\""),
            )
        })?;
        if self.pool.min_idle > self.pool.max_idle {
            return Err(invalid(
                "pool.min_idle",
                format!(
                    "min_idle ({}) is larger than max_idle ({})",
                    self.pool.min_idle, self.pool.max_idle
                ),
            ));
        }
        if self.pool.max_idle > 256 {
            return Err(invalid("pool.max_idle", "at most 256".into()));
        }
        let l = &self.lifecycle;
        if l.backoff_initial_ms == 0 || l.backoff_initial_ms > l.backoff_max_ms {
            return Err(invalid(
                "lifecycle.backoff_initial_ms",
                "must be positive and not above backoff_max_ms".into(),
            ));
        }
        if l.crash_loop_after == 0 {
            return Err(invalid(
                "lifecycle.crash_loop_after",
                "must be positive".into(),
            ));
        }
        for (field, p) in [("socket", &self.socket), ("state_dir", &self.state_dir)] {
            if let Some(p) = p {
                if !p.is_absolute() {
                    return Err(invalid(
                        field,
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

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(s, Path::new("/etc/ember/emberd.toml"))
    }

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::embedded();
        assert_eq!(c.mode().unwrap(), 0o660);
        assert!(c.plugins.is_empty());
        assert!(c.pool.min_idle <= c.pool.max_idle);
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
                max_idle: 3
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
    fn errors_name_file_line_and_field() {
        let e = parse("socket = \"/x\"\n[pool]\nmin_idel = 3\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("/etc/ember/emberd.toml:3:"), "{s}");
        assert!(s.contains("min_idel"), "{s}");

        let e = parse("[pool]\nmin_idle = \"two\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/etc/ember/emberd.toml:2:"), "{e}");

        let e = parse("socket_mode = \"rw\"\n").unwrap_err().to_string();
        assert!(e.contains("socket_mode"), "{e}");

        let e = parse("[pool]\nmin_idle = 5\nmax_idle = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("pool.min_idle"), "{e}");

        let e = parse("socket = \"relative\"\n").unwrap_err().to_string();
        assert!(e.contains("`socket`"), "{e}");
    }
}

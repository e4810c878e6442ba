//! The part of a module's `module.toml` the supervisor acts on (format:
//! `docs/module-manifest.md`): name, version, entry, listeners, deadlines.
//!
//! Parsing here is lenient about the tables the supervisor does not use
//! (exports, imports, plugins, config…): the worker validates the whole
//! manifest again with module-runtime's strict parser. Seam: once
//! `module_runtime::manifest::Manifest::parse` is a dependency, [`parse`]
//! should call it first so install errors are the strict ones.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Name of the manifest file inside a module directory.
pub const FILE_NAME: &str = "module.toml";

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddress {
    /// A TCP address.
    Tcp(std::net::SocketAddr),
    /// A Unix socket path (`unix:/path`).
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddress::Tcp(a) => write!(f, "{a}"),
            ListenAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A listener the supervisor binds for the module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerSpec {
    /// Name the module asks for.
    pub name: String,
    /// Where.
    pub address: ListenAddress,
}

/// What the supervisor reads from a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestSummary {
    /// Module name.
    pub name: String,
    /// Module version.
    pub version: String,
    /// The `cdylib`, relative to the manifest's directory or absolute.
    pub entry: PathBuf,
    /// Replicas asked for.
    pub replicas: u32,
    /// Listeners to bind.
    pub listeners: Vec<ListenerSpec>,
    /// `limits.start_deadline`.
    pub start_deadline: Option<Duration>,
    /// `limits.stop_deadline`.
    pub stop_deadline: Option<Duration>,
}

/// A manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Not valid TOML or a required field is missing or mistyped.
    #[error("{0}")]
    Syntax(String),
    /// A field has a bad value.
    #[error("field `{field}`: {message}")]
    Field {
        /// The field (dotted path).
        field: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
struct RawListener {
    name: String,
    address: String,
}

#[derive(Deserialize, Default)]
struct RawLimits {
    start_deadline: Option<toml::Value>,
    stop_deadline: Option<toml::Value>,
}

#[derive(Deserialize)]
struct Raw {
    name: String,
    version: String,
    entry: PathBuf,
    #[serde(default = "one")]
    replicas: u32,
    #[serde(default)]
    listeners: Vec<RawListener>,
    #[serde(default)]
    limits: RawLimits,
}

fn one() -> u32 {
    1
}

/// Checks a name: 1–64 bytes of `[a-z0-9_-]`, starting with `[a-z0-9]`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

fn field(field: impl Into<String>, message: impl Into<String>) -> ManifestError {
    ManifestError::Field {
        field: field.into(),
        message: message.into(),
    }
}

/// Parses `"3s"`, `"500ms"`, `"1m"` or a number of seconds.
pub fn parse_duration(v: &toml::Value) -> Option<Duration> {
    match v {
        toml::Value::Integer(n) if *n >= 0 => Some(Duration::from_secs(*n as u64)),
        toml::Value::Float(f) if *f >= 0.0 && f.is_finite() => Some(Duration::from_secs_f64(*f)),
        toml::Value::String(s) => {
            let s = s.trim();
            let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
                (n, 0.001)
            } else if let Some(n) = s.strip_suffix('s') {
                (n, 1.0)
            } else if let Some(n) = s.strip_suffix('m') {
                (n, 60.0)
            } else {
                (s, 1.0)
            };
            let x: f64 = num.trim().parse().ok()?;
            (x >= 0.0 && x.is_finite()).then(|| Duration::from_secs_f64(x * mult))
        }
        _ => None,
    }
}

/// Parses a listener address: `host:port` or `unix:/absolute/path`.
pub fn parse_address(s: &str) -> Option<ListenAddress> {
    if let Some(p) = s.strip_prefix("unix:") {
        let p = PathBuf::from(p);
        return p.is_absolute().then_some(ListenAddress::Unix(p));
    }
    s.parse().ok().map(ListenAddress::Tcp)
}

/// Parses a manifest.
pub fn parse(text: &str) -> Result<ManifestSummary, ManifestError> {
    let raw: Raw = toml::from_str(text).map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
        match line {
            Some(l) => ManifestError::Syntax(format!("line {l}: {}", e.message().trim())),
            None => ManifestError::Syntax(e.message().trim().to_owned()),
        }
    })?;
    if !valid_name(&raw.name) {
        return Err(field(
            "name",
            format!(
                "{:?} is not 1-64 of [a-z0-9_-] starting with a letter or digit",
                raw.name
            ),
        ));
    }
    let v = &raw.version;
    if v.is_empty()
        || v.len() > 64
        || !v.starts_with(|c: char| c.is_ascii_digit())
        || v.chars().any(char::is_whitespace)
    {
        return Err(field("version", format!("{v:?} is not a version")));
    }
    if raw.entry.as_os_str().is_empty() {
        return Err(field("entry", "empty"));
    }
    if raw.replicas == 0 {
        return Err(field("replicas", "must be at least 1"));
    }
    let mut listeners: Vec<ListenerSpec> = Vec::new();
    for (i, l) in raw.listeners.iter().enumerate() {
        if !valid_name(&l.name) {
            return Err(field(
                format!("listeners[{i}].name"),
                format!("{:?} is not a valid name", l.name),
            ));
        }
        if listeners.iter().any(|o| o.name == l.name) {
            return Err(field(
                format!("listeners[{i}].name"),
                format!("{:?} is declared twice", l.name),
            ));
        }
        let address = parse_address(&l.address).ok_or_else(|| {
            field(
                format!("listeners[{i}].address"),
                format!(
                    "{:?} is neither host:port nor unix:/absolute/path",
                    l.address
                ),
            )
        })?;
        listeners.push(ListenerSpec {
            name: l.name.clone(),
            address,
        });
    }
    let deadline =
        |name: &str, v: &Option<toml::Value>| -> Result<Option<Duration>, ManifestError> {
            match v {
                None => Ok(None),
                Some(v) => parse_duration(v).map(Some).ok_or_else(|| {
                    field(format!("limits.{name}"), format!("{v} is not a duration"))
                }),
            }
        };
    Ok(ManifestSummary {
        start_deadline: deadline("start_deadline", &raw.limits.start_deadline)?,
        stop_deadline: deadline("stop_deadline", &raw.limits.stop_deadline)?,
        name: raw.name,
        version: raw.version,
        entry: raw.entry,
        replicas: raw.replicas,
        listeners,
    })
}

/// Resolves what the user gave to `install`: a module directory or its
/// manifest file. Returns the manifest path.
pub fn locate(path: &Path) -> PathBuf {
    if path.is_dir() {
        path.join(FILE_NAME)
    } else {
        path.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn full_manifest() {
        let m = parse(
            r#"
name = "greeter"
version = "0.1.0"
entry = "libgreeter.so"
replicas = 2

[[imports]]
name = "kv"

[[listeners]]
name = "http"
address = "127.0.0.1:8080"

[[listeners]]
name = "admin"
address = "unix:/run/ember/greeter.sock"

[limits]
memory = "256MiB"
start_deadline = "3s"
stop_deadline = 2

[config]
greeting = "hello"
"#,
        )
        .unwrap();
        assert_eq!(m.name, "greeter");
        assert_eq!(m.replicas, 2);
        assert_eq!(m.listeners.len(), 2);
        assert_eq!(m.listeners[0].address.to_string(), "127.0.0.1:8080");
        assert_eq!(
            m.listeners[1].address,
            ListenAddress::Unix("/run/ember/greeter.sock".into())
        );
        assert_eq!(m.start_deadline, Some(Duration::from_secs(3)));
        assert_eq!(m.stop_deadline, Some(Duration::from_secs(2)));
    }

    #[test]
    fn refuses_bad_fields() {
        let base = "version = \"1.0.0\"\nentry = \"x.so\"\n";
        assert!(parse(&format!("name = \"Kv\"\n{base}")).is_err());
        assert!(parse(&format!("name = \"../x\"\n{base}")).is_err());
        assert!(parse("name = \"kv\"\nversion = \"1 2\"\nentry = \"x\"").is_err());
        assert!(parse("name = \"kv\"\nentry = \"x\"").is_err());
        assert!(parse("\0garbage").is_err());
        let e = parse(&format!(
            "name = \"kv\"\n{base}[[listeners]]\nname = \"h\"\naddress = \"nowhere\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("listeners[0].address"), "{e}");
        let e = parse(&format!(
            "name = \"kv\"\n{base}[limits]\nstart_deadline = \"soon\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("limits.start_deadline"), "{e}");
        let e = parse("name = \"kv\"\nversion = 1\nentry = \"x\"")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("line 2:"), "{e}");
    }

    #[test]
    fn durations() {
        let d = |s: &str| parse_duration(&toml::Value::String(s.into()));
        assert_eq!(d("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(d("1m"), Some(Duration::from_secs(60)));
        assert_eq!(d("2.5s"), Some(Duration::from_millis(2500)));
        assert_eq!(d("-1s"), None);
        assert_eq!(d("x"), None);
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC{0,400}") {
            let _ = parse(&text);
        }

        #[test]
        fn parse_never_panics_on_near_manifests(
            name in "[a-zA-Z0-9_./-]{0,70}",
            version in "[0-9a-z. +-]{0,20}",
            addr in "(unix:)?[0-9a-z./:\\[\\]]{0,30}",
            start in "[0-9a-z.-]{0,8}",
        ) {
            let text = format!(
                "name = {name:?}\nversion = {version:?}\nentry = \"x.so\"\n[[listeners]]\nname = \"l\"\naddress = {addr:?}\n[limits]\nstart_deadline = {start:?}\n"
            );
            let _ = parse(&text);
        }
    }
}

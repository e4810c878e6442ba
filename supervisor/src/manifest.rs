//! The part of a module's `module.toml` the supervisor acts on (format:
//! `docs/module-manifest.md`): name, version, entry, listeners, services,
//! deadlines, limits.
//!
//! There is one parser: module-runtime's strict
//! `module_runtime::manifest::Manifest::parse`, so install errors name the
//! field and the line. This module only derives what the supervisor needs
//! (bound listener addresses, for one) from its result.

use std::path::{Path, PathBuf};
use std::time::Duration;

use module_runtime::manifest::Manifest;

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

/// A service a module exports or imports: its name and the schema version
/// of its messages. An import is wired only to an export of the same name
/// and version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceRef {
    /// Service name.
    pub name: String,
    /// Schema version (≥ 1).
    pub version: u32,
}

impl ServiceRef {
    /// `name` at `version`.
    pub fn new(name: impl Into<String>, version: u32) -> Self {
        Self {
            name: name.into(),
            version,
        }
    }
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} version {}", self.name, self.version)
    }
}

/// What the supervisor reads from a manifest.
#[derive(Debug, Clone, PartialEq)]
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
    /// Services exported.
    pub exports: Vec<ServiceRef>,
    /// Services imported.
    pub imports: Vec<ServiceRef>,
    /// The imports the module cannot start without (not `optional`).
    pub required_imports: Vec<ServiceRef>,
    /// `limits.memory`, in bytes.
    pub memory: Option<u64>,
    /// `limits.cpu`, in cores.
    pub cpu: Option<f64>,
    /// `limits.start_deadline`.
    pub start_deadline: Option<Duration>,
    /// `limits.stop_deadline`.
    pub stop_deadline: Option<Duration>,
    /// How a new revision replaces a running one.
    pub rollout: module_runtime::manifest::Rollout,
}

/// A manifest was refused. The messages say what is wrong and where
/// (line, field); the caller names the file.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// TOML syntax, a type mismatch, a missing or an unknown field: where,
    /// and toml's message without the source line it would quote (the file
    /// may be anything a client named, not a manifest; see [`redact`]).
    #[error("line {line}, column {column}: {}{message}", field.as_ref().map_or(String::new(), |f| format!("field `{f}`: ")))]
    Syntax {
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// The dotted key the error is in (`limits.start_deadline`), when
        /// it is one and looks like a key.
        field: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// A field parsed but its value is not allowed.
    #[error("field `{field}`: {reason}")]
    Field {
        /// Dotted path of the field, e.g. `listeners[1].name`.
        field: String,
        /// What is wrong.
        reason: String,
    },
    /// A listener address is neither `host:port` nor `unix:/absolute/path`.
    #[error("field `listeners[{index}].address`: {address:?} is neither host:port nor unix:/absolute/path")]
    Address {
        /// Index in `listeners`.
        index: usize,
        /// The address.
        address: String,
    },
    /// Any other refusal of module-runtime's parser.
    #[error(transparent)]
    Runtime(module_runtime::manifest::ManifestError),
}

impl ManifestError {
    /// module-runtime's refusal of `text`, taken apart so that "invalid
    /// manifest" is said once, by the caller that knows the file.
    fn of(e: module_runtime::manifest::ManifestError, text: &str) -> Self {
        use module_runtime::manifest::ManifestError as Runtime;
        match e {
            Runtime::Parse(source) => {
                let offset = source.span().map_or(0, |s| s.start);
                let (line, column) = line_col(text, offset);
                // The spanned document, as far as it parses, tells which
                // key the error is in (toml's message does not).
                let (doc, _) = toml::de::DeTable::parse_recoverable(text);
                let field = source
                    .span()
                    .and_then(|_| crate::config::key_at(doc.get_ref(), offset, ""))
                    .filter(|f| key_like(f))
                    .filter(|_| !source.message().starts_with("unknown field"));
                ManifestError::Syntax {
                    line,
                    column,
                    field,
                    message: redact(source.message().trim()),
                }
            }
            Runtime::Invalid { field, reason } => ManifestError::Field { field, reason },
            e @ Runtime::Read { .. } => ManifestError::Runtime(e),
        }
    }
}

/// A short word of `[A-Za-z0-9_.[]-]`: a field name or a dotted key, shown
/// in errors; anything else read from the file is not.
fn key_like(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 48
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.[]".contains(c))
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map_or(offset + 1, |i| offset - i);
    (line, column)
}

/// toml's message with what it quotes from the file taken out, so that
/// naming any file as a manifest shows nothing of its content: the value
/// of a type mismatch (`invalid type: string "…"` becomes `invalid type:
/// string`), the unknown variant, and any quoted literal that is not a
/// plain key-like word (field names, the expected lists and units stay).
pub fn redact(message: &str) -> String {
    let mut m = message.to_owned();
    for prefix in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = m.strip_prefix(prefix) {
            if let Some(end) = rest.find(", expected ") {
                let kind = match rest[..end].split_once([' ', '`', '"']) {
                    Some((k, _)) => k,
                    None => &rest[..end],
                };
                let kind = if kind == "floating" {
                    "floating point"
                } else {
                    kind
                };
                m = format!("{prefix}{kind}{}", &rest[end..]);
            }
        }
    }
    if let Some(rest) = m.strip_prefix("unknown variant `") {
        if let Some(end) = rest.find('`') {
            m = format!("unknown variant{}", &rest[end + 1..]);
        }
    }
    // Backticked or double-quoted literals: kept only if key-like.
    let mut out = String::with_capacity(m.len());
    let mut rest = m.as_str();
    while let Some(i) = rest.find(['`', '"']) {
        let q = rest.as_bytes()[i] as char;
        out.push_str(&rest[..=i]);
        let after = &rest[i + 1..];
        match after.find(q) {
            Some(j) => {
                let lit = &after[..j];
                out.push_str(if key_like(lit) { lit } else { "…" });
                out.push(q);
                rest = &after[j + 1..];
            }
            None => {
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Checks a name: 1–64 bytes of `[a-z0-9_-]`, starting with `[a-z0-9]`.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Parses a listener address: `host:port` or `unix:/absolute/path`.
pub fn parse_address(s: &str) -> Option<ListenAddress> {
    if let Some(p) = s.strip_prefix("unix:") {
        let p = PathBuf::from(p);
        return p.is_absolute().then_some(ListenAddress::Unix(p));
    }
    s.parse().ok().map(ListenAddress::Tcp)
}

/// Parses and validates a manifest with module-runtime's parser.
pub fn parse(text: &str) -> Result<ManifestSummary, ManifestError> {
    let m = Manifest::parse(text).map_err(|e| ManifestError::of(e, text))?;
    let listeners = m
        .listeners
        .iter()
        .enumerate()
        .map(|(index, l)| {
            parse_address(&l.address)
                .map(|address| ListenerSpec {
                    name: l.name.clone(),
                    address,
                })
                .ok_or_else(|| ManifestError::Address {
                    index,
                    address: l.address.clone(),
                })
        })
        .collect::<Result<_, _>>()?;
    Ok(ManifestSummary {
        start_deadline: Some(m.limits.start_deadline),
        stop_deadline: Some(m.limits.stop_deadline),
        rollout: m.rollout.clone(),
        memory: m.limits.memory,
        cpu: m.limits.cpu,
        exports: m
            .exports
            .iter()
            .map(|e| ServiceRef::new(&e.name, e.version))
            .collect(),
        imports: m
            .imports
            .iter()
            .map(|i| ServiceRef::new(&i.name, i.version))
            .collect(),
        required_imports: m
            .imports
            .iter()
            .filter(|i| !i.optional)
            .map(|i| ServiceRef::new(&i.name, i.version))
            .collect(),
        name: m.name,
        version: m.version,
        entry: m.entry,
        replicas: m.replicas.max(1),
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

[[imports]]
name = "prices"
optional = true

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
        assert_eq!(
            m.imports,
            vec![ServiceRef::new("kv", 1), ServiceRef::new("prices", 1)]
        );
        assert_eq!(m.required_imports, vec![ServiceRef::new("kv", 1)]);
        assert_eq!(m.memory, Some(256 << 20));
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
        assert!(e.contains("line 5") && e.contains("start_deadline"), "{e}");
        let e =
            crate::error_chain(&parse("name = \"kv\"\nversion = 1\nentry = \"x\"").unwrap_err());
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("version"), "{e}");
        let e =
            crate::error_chain(&parse(&format!("name = \"kv\"\n{base}colour = 1\n")).unwrap_err());
        assert!(e.contains("colour"), "{e}");
        // toml's message is said once (not again as a source), and the
        // file is the caller's to name.
        let e = crate::error_chain(
            &parse(&format!("name = \"kv\"\n{base}replicaz = 2\n")).unwrap_err(),
        );
        assert!(
            e.starts_with("line 4, column 1: unknown field `replicaz`"),
            "{e}"
        );
        assert_eq!(e.matches("unknown field `replicaz`").count(), 1, "{e}");
        assert!(!e.contains("invalid manifest"), "{e}");
        assert!(!e.contains("replicaz = 2"), "no source line: {e}");
        let e = parse(&format!("name = \"kv\"\n{base}replicas = 0\n")).unwrap_err();
        assert!(e.to_string().starts_with("field `replicas`: "), "{e}");
    }

    #[test]
    fn errors_show_nothing_of_a_file_that_is_not_a_manifest() {
        let secrets = [
            "root:$6$hunter2hash:19000:0:99999:7:::\n",
            "API_KEY=sk-live-hunter2\n",
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n",
            "name = \"x\"\nversion = \"1\"\nentry = \"e\"\nreplicas = \"hunter2\"\n",
            "name = \"x\"\nversion = \"1\"\nentry = \"e\"\n[rollout]\nstrategy = \"hunter2\"\n",
            "password = \"hunter2\"\n",
            "[default]\naws_secret_access_key = hunter2/ABC+def\n",
        ];
        for text in secrets {
            let e = crate::error_chain(&parse(text).unwrap_err());
            for secret in ["hunter2", "BEGIN", "b3BlbnNz", "sk-live"] {
                assert!(!e.contains(secret), "{text:?} -> {e}");
            }
            assert!(e.starts_with("line "), "{e}");
        }
    }

    #[test]
    fn redact_keeps_field_names_and_drops_values() {
        assert_eq!(
            redact("invalid type: string \"s3cret\", expected u32"),
            "invalid type: string, expected u32"
        );
        assert_eq!(
            redact("invalid value: integer `-5`, expected u32"),
            "invalid value: integer, expected u32"
        );
        assert_eq!(
            redact("unknown variant `s3cret`, expected `surge` or `rolling`"),
            "unknown variant, expected `surge` or `rolling`"
        );
        assert_eq!(
            redact("unknown field `colour`, expected one of `name`, `version`"),
            "unknown field `colour`, expected one of `name`, `version`"
        );
        assert_eq!(
            redact("`a b/c+=` is not a duration like \"500ms\""),
            "`…` is not a duration like \"500ms\""
        );
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

//! The container methods (`RunContainer`, `WaitContainer`, `KillContainer`,
//! `RemoveContainer`, `ContainerStatus`, `UpdateContainer`): what the
//! containerd shim (`containerd-shim-ember-v1`) asks of emberd for one
//! container of a pod. Each is keyed by the containerd container id; the
//! instance is named `k8s-<first 12 hex digits of sha256(id)>`, runs one
//! replica, is never restarted by emberd (the kubelet restarts) and is not
//! recorded in the desired state.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::errors;
use crate::varlink::ErrorReply;

/// Parameters of `RunContainer`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunContainer {
    /// The containerd container id.
    pub id: String,
    /// A directory holding `module.toml` and the library (the mounted
    /// image root filesystem).
    pub path: PathBuf,
    /// A network namespace file the worker joins before the module's code
    /// runs (absent: emberd's own network).
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Memory limit, bytes.
    #[serde(default)]
    pub memory_max: Option<u64>,
    /// CPU limit, cores.
    #[serde(default)]
    pub cpu: Option<f64>,
    /// Where the module's stdout goes (a FIFO or a file).
    #[serde(default)]
    pub stdout: Option<PathBuf>,
    /// Where the module's stderr goes (a FIFO or a file).
    #[serde(default)]
    pub stderr: Option<PathBuf>,
    /// Free-form labels (Kubernetes namespace, pod, container names),
    /// shown by `ContainerStatus`.
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// Reply of `RunContainer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunContainerReply {
    /// The instance's name ([`instance_name`]).
    pub name: String,
    /// Its worker's pid.
    pub pid: i32,
}

/// Parameters of `WaitContainer`, `RemoveContainer` and `ContainerStatus`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerId {
    /// The containerd container id.
    pub id: String,
}

/// Parameters of `KillContainer`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillContainer {
    /// The containerd container id.
    pub id: String,
    /// The signal number.
    pub signal: i32,
}

/// Parameters of `UpdateContainer`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateContainer {
    /// The containerd container id.
    pub id: String,
    /// New memory limit, bytes.
    #[serde(default)]
    pub memory_max: Option<u64>,
    /// New CPU limit, cores.
    #[serde(default)]
    pub cpu: Option<f64>,
}

/// How a container's worker ended (the final reply of `WaitContainer`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerExit {
    /// The exit code, or 128 + the signal when killed by one.
    pub exit_status: i32,
    /// The signal that killed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// `exited`, `signaled` or `oom`.
    pub reason: &'static str,
    /// When, RFC 3339 UTC.
    pub exited_at: String,
}

/// Reply of `ContainerStatus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContainerStatusReply {
    /// The instance's name.
    pub name: String,
    /// `starting`, `running`, `stopping` or `exited`.
    pub state: &'static str,
    /// The worker's pid while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// Once exited: its status (see [`ContainerExit`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// Once exited: `exited`, `signaled` or `oom`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// The labels given to `RunContainer`.
    pub labels: BTreeMap<String, String>,
}

/// The instance name of container `id`: `k8s-` and the first 12 hex
/// digits of the SHA-256 of the id, one per id (containerd ids of one pod
/// often share their first characters).
pub fn instance_name(id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(id.as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("k8s-{hex}")
}

/// Checks a container id: 1 to 76 characters of `[A-Za-z0-9_.-]`, as
/// containerd's identifiers are.
pub fn check_id(id: &str) -> Result<(), ErrorReply> {
    let ok = !id.is_empty()
        && id.len() <= 76
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(super::invalid_input(format!(
            "container id {id:?} is not 1 to 76 characters of [A-Za-z0-9_.-]"
        )))
    }
}

impl RunContainer {
    /// Checks the fields that need no filesystem.
    pub fn validated(self) -> Result<Self, ErrorReply> {
        check_id(&self.id)?;
        for (field, p) in [
            ("path", Some(&self.path)),
            ("netns", self.netns.as_ref()),
            ("stdout", self.stdout.as_ref()),
            ("stderr", self.stderr.as_ref()),
        ] {
            if let Some(p) = p {
                if !p.is_absolute() {
                    return Err(super::invalid_input(format!(
                        "{field} {} is not absolute",
                        p.display()
                    )));
                }
            }
        }
        check_limits(self.memory_max, self.cpu)?;
        Ok(self)
    }
}

impl UpdateContainer {
    /// Checks the limits.
    pub fn validated(self) -> Result<Self, ErrorReply> {
        check_id(&self.id)?;
        check_limits(self.memory_max, self.cpu)?;
        Ok(self)
    }
}

fn check_limits(memory: Option<u64>, cpu: Option<f64>) -> Result<(), ErrorReply> {
    if memory == Some(0) {
        return Err(super::invalid_input("memory_max must be more than 0 bytes"));
    }
    if let Some(c) = cpu {
        if !(c.is_finite() && c > 0.0) {
            return Err(super::invalid_input(format!(
                "cpu {c} is not a positive number of cores"
            )));
        }
    }
    Ok(())
}

/// `Conflict`: a container of that id (or an instance of that name)
/// exists.
pub fn conflict(id: &str, reason: impl Into<String>) -> ErrorReply {
    ErrorReply::new(
        errors::CONFLICT,
        json!({ "id": id, "reason": reason.into() }),
    )
}

/// `ModuleNotFound` for an unknown container id.
pub fn not_found(id: &str) -> ErrorReply {
    super::module_not_found(&format!("container {id}"))
}

/// The current time as RFC 3339 UTC with nanoseconds.
pub fn rfc3339_now() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs() as i64, d.subsec_nanos())
}

/// `secs` (Unix time) and `nanos` as RFC 3339 UTC.
pub fn rfc3339(secs: i64, nanos: u32) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_twelve_hex_digits_of_the_ids_sha256() {
        // printf abc | sha256sum: ba7816bf8f01cfea...
        assert_eq!(instance_name("abc"), "k8s-ba7816bf8f01");
        // Ids sharing their first 12 characters get names of their own.
        assert_ne!(
            instance_name("my-greeter-pod-a"),
            instance_name("my-greeter-pod-b")
        );
    }

    #[test]
    fn ids_are_checked() {
        assert!(check_id("abc-1.2_x").is_ok());
        assert!(check_id("").is_err());
        assert!(check_id("a/b").is_err());
        assert!(check_id(&"a".repeat(77)).is_err());
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(rfc3339(1_764_979_199, 0), "2025-12-05T23:59:59.000000000Z");
    }

    #[test]
    fn run_container_refuses_relative_paths_and_bad_limits() {
        let r = |v: serde_json::Value| {
            serde_json::from_value::<RunContainer>(v)
                .unwrap()
                .validated()
        };
        assert!(r(json!({"id": "a", "path": "/m"})).is_ok());
        assert!(r(json!({"id": "a", "path": "m"})).is_err());
        assert!(r(json!({"id": "a", "path": "/m", "stdout": "out"})).is_err());
        assert!(r(json!({"id": "a", "path": "/m", "memory_max": 0})).is_err());
        assert!(r(json!({"id": "a", "path": "/m", "cpu": -1.0})).is_err());
    }
}

//! `History(name)`: a module's revisions, newest first.

use serde::{Deserialize, Serialize};

/// Parameters of `History`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct History {
    /// Module name.
    pub name: String,
}

/// One revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Revision {
    /// Its number.
    pub revision: u64,
    /// Module version.
    pub version: String,
    /// SHA-256 of its artifact.
    pub artifact_sha256: String,
    /// When it was deployed, RFC 3339 UTC.
    pub deployed_at: String,
    /// `active`, `rolling-out`, `superseded`, `rolled-back`, `aborted`,
    /// `failed`.
    pub outcome: &'static str,
    /// Why it was aborted, rolled back or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Reply of `History`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HistoryReply {
    /// Newest first.
    pub revisions: Vec<Revision>,
}

//! `Pool()`: warm pool counters.

use serde::{Deserialize, Serialize};

use crate::pool::PoolStats;

/// Parameters of `Pool` (none).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {}

/// Reply of `Pool`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolReply {
    /// The counters.
    pub pool: PoolStats,
}

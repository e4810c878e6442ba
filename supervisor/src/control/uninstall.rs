//! `Uninstall(name)`: stop a module and remove it.

use serde::{Deserialize, Serialize};

use crate::varlink::ErrorReply;

/// Parameters of `Uninstall`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Uninstall {
    /// Module name.
    pub name: String,
}

/// Reply of `Uninstall`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UninstallReply {
    /// A worker had not exited by the stop deadline and was killed
    /// (SIGKILL).
    pub killed: bool,
}

/// Why an uninstall failed.
#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    /// Not installed.
    #[error("module {0} is not installed")]
    NotFound(String),
    /// The desired state could not be written; the module is stopped but
    /// still recorded.
    #[error("cannot record the uninstall of {name}")]
    Store {
        /// Name.
        name: String,
        /// Why.
        #[source]
        source: crate::store::StoreError,
    },
}

impl From<UninstallError> for ErrorReply {
    fn from(e: UninstallError) -> Self {
        match &e {
            UninstallError::NotFound(name) => super::module_not_found(name),
            UninstallError::Store { .. } => super::invalid_input(crate::error_chain(&e)),
        }
    }
}

//! The worker control protocol as the supervisor speaks it: module-runtime's
//! `protocol` (docs/abi.md §4, "Control protocol"), used as is. The
//! worker body is module-runtime's `host::worker::run`, called by the
//! zygote's fork path.
//!
//! A worker is forked by the zygote (`module_runtime::host::fork`) with stdin
//! (`/dev/null`), stdout and stderr (the daemon's until a
//! [`GrantKind::Stdio`] grant redirects them into the module's log), its
//! channel to the supervisor at the lowest free number (3: the zygote holds
//! 3 to 18 while plugins load, so none of theirs is there) and every
//! descriptor its plugins opened, at the same numbers as in the zygote.

pub use module_runtime::abi::GrantKind;
pub use module_runtime::protocol::{
    Failure, FailureKind, FromWorker, Grant, LaunchOrder, LogLevel, Message, SandboxOrder,
    SandboxReport, Stage, State as WorkerState, ToWorker,
};

/// Whether restarting cannot help: the artifact itself is unusable, or
/// the sandbox cannot be applied (a uid switch refused by the system).
pub fn is_permanent(kind: FailureKind) -> bool {
    matches!(
        kind,
        FailureKind::BadLaunchOrder
            | FailureKind::BadArtifact
            | FailureKind::DlopenFailed
            | FailureKind::MissingSymbol
            | FailureKind::AbiMismatch
            | FailureKind::Sandbox
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_failures() {
        assert!(is_permanent(FailureKind::AbiMismatch));
        assert!(!is_permanent(FailureKind::Panic));
        assert!(!is_permanent(FailureKind::Crashed));
        assert_eq!(GrantKind::Import.fd_count(), 2);
        assert_eq!(GrantKind::Stdio.fd_count(), 1);
    }
}

//! Exit codes of a worker process (also documented in `docs/abi.md`).

/// The module stopped cleanly (or an idle worker was told to stop).
pub const OK: i32 = 0;
/// The launch order was malformed, or the control socket broke.
pub const LAUNCH: i32 = 10;
/// The artifact could not be loaded (ELF, dlopen, symbol, ABI, SDK).
pub const LOAD: i32 = 11;
/// `start` failed or panicked.
pub const START: i32 = 12;
/// `serve` failed or panicked.
pub const SERVE: i32 = 13;
/// `stop` failed or panicked.
pub const STOP: i32 = 14;
/// Not ready within the start deadline.
pub const NEVER_READY: i32 = 15;
/// Still running at the stop deadline.
pub const STOP_DEADLINE: i32 = 16;
/// Memory limit exceeded. No longer used by the worker itself: the
/// host enforces `limits.memory` (a cgroup, or emberd's memory watch,
/// which kills with `SIGKILL`); kept so the number is not reused.
pub const MEMORY: i32 = 17;

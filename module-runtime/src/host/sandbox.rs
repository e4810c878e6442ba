//! The module sandbox: what a worker gives up after its launch order
//! arrived and before the module's code is loaded (see `docs/design.md`,
//! "Trust"). In order:
//!
//! 1. its own uid and gid (`setgroups([])`, `setresgid`, `setresuid`), when
//!    emberd sent them (it is root); the parent-death signal, which the
//!    kernel clears on a credential change, is set again;
//! 2. `PR_SET_DUMPABLE 0` (no core dumps, `/proc/PID` owned by root, no
//!    ptrace by its own uid) and `PR_SET_NO_NEW_PRIVS 1`;
//! 3. Landlock, where the kernel has it: the whole filesystem read and
//!    execute only, except the manifest's `[sandbox] writable` paths and
//!    [`ALWAYS_WRITABLE`]; signals and abstract Unix sockets scoped to the
//!    worker (ABI 6 and later);
//! 4. a seccomp filter (built with `seccompiler`) that fails the syscalls of
//!    [`DENIED`] with `EPERM`, `clone` with a namespace flag with `EPERM`,
//!    and `clone3` with `ENOSYS` (its flags are behind a pointer the filter
//!    cannot read; glibc then falls back to `clone`), on every thread.
//!
//! It runs while the worker has a single thread, so every thread the module
//! starts inherits all of it. Any step that fails fails the launch: a module
//! never runs with less than it was promised.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::protocol::{SandboxOrder, SandboxReport};

/// Syscalls a sandboxed module gets `EPERM` for, unless its manifest asks
/// for one in `[sandbox] allow_syscalls` and emberd's configuration lists
/// it in `[sandbox] grantable_syscalls`. Name and number on this
/// architecture.
pub const DENIED: &[(&str, libc::c_long)] = &[
    // Other processes' memory and descriptors.
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("kcmp", libc::SYS_kcmp),
    // Mounts and namespaces.
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("fsopen", libc::SYS_fsopen),
    ("fsmount", libc::SYS_fsmount),
    ("fsconfig", libc::SYS_fsconfig),
    ("fspick", libc::SYS_fspick),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("unshare", libc::SYS_unshare),
    ("setns", libc::SYS_setns),
    // The kernel itself.
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("acct", libc::SYS_acct),
    ("quotactl", libc::SYS_quotactl),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("syslog", libc::SYS_syslog),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
];

/// `clone` flags that create a namespace: `clone` with any of them fails
/// with `EPERM` (`CLONE_NEWTIME` shares its bit with the exit signal in
/// `clone`; it only exists for `clone3` and `unshare`, both refused).
const NAMESPACE_FLAGS: [libc::c_int; 7] = [
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWCGROUP,
];

/// Paths every sandboxed module may write besides its declared ones:
/// the character devices programs expect to open for writing.
pub const ALWAYS_WRITABLE: [&str; 3] = ["/dev/null", "/dev/zero", "/dev/full"];

/// Whether `name` is a syscall the sandbox denies (so one a manifest may
/// ask for).
pub fn is_denied(name: &str) -> bool {
    DENIED.iter().any(|(n, _)| *n == name)
}

/// A step of the sandbox failed; the launch fails with it.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// Switching to the module's uid or gid failed.
    #[error("cannot switch to uid {uid} gid {gid} ({call})")]
    Identity {
        /// The uid asked for.
        uid: u32,
        /// The gid asked for.
        gid: u32,
        /// The call that failed.
        call: &'static str,
        /// Why.
        #[source]
        source: nix::Error,
    },
    /// The parent died while the credentials changed.
    #[error("the parent exited while the sandbox was applied")]
    Orphaned,
    /// A `prctl` failed.
    #[error("{0} failed")]
    Prctl(&'static str, #[source] nix::Error),
    /// The manifest asks for a syscall the filter does not deny.
    #[error("`{0}` is not a syscall the sandbox denies")]
    UnknownSyscall(String),
    /// The seccomp filter could not be built or installed.
    #[error("seccomp filter")]
    Seccomp(#[source] seccompiler::Error),
    /// The Landlock ruleset could not be built or enforced.
    #[error("landlock ruleset")]
    Landlock(#[source] landlock::RulesetError),
}

/// The seccomp programs for a module allowed `allow` (names of
/// [`DENIED`]): the deny list (`EPERM`), then `clone3` (`ENOSYS`). Two
/// programs because a `seccompiler` filter has one action on a match.
pub fn seccomp_programs(allow: &[String]) -> Result<[BpfProgram; 2], SandboxError> {
    if let Some(n) = allow.iter().find(|n| !is_denied(n)) {
        return Err(SandboxError::UnknownSyscall(n.clone()));
    }
    let seccomp = |e: seccompiler::BackendError| SandboxError::Seccomp(e.into());
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(seccomp)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .filter(|(n, _)| !allow.iter().any(|a| a == n))
        .map(|(_, nr)| (*nr, Vec::new()))
        .collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&f| {
            let f = f as u64;
            let c =
                SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(f), f)?;
            SeccompRule::new(vec![c])
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(seccomp)?;
    rules.insert(libc::SYS_clone, clone_rules);
    let deny = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(seccomp)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(seccomp)?;
    Ok([
        deny.try_into().map_err(seccomp)?,
        clone3.try_into().map_err(seccomp)?,
    ])
}

/// The Landlock ABI of the running kernel (0: none), asked directly: the
/// `landlock` crate keeps it private, and status reports name it.
pub fn landlock_abi() -> i32 {
    // SAFETY: LANDLOCK_CREATE_RULESET_VERSION with a null attribute and
    // size 0 only returns the ABI version (or -1 with errno); no memory is
    // read or written.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<u8>(),
            0usize,
            1u32, // LANDLOCK_CREATE_RULESET_VERSION
        )
    };
    i32::try_from(v).unwrap_or(0).max(0)
}

/// Restricts the filesystem to read and execute, except `writable` and
/// [`ALWAYS_WRITABLE`]; scopes signals and abstract Unix sockets. Returns
/// what is in force, for the report.
fn landlock(writable: &[PathBuf]) -> Result<String, SandboxError> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr,
        RulesetStatus, Scope, ABI,
    };
    let kernel = landlock_abi();
    if kernel == 0 {
        return Ok("none (the kernel has no Landlock)".into());
    }
    // What the kernel has, up to what the crate knows: the ruleset is then
    // fully enforced and the report names the ABI really in force.
    let abi = ABI::from(kernel);
    let err = SandboxError::Landlock;
    // Connecting to pathname sockets (ABI 9) stays governed by the
    // socket files' modes, as before Landlock had a say in it.
    let handled = AccessFs::from_all(abi) & !AccessFs::ResolveUnix;
    let write = AccessFs::from_all(abi);
    let mut ruleset = Ruleset::default().handle_access(handled).map_err(err)?;
    if abi >= ABI::V6 {
        ruleset = ruleset
            .scope(Scope::Signal | Scope::AbstractUnixSocket)
            .map_err(err)?;
    }
    let fixed = ALWAYS_WRITABLE.iter().map(Path::new);
    let status = ruleset
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            writable.iter().map(PathBuf::as_path).chain(fixed),
            write,
        ))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    let abi_num = abi as i32;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => format!("landlock ABI {abi_num}"),
        RulesetStatus::PartiallyEnforced => format!("landlock ABI {abi_num} (partially enforced)"),
        RulesetStatus::NotEnforced => "none (landlock not enforced)".into(),
    })
}

/// The programs for a module granted nothing, compiled by [`prepare`].
static DEFAULT_PROGRAMS: std::sync::OnceLock<[BpfProgram; 2]> = std::sync::OnceLock::new();

/// Compiles the seccomp programs for a module granted nothing (most
/// modules) ahead of time: a warm worker calls it while it waits, so the
/// launch does not (~40 us of ~260 us the sandbox takes, release build).
pub fn prepare() {
    if let Ok(p) = seccomp_programs(&[]) {
        let _ = DEFAULT_PROGRAMS.set(p);
    }
}

/// Applies `order` to this (single-threaded) worker and says what is in
/// force. `None`: the sandbox is off; only the report is made.
pub fn apply(order: Option<&SandboxOrder>) -> Result<SandboxReport, SandboxError> {
    let Some(order) = order else {
        return Ok(report(false, "none (sandbox off)".into(), "none".into()));
    };
    // Compiled before anything is given up: a bad name fails the launch
    // with the module's own credentials untouched.
    let programs = match DEFAULT_PROGRAMS.get() {
        Some(p) if order.allow_syscalls.is_empty() => p.clone(),
        _ => seccomp_programs(&order.allow_syscalls)?,
    };
    if let Some((uid, gid)) = order.ids {
        switch_ids(uid, gid)?;
    }
    nix::sys::prctl::set_dumpable(false).map_err(|e| SandboxError::Prctl("PR_SET_DUMPABLE", e))?;
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| SandboxError::Prctl("PR_SET_NO_NEW_PRIVS", e))?;
    let fs = landlock(&order.writable)?;
    let [deny, clone3] = &programs;
    seccompiler::apply_filter_all_threads(deny).map_err(SandboxError::Seccomp)?;
    seccompiler::apply_filter_all_threads(clone3).map_err(SandboxError::Seccomp)?;
    let mut seccomp = format!(
        "seccomp-bpf: {} syscalls and namespace clones EPERM, clone3 ENOSYS",
        DENIED.len() - order.allow_syscalls.len()
    );
    if !order.allow_syscalls.is_empty() {
        seccomp.push_str(&format!("; granted {}", order.allow_syscalls.join(", ")));
    }
    Ok(report(order.ids.is_some(), seccomp, fs))
}

fn report(own_ids: bool, seccomp: String, landlock: String) -> SandboxReport {
    SandboxReport {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        own_ids,
        no_new_privs: nix::sys::prctl::get_no_new_privs().unwrap_or(false),
        dumpable: nix::sys::prctl::get_dumpable().unwrap_or(true),
        seccomp,
        landlock,
    }
}

fn switch_ids(uid: u32, gid: u32) -> Result<(), SandboxError> {
    use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
    let fail = |call| {
        move |source| SandboxError::Identity {
            uid,
            gid,
            call,
            source,
        }
    };
    let parent = nix::unistd::getppid();
    setgroups(&[]).map_err(fail("setgroups"))?;
    let g = Gid::from_raw(gid);
    setresgid(g, g, g).map_err(fail("setresgid"))?;
    let u = Uid::from_raw(uid);
    setresuid(u, u, u).map_err(fail("setresuid"))?;
    // The kernel clears the parent-death signal when credentials change.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| SandboxError::Prctl("PR_SET_PDEATHSIG", e))?;
    if nix::unistd::getppid() != parent {
        return Err(SandboxError::Orphaned);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_build_and_refuse_unknown_names() {
        let [deny, clone3] = seccomp_programs(&[]).unwrap();
        assert!(!deny.is_empty() && !clone3.is_empty());
        let [fewer, _] = seccomp_programs(&["ptrace".into()]).unwrap();
        assert!(fewer.len() < deny.len());
        let e = seccomp_programs(&["read".into()]).unwrap_err();
        assert_eq!(e.to_string(), "`read` is not a syscall the sandbox denies");
        assert!(is_denied("bpf") && !is_denied("clone3"));
    }
}

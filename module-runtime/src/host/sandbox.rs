//! The module sandbox: what a worker gives up after its launch order
//! arrived and before the module's code is loaded (see `docs/design.md`,
//! "Trust"). In order:
//!
//! 1. its own uid and gid (`setgroups([])`, `setresgid`, `setresuid`), when
//!    emberd sent them (it is root), read back (`getresuid`, `getresgid`,
//!    `getgroups`): all must be the ids asked for, neither 0, and no
//!    supplementary group; the parent-death signal, which the kernel clears
//!    on a credential change, is set again;
//!    then the manifest's `[sandbox] writable` paths are opened (`O_PATH`,
//!    `openat2` with `RESOLVE_NO_SYMLINKS`) with the module's credentials:
//!    a path that is missing, is or passes through a symlink, is neither a
//!    directory nor a regular file, or that the module's uid cannot reach
//!    fails the launch, naming it (so a launch tells a client only what the
//!    module's uid could find out itself);
//! 2. `PR_SET_DUMPABLE 0` (no core dumps, `/proc/PID` owned by root, no
//!    ptrace by its own uid) and `PR_SET_NO_NEW_PRIVS 1`;
//! 3. Landlock, where the kernel has it: the whole filesystem read and
//!    execute only, except the paths opened in step 1 and
//!    [`ALWAYS_WRITABLE`]; signals and abstract Unix sockets scoped to the
//!    worker (ABI 6 and later);
//! 4. seccomp filters (built with `seccompiler`, see [`seccomp_programs`])
//!    that fail with `EPERM` the syscalls of [`DENIED`], `clone` with a
//!    namespace flag, calls on another process's limits, priority and
//!    scheduling (which a module that kept emberd's uid could otherwise
//!    make on emberd) and `prctl(PR_SET_DUMPABLE)`; `clone3` with `ENOSYS`
//!    (its flags are behind a pointer the filter cannot read; glibc then
//!    falls back to `clone`), and on x86_64 every x32 syscall with
//!    `ENOSYS`; on every thread.
//!
//! It runs while the worker has a single thread, so every thread the module
//! starts inherits all of it. Any step that fails fails the launch: a module
//! never runs with less than it was promised.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;

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
    /// The ids read back after the switch are not the ones asked for: an
    /// id the kernel takes for "leave unchanged" (4294967295, -1 to
    /// `setresuid`), or 0.
    #[error(
        "uid {uid} gid {gid} not in force after the switch (read back: uids {uids:?}, \
         gids {gids:?}, supplementary groups {groups:?}); a module's ids are neither 0 \
         nor 2^31 or above"
    )]
    IdentityMismatch {
        /// The uid asked for.
        uid: u32,
        /// The gid asked for.
        gid: u32,
        /// Real, effective and saved uid read back.
        uids: [u32; 3],
        /// Real, effective and saved gid read back.
        gids: [u32; 3],
        /// Supplementary groups read back.
        groups: Vec<u32>,
    },
    /// A manifest's `[sandbox] writable` path cannot be given to the module.
    #[error("writable path {}: {why}", path.display())]
    Writable {
        /// The path, as the manifest wrote it.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
        /// The error of the open or stat, if one failed.
        #[source]
        source: Option<nix::Error>,
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

/// `clone` with a namespace flag, [`DENIED`] less `allow`, and calls on
/// other processes' limits, priority and scheduling (see
/// [`other_process_rules`]) and `prctl(PR_SET_DUMPABLE)`: the rules of the
/// program that answers `EPERM`.
fn eperm_rules(
    plain: &[libc::c_long],
) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        plain.iter().map(|&nr| (nr, Vec::new())).collect();
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&f| {
            let f = f as u64;
            let c =
                SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(f), f)?;
            SeccompRule::new(vec![c])
        })
        .collect::<Result<Vec<_>, _>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    rules.extend(other_process_rules()?);
    // Not dumpable stays true: the report said so and emberd relies on it.
    let option = libc::PR_SET_DUMPABLE as u64;
    rules.insert(
        libc::SYS_prctl,
        vec![SeccompRule::new(vec![arg(0, SeccompCmpOp::Eq, option)?])?],
    );
    Ok(rules)
}

/// A condition on the `int` argument `index` (`Dword`: the kernel reads
/// the low 32 bits of a `pid_t` or `int`, and so does the filter).
fn arg(
    index: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, op, value)
}

/// Calls a process of the same uid may make on another (so on emberd, the
/// zygote and sibling modules, when emberd is not root and modules keep
/// its uid): each matches, so fails with `EPERM`, unless it names the
/// caller itself with 0.
///
/// - `prlimit64(pid, …)`: `pid` ≠ 0 (glibc's `getrlimit`/`setrlimit` pass
///   0; `prlimit(getpid(), …)` is refused too);
/// - `setpriority(which, who, …)`: `which` ≠ `PRIO_PROCESS` or `who` ≠ 0;
/// - `sched_setaffinity`, `sched_setattr`, `sched_setscheduler`,
///   `sched_setparam` on a pid ≠ 0 (a thread sets its own with 0;
///   `pthread_setaffinity_np` and `pthread_setschedparam`, which pass a
///   thread id, are refused);
/// - `ioprio_set(which, who, …)`: allowed only for `IOPRIO_WHO_PROCESS` and
///   `who` 0.
fn other_process_rules() -> Result<Vec<(i64, Vec<SeccompRule>)>, seccompiler::BackendError> {
    const IOPRIO_WHO_PROCESS: u64 = 1;
    let not_self = || -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        Ok(vec![SeccompRule::new(vec![arg(0, SeccompCmpOp::Ne, 0)?])?])
    };
    let which_who = |which: u64| -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
        Ok(vec![
            SeccompRule::new(vec![arg(0, SeccompCmpOp::Ne, which)?])?,
            SeccompRule::new(vec![arg(1, SeccompCmpOp::Ne, 0)?])?,
        ])
    };
    Ok(vec![
        (libc::SYS_prlimit64, not_self()?),
        (libc::SYS_sched_setaffinity, not_self()?),
        (libc::SYS_sched_setattr, not_self()?),
        (libc::SYS_sched_setscheduler, not_self()?),
        (libc::SYS_sched_setparam, not_self()?),
        (libc::SYS_setpriority, which_who(libc::PRIO_PROCESS as u64)?),
        (libc::SYS_ioprio_set, which_who(IOPRIO_WHO_PROCESS)?),
    ])
}

/// The seccomp programs for a module allowed `allow` (names of
/// [`DENIED`]): the `EPERM` rules ([`DENIED`], namespace clones, other
/// processes, `PR_SET_DUMPABLE`), then `clone3` (`ENOSYS`); on x86_64 the
/// plain deny list, `clone3` and the x32 ABI are one hand-built program
/// ([`tree_program`]). Several programs because a `seccompiler` filter has
/// one action on a match.
pub fn seccomp_programs(allow: &[String]) -> Result<Vec<BpfProgram>, SandboxError> {
    if let Some(n) = allow.iter().find(|n| !is_denied(n)) {
        return Err(SandboxError::UnknownSyscall(n.clone()));
    }
    let seccomp = |e: seccompiler::BackendError| SandboxError::Seccomp(e.into());
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(seccomp)?;
    let plain: Vec<libc::c_long> = DENIED
        .iter()
        .filter(|(n, _)| !allow.iter().any(|a| a == n))
        .map(|(_, nr)| *nr)
        .collect();
    // The argument rules, with seccompiler. On x86_64 the plain deny list
    // is a hand-built search tree instead: the kernel emulates every new
    // filter once per syscall number (to cache the ones it always allows),
    // and seccompiler's linear chain of ~60 numbers made attaching it cost
    // ~0.24 ms per launch.
    #[cfg(target_arch = "x86_64")]
    let in_chain: &[libc::c_long] = &[];
    #[cfg(not(target_arch = "x86_64"))]
    let in_chain: &[libc::c_long] = &plain;
    let deny = SeccompFilter::new(
        eperm_rules(in_chain).map_err(seccomp)?,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(seccomp)?;
    #[allow(unused_mut)] // the tree on x86_64, clone3's program elsewhere
    let mut programs: Vec<BpfProgram> = vec![deny.try_into().map_err(seccomp)?];
    #[cfg(target_arch = "x86_64")]
    programs.push(tree_program(&plain));
    #[cfg(not(target_arch = "x86_64"))]
    {
        let clone3 = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(seccomp)?;
        programs.push(clone3.try_into().map_err(seccomp)?);
    }
    Ok(programs)
}

/// On x86_64: every x32 syscall and `clone3` fail with `ENOSYS`, every
/// number of `deny` with `EPERM`, found by a
/// binary search (a handful of comparisons per call, and per number when
/// the kernel caches the filter), the rest is allowed. Another arch is not
/// this program's business: the seccompiler program kills it.
///
/// An x32 call carries the x86_64 audit arch and its number with
/// [`X32_SYSCALL_BIT`] set, so it passes `seccompiler`'s arch check and
/// matches none of its numbers: without this program `unshare` through x32
/// would be allowed. `ENOSYS` is what a kernel without x32 (most
/// distributions' default) answers, so nothing a module may legitimately
/// run changes; killing the worker would say no more and would hide the
/// attempt from the module's own report. `clone3` gets `ENOSYS` because its
/// flags are behind a pointer no filter can read; glibc then falls back to
/// `clone`, whose flags the seccompiler program checks.
#[cfg(target_arch = "x86_64")]
pub fn tree_program(deny: &[libc::c_long]) -> BpfProgram {
    use seccompiler::sock_filter;
    // Jump targets are instruction indices until the end, then offsets.
    #[derive(Clone, Copy)]
    enum To {
        Next,
        At(usize),
        Deny,
        Allow,
        Enosys,
    }
    struct Insn {
        code: u32,
        k: u32,
        jt: To,
        jf: To,
    }
    const NR: u32 = 0;
    const ARCH: u32 = 4;
    let (load, ret) = (
        libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
        libc::BPF_RET | libc::BPF_K,
    );
    let (jeq, jge, jset) = (
        libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
        libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K,
        libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K,
    );
    let op = |code, k, jt, jf| Insn { code, k, jt, jf };
    let mut nums: Vec<u32> = deny.iter().map(|&n| n as u32).collect();
    nums.sort_unstable();
    nums.dedup();
    let mut p = vec![
        op(load, ARCH, To::Next, To::Next),
        op(jeq, AUDIT_ARCH_X86_64, To::Next, To::Allow),
        op(load, NR, To::Next, To::Next),
        op(jset, X32_SYSCALL_BIT, To::Enosys, To::Next),
        op(jeq, libc::SYS_clone3 as u32, To::Enosys, To::Next),
    ];
    // A subtree for sorted `nums`: the left half falls through, the right
    // half is jumped to (patched once the left one is laid out).
    fn tree(nums: &[u32], p: &mut Vec<Insn>, jeq: u32, jge: u32) {
        match nums {
            [] => p.push(Insn {
                code: libc::BPF_JMP | libc::BPF_JA,
                k: 0,
                jt: To::Allow,
                jf: To::Allow,
            }),
            [n] => p.push(Insn {
                code: jeq,
                k: *n,
                jt: To::Deny,
                jf: To::Allow,
            }),
            _ => {
                let mid = nums.len() / 2;
                let at = p.len();
                p.push(Insn {
                    code: jge,
                    k: nums[mid],
                    jt: To::Next, // patched below
                    jf: To::Next,
                });
                tree(&nums[..mid], p, jeq, jge);
                p[at].jt = To::At(p.len());
                tree(&nums[mid..], p, jeq, jge);
            }
        }
    }
    tree(&nums, &mut p, jeq, jge);
    let (deny_at, allow_at, enosys_at) = (p.len(), p.len() + 1, p.len() + 2);
    p.push(op(
        ret,
        libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        To::Next,
        To::Next,
    ));
    p.push(op(ret, libc::SECCOMP_RET_ALLOW, To::Next, To::Next));
    p.push(op(
        ret,
        libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
        To::Next,
        To::Next,
    ));
    let offset = |i: usize, to: To| -> u8 {
        let target = match to {
            To::Next => i + 1,
            To::At(t) => t,
            To::Deny => deny_at,
            To::Allow => allow_at,
            To::Enosys => enosys_at,
        };
        u8::try_from(target - (i + 1)).expect("the tree is short: jumps fit in 8 bits")
    };
    p.iter()
        .enumerate()
        .map(|(i, x)| {
            let ja = x.code == libc::BPF_JMP | libc::BPF_JA;
            sock_filter {
                code: x.code as u16,
                // An unconditional jump takes its offset in `k`.
                jt: if ja { 0 } else { offset(i, x.jt) },
                jf: if ja { 0 } else { offset(i, x.jf) },
                k: if ja { u32::from(offset(i, x.jt)) } else { x.k },
            }
        })
        .collect()
}

/// `AUDIT_ARCH_X86_64` (`EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE`).
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// The bit that marks an x32 syscall number (`__X32_SYSCALL_BIT`).
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

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

/// A `[sandbox] writable` path opened for its Landlock rule.
struct WritablePath {
    /// `O_PATH` descriptor of the path.
    fd: OwnedFd,
    /// A directory (else a regular file).
    dir: bool,
}

/// Opens each of `paths` (`O_PATH`, through `openat2` with
/// `RESOLVE_NO_SYMLINKS`: a symlink anywhere on the way, the last component
/// included, is refused, so `/tmp/link → STATE_DIR` cannot widen what the
/// manifest was allowed). Called with the module's credentials, after the
/// uid switch: opened as root, a launch's error ("does not exist", "symbolic
/// link", …) would tell a client what lies inside directories only root may
/// search. A path the module's uid cannot reach fails with the same words
/// whether or not it exists. Each must be an absolute path to an existing
/// directory or regular file.
fn open_writable(paths: &[PathBuf]) -> Result<Vec<WritablePath>, SandboxError> {
    use nix::errno::Errno;
    use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag, AT_FDCWD};
    use nix::sys::stat::{fstat, SFlag};
    paths
        .iter()
        .map(|path| {
            let fail = |why, source| SandboxError::Writable {
                path: path.clone(),
                why,
                source,
            };
            if !path.is_absolute() {
                return Err(fail("not an absolute path", None));
            }
            let how = OpenHow::new()
                .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
                .resolve(ResolveFlag::RESOLVE_NO_SYMLINKS);
            let fd = openat2(AT_FDCWD, path.as_path(), how).map_err(|e| {
                let why = match e {
                    Errno::ENOENT => "does not exist (a writable path must exist when the module starts)",
                    Errno::ELOOP => "is or passes through a symbolic link (writable paths are not followed through symlinks)",
                    Errno::ENOTDIR => "passes through something that is not a directory",
                    // Said alike of a path that exists and one that does not.
                    Errno::EACCES => "cannot be opened by the module's uid (it needs search permission on every directory on the way)",
                    _ => "cannot be opened",
                };
                fail(why, Some(e))
            })?;
            let st = fstat(&fd).map_err(|e| fail("cannot be examined", Some(e)))?;
            let dir = match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
                SFlag::S_IFDIR => true,
                SFlag::S_IFREG => false,
                _ => return Err(fail("is neither a directory nor a regular file", None)),
            };
            Ok(WritablePath { fd, dir })
        })
        .collect()
}

/// Restricts the filesystem to read and execute, except `writable` and
/// [`ALWAYS_WRITABLE`]; scopes signals and abstract Unix sockets. Returns
/// what is in force, for the report.
fn landlock(writable: Vec<WritablePath>) -> Result<String, SandboxError> {
    use landlock::{
        path_beneath_rules, Access, AccessFs, PathBeneath, Ruleset, RulesetAttr,
        RulesetCreatedAttr, RulesetStatus, Scope, ABI,
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
    let mut created = ruleset
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))
        .map_err(err)?
        // World-writable devices: a missing one is no loss.
        .add_rules(path_beneath_rules(ALWAYS_WRITABLE, write))
        .map_err(err)?;
    for w in writable {
        // A file takes only the rights that apply to files.
        let access = if w.dir {
            write
        } else {
            write & AccessFs::from_file(abi)
        };
        created = created
            .add_rule(PathBeneath::new(w.fd, access))
            .map_err(err)?;
    }
    let status = created.restrict_self().map_err(err)?;
    let abi_num = abi as i32;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => format!("landlock ABI {abi_num}"),
        RulesetStatus::PartiallyEnforced => format!("landlock ABI {abi_num} (partially enforced)"),
        RulesetStatus::NotEnforced => "none (landlock not enforced)".into(),
    })
}

/// The programs for a module granted nothing, compiled by [`prepare`].
static DEFAULT_PROGRAMS: std::sync::OnceLock<Vec<BpfProgram>> = std::sync::OnceLock::new();

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
        // The zygote is not dumpable (so that a module keeping emberd's uid
        // cannot read it) and its workers inherit that; without a sandbox
        // a worker is dumpable as any process of its uid.
        nix::sys::prctl::set_dumpable(true)
            .map_err(|e| SandboxError::Prctl("PR_SET_DUMPABLE", e))?;
        return Ok(report(
            false,
            "none (sandbox off)".into(),
            "none".into(),
            Vec::new(),
        ));
    };
    // Compiled before anything is given up: a bad name fails the launch
    // with the module's own credentials untouched.
    let programs = match DEFAULT_PROGRAMS.get() {
        Some(p) if order.allow_syscalls.is_empty() => p.clone(),
        _ => seccomp_programs(&order.allow_syscalls)?,
    };
    // Own ids only once read back as asked.
    let own_ids = match order.ids {
        Some((uid, gid)) => {
            switch_ids(uid, gid)?;
            true
        }
        None => false,
    };
    // Opened with the module's credentials: an error says only what its
    // uid may learn anyway.
    let writable = open_writable(&order.writable)?;
    nix::sys::prctl::set_dumpable(false).map_err(|e| SandboxError::Prctl("PR_SET_DUMPABLE", e))?;
    nix::sys::prctl::set_no_new_privs()
        .map_err(|e| SandboxError::Prctl("PR_SET_NO_NEW_PRIVS", e))?;
    let fs = landlock(writable)?;
    for p in &programs {
        seccompiler::apply_filter_all_threads(p).map_err(SandboxError::Seccomp)?;
    }
    let mut seccomp = format!(
        "seccomp-bpf: {} syscalls, namespace clones, other processes' limits and \
         scheduling, PR_SET_DUMPABLE EPERM; clone3{} ENOSYS",
        DENIED.len() - order.allow_syscalls.len(),
        if cfg!(target_arch = "x86_64") {
            ", x32"
        } else {
            ""
        }
    );
    if !order.allow_syscalls.is_empty() {
        seccomp.push_str(&format!("; granted {}", order.allow_syscalls.join(", ")));
    }
    Ok(report(own_ids, seccomp, fs, order.writable.clone()))
}

fn report(
    own_ids: bool,
    seccomp: String,
    landlock: String,
    writable: Vec<PathBuf>,
) -> SandboxReport {
    SandboxReport {
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
        own_ids,
        no_new_privs: nix::sys::prctl::get_no_new_privs().unwrap_or(false),
        dumpable: nix::sys::prctl::get_dumpable().unwrap_or(true),
        seccomp,
        landlock,
        writable,
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
    verify_ids(uid, gid)?;
    // The kernel clears the parent-death signal when credentials change.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| SandboxError::Prctl("PR_SET_PDEATHSIG", e))?;
    if nix::unistd::getppid() != parent {
        return Err(SandboxError::Orphaned);
    }
    Ok(())
}

/// Fails unless the real, effective and saved uid and gid read back are
/// `uid` and `gid`, neither is 0 and no supplementary group is left: a
/// `setresuid` given 4294967295 (-1) succeeds and changes nothing.
fn verify_ids(uid: u32, gid: u32) -> Result<(), SandboxError> {
    use nix::unistd::{getgroups, getresgid, getresuid};
    let read = |call| {
        move |source| SandboxError::Identity {
            uid,
            gid,
            call,
            source,
        }
    };
    let u = getresuid().map_err(read("getresuid"))?;
    let g = getresgid().map_err(read("getresgid"))?;
    let groups = getgroups().map_err(read("getgroups"))?;
    let uids = [u.real, u.effective, u.saved].map(|x| x.as_raw());
    let gids = [g.real, g.effective, g.saved].map(|x| x.as_raw());
    if uid != 0 && gid != 0 && uids == [uid; 3] && gids == [gid; 3] && groups.is_empty() {
        return Ok(());
    }
    Err(SandboxError::IdentityMismatch {
        uid,
        gid,
        uids,
        gids,
        groups: groups.iter().map(|g| g.as_raw()).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_build_and_refuse_unknown_names() {
        let programs = seccomp_programs(&[]).unwrap();
        assert!(programs.iter().all(|p| !p.is_empty()));
        let fewer = seccomp_programs(&["ptrace".into()]).unwrap();
        let len = |p: &[BpfProgram]| p.iter().map(Vec::len).sum::<usize>();
        assert!(len(&fewer) < len(&programs));
        let e = seccomp_programs(&["read".into()]).unwrap_err();
        assert_eq!(e.to_string(), "`read` is not a syscall the sandbox denies");
        assert!(is_denied("bpf") && !is_denied("clone3"));
    }

    /// What the kernel answers for a syscall, by running `programs` (all
    /// installed) the way it does: every program sees the call and the
    /// answer of highest precedence wins. Knows the instructions
    /// `seccompiler` and [`tree_program`] emit; panics on any other.
    fn verdict(programs: &[BpfProgram], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        // struct seccomp_data, little-endian.
        let mut data = Vec::with_capacity(64);
        data.extend_from_slice(&nr.to_le_bytes());
        data.extend_from_slice(&arch.to_le_bytes());
        data.extend_from_slice(&0u64.to_le_bytes());
        for a in args {
            data.extend_from_slice(&a.to_le_bytes());
        }
        let run = |p: &BpfProgram| -> u32 {
            let (mut acc, mut pc) = (0u32, 0usize);
            loop {
                let i = &p[pc];
                let (code, k) = (u32::from(i.code), i.k);
                pc += 1;
                let cond = |taken: bool| usize::from(if taken { i.jt } else { i.jf });
                match code {
                    c if c == libc::BPF_LD | libc::BPF_W | libc::BPF_ABS => {
                        let o = k as usize;
                        acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                    }
                    c if c == libc::BPF_ALU | libc::BPF_AND | libc::BPF_K => acc &= k,
                    c if c == libc::BPF_JMP | libc::BPF_JA => pc += k as usize,
                    c if c == libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K => pc += cond(acc == k),
                    c if c == libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K => pc += cond(acc > k),
                    c if c == libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K => pc += cond(acc >= k),
                    c if c == libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K => {
                        pc += cond(acc & k != 0)
                    }
                    c if c == libc::BPF_RET | libc::BPF_K => return k,
                    c => panic!("instruction {c:#x} at {}", pc - 1),
                }
            }
        };
        // Lower action as a signed number: higher precedence (kill first).
        // The kernel walks from the newest filter and keeps the first
        // strict minimum; `min_by_key` keeps the first of equals, so
        // newest first.
        programs
            .iter()
            .rev()
            .map(run)
            .min_by_key(|r| (r & libc::SECCOMP_RET_ACTION_FULL) as i32)
            .unwrap()
    }

    /// Two filters answering the same action with different data: the
    /// kernel keeps the newest's (the last installed), and so must the
    /// emulator the other tests trust.
    #[test]
    fn equal_actions_go_to_the_newest_filter() {
        let ret = |k: u32| {
            vec![seccompiler::sock_filter {
                code: (libc::BPF_RET | libc::BPF_K) as u16,
                jt: 0,
                jf: 0,
                k,
            }]
        };
        let programs = vec![ret(EPERM), ret(ENOSYS)];
        assert_eq!(verdict(&programs, 0, 0, [0; 6]), ENOSYS);
        // A strictly stronger action still wins from an older filter.
        let programs = vec![ret(libc::SECCOMP_RET_KILL_PROCESS), ret(EPERM)];
        let v = verdict(&programs, 0, 0, [0; 6]);
        assert_eq!(v, libc::SECCOMP_RET_KILL_PROCESS);
    }

    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    const ENOSYS: u32 = libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_syscalls_get_enosys() {
        let programs = seccomp_programs(&[]).unwrap();
        let call = |nr: libc::c_long, a0: u64| {
            verdict(&programs, nr as u32, AUDIT_ARCH_X86_64, [a0, 0, 0, 0, 0, 0])
        };
        let newuser = libc::CLONE_NEWUSER as u64;
        assert_eq!(call(libc::SYS_unshare, newuser), EPERM);
        // The same call through the x32 ABI: seccompiler alone allows it.
        let x32 = |nr: libc::c_long| nr | X32_SYSCALL_BIT as libc::c_long;
        assert_eq!(call(x32(libc::SYS_unshare), newuser), ENOSYS);
        assert_eq!(call(x32(libc::SYS_getpid), 0), ENOSYS);
        assert_eq!(call(libc::SYS_getpid, 0), ALLOW);
        // Any other arch: seccompiler's programs kill.
        const AUDIT_ARCH_I386: u32 = 0x4000_0003;
        let other = verdict(&programs, 20, AUDIT_ARCH_I386, [0; 6]);
        assert_eq!(other, libc::SECCOMP_RET_KILL_PROCESS);
    }

    /// The search tree answers as the list it was built from, for every
    /// syscall number: each denied one `EPERM` (but the one granted),
    /// `clone3` `ENOSYS`, every other one allowed (those with argument
    /// rules checked elsewhere).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_deny_tree_answers_as_the_list() {
        let with_args = [
            libc::SYS_clone,
            libc::SYS_prlimit64,
            libc::SYS_sched_setaffinity,
            libc::SYS_sched_setattr,
            libc::SYS_sched_setscheduler,
            libc::SYS_sched_setparam,
            libc::SYS_setpriority,
            libc::SYS_ioprio_set,
            libc::SYS_prctl,
        ];
        for granted in [
            vec![],
            vec!["ptrace".to_string()],
            vec!["bpf".into(), "mount".into()],
        ] {
            let programs = seccomp_programs(&granted).unwrap();
            for nr in 0..600u32 {
                if with_args.contains(&libc::c_long::from(nr)) {
                    continue;
                }
                let got = verdict(&programs, nr, AUDIT_ARCH_X86_64, [0; 6]);
                let denied = DENIED
                    .iter()
                    .any(|(n, d)| *d == libc::c_long::from(nr) && !granted.iter().any(|g| g == n));
                let want = if libc::c_long::from(nr) == libc::SYS_clone3 {
                    ENOSYS
                } else if denied {
                    EPERM
                } else {
                    ALLOW
                };
                assert_eq!(got, want, "syscall {nr} with {granted:?} granted");
            }
        }
        // One comparison per number and per split, plus the preamble: every
        // jump fits its 8 bits.
        let tree = tree_program(&DENIED.iter().map(|(_, n)| *n).collect::<Vec<_>>());
        assert!(tree.len() < 2 * DENIED.len() + 12, "{}", tree.len());
    }

    #[test]
    fn calls_on_other_processes_get_eperm_and_on_itself_pass() {
        let programs = seccomp_programs(&[]).unwrap();
        let arch = seccompiler_arch();
        let call = |nr: libc::c_long, a: [u64; 3]| {
            verdict(&programs, nr as u32, arch, [a[0], a[1], a[2], 0, 0, 0])
        };
        let (other, prio) = (4242u64, libc::PRIO_PROCESS as u64);
        for nr in [
            libc::SYS_prlimit64,
            libc::SYS_sched_setaffinity,
            libc::SYS_sched_setattr,
            libc::SYS_sched_setscheduler,
            libc::SYS_sched_setparam,
        ] {
            assert_eq!(call(nr, [other, 0, 0]), EPERM, "{nr}");
            assert_eq!(call(nr, [0, 0, 0]), ALLOW, "{nr}");
        }
        assert_eq!(call(libc::SYS_setpriority, [prio, 0, 19]), ALLOW);
        assert_eq!(call(libc::SYS_setpriority, [prio, other, 19]), EPERM);
        assert_eq!(
            call(libc::SYS_setpriority, [libc::PRIO_PGRP as u64, 0, 19]),
            EPERM
        );
        assert_eq!(
            call(libc::SYS_setpriority, [libc::PRIO_USER as u64, 0, 19]),
            EPERM
        );
        assert_eq!(call(libc::SYS_ioprio_set, [1, 0, 0]), ALLOW);
        assert_eq!(call(libc::SYS_ioprio_set, [1, other, 0]), EPERM);
        assert_eq!(call(libc::SYS_ioprio_set, [2, 0, 0]), EPERM);
        assert_eq!(call(libc::SYS_ioprio_set, [3, 0, 0]), EPERM);
        let dumpable = libc::PR_SET_DUMPABLE as u64;
        assert_eq!(call(libc::SYS_prctl, [dumpable, 1, 0]), EPERM);
        assert_eq!(
            call(libc::SYS_prctl, [libc::PR_GET_DUMPABLE as u64, 0, 0]),
            ALLOW
        );
        assert_eq!(
            call(libc::SYS_prctl, [libc::PR_SET_NAME as u64, 0, 0]),
            ALLOW
        );
        // Getting is harmless.
        assert_eq!(call(libc::SYS_sched_getaffinity, [other, 0, 0]), ALLOW);
    }

    /// The audit arch `seccompiler` checks on this machine.
    fn seccompiler_arch() -> u32 {
        let first = &seccomp_programs(&[]).unwrap()[0];
        // `ld [arch]; jeq ARCH …`: the arch is the first comparison.
        first[1].k
    }

    /// errno of a raw syscall's result (0: it worked).
    fn errno_of(rc: libc::c_long) -> i32 {
        if rc == -1 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        }
    }

    /// In a forked child that keeps this process's uid (as a module keeps
    /// emberd's when emberd is not root): the sandbox, then the attacks on
    /// a sibling (as on emberd) and the calls on itself, each errno written
    /// to `out`.
    fn attacker(victim: libc::pid_t, order: &SandboxOrder, out: std::os::fd::BorrowedFd) -> ! {
        use std::os::fd::AsRawFd;
        let mut results = [-1i32; 9];
        if apply(Some(order)).is_ok() {
            let v = victim as libc::c_long;
            let crippled = libc::rlimit {
                rlim_cur: 3,
                rlim_max: 3,
            };
            let null = std::ptr::null_mut::<libc::rlimit>();
            // SAFETY: a one-CPU mask on the stack, read by the kernel.
            let mut cpus: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            // SAFETY: CPU 0 is within the set.
            unsafe { libc::CPU_SET(0, &mut cpus) };
            let param = libc::sched_param { sched_priority: 0 };
            let own = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            const IOPRIO_IDLE: libc::c_long = 3 << 13;
            // SAFETY: raw syscalls whose pointer arguments point at live
            // values on this stack (or are null where the kernel allows).
            results = unsafe {
                [
                    errno_of(libc::syscall(
                        libc::SYS_prlimit64,
                        v,
                        libc::RLIMIT_NOFILE,
                        &crippled,
                        null,
                    )),
                    errno_of(libc::syscall(
                        libc::SYS_setpriority,
                        libc::PRIO_PROCESS,
                        v,
                        19,
                    )),
                    errno_of(libc::syscall(
                        libc::SYS_sched_setaffinity,
                        v,
                        std::mem::size_of::<libc::cpu_set_t>(),
                        &cpus,
                    )),
                    errno_of(libc::syscall(
                        libc::SYS_sched_setscheduler,
                        v,
                        libc::SCHED_IDLE,
                        &param,
                    )),
                    errno_of(libc::syscall(libc::SYS_ioprio_set, 1, v, IOPRIO_IDLE)),
                    errno_of(libc::syscall(
                        libc::SYS_prctl,
                        libc::PR_SET_DUMPABLE,
                        1,
                        0,
                        0,
                        0,
                    )),
                    // On itself: allowed.
                    errno_of(libc::syscall(
                        libc::SYS_prlimit64,
                        0,
                        libc::RLIMIT_NOFILE,
                        &own,
                        null,
                    )),
                    errno_of(libc::syscall(
                        libc::SYS_setpriority,
                        libc::PRIO_PROCESS,
                        0,
                        19,
                    )),
                    errno_of(libc::syscall(
                        libc::SYS_sched_setscheduler,
                        0,
                        libc::SCHED_IDLE,
                        &param,
                    )),
                ]
            };
        }
        let bytes: Vec<u8> = results.iter().flat_map(|r| r.to_le_bytes()).collect();
        // SAFETY: writes a buffer that outlives the call; then ends the
        // child without running the parent's destructors.
        unsafe {
            libc::write(out.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
            libc::_exit(0)
        }
    }

    /// The reviewer's probe: a sandboxed child with this process's uid
    /// cannot cripple another process of that uid.
    #[test]
    fn a_module_keeping_emberds_uid_cannot_touch_another_process() {
        use nix::unistd::{fork, ForkResult};
        use std::io::Read;
        use std::os::fd::{AsFd, AsRawFd};
        let order = SandboxOrder {
            ids: None,
            allow_syscalls: Vec::new(),
            writable: Vec::new(),
        };
        // Close-on-exec: a test forking and exec'ing meanwhile keeps no end.
        let pipe = || nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let (hold_r, hold_w) = pipe();
        // SAFETY: the children only read a pipe, or apply the sandbox
        // (glibc's malloc is fork-safe) and make raw syscalls, then `_exit`.
        let victim = match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                drop(hold_w);
                let mut b = [0u8; 1];
                // SAFETY: reads into a byte on the stack until the parent
                // closes its end; ends without unwinding into the harness.
                unsafe {
                    libc::read(hold_r.as_raw_fd(), b.as_mut_ptr().cast(), 1);
                    libc::_exit(0)
                }
            }
            ForkResult::Parent { child } => child,
        };
        drop(hold_r);
        let (res_r, res_w) = pipe();
        // SAFETY: as above.
        let attack = match unsafe { fork() }.unwrap() {
            ForkResult::Child => attacker(victim.as_raw(), &order, res_w.as_fd()),
            ForkResult::Parent { child } => child,
        };
        drop(res_w);
        let mut bytes = Vec::new();
        std::fs::File::from(res_r).read_to_end(&mut bytes).unwrap();
        nix::sys::wait::waitpid(attack, None).unwrap();
        // What the victim has now, read before it is let go.
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: reads the victim's limit into `limit`.
        let rc = unsafe {
            libc::prlimit(
                victim.as_raw(),
                libc::RLIMIT_NOFILE,
                std::ptr::null(),
                &mut limit,
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: no memory arguments.
        let policy = unsafe { libc::sched_getscheduler(victim.as_raw()) };
        drop(hold_w);
        nix::sys::wait::waitpid(victim, None).unwrap();

        let got: Vec<i32> = bytes
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let eperm = libc::EPERM;
        assert_eq!(
            got,
            [eperm, eperm, eperm, eperm, eperm, eperm, 0, 0, 0],
            "prlimit, setpriority, sched_setaffinity, sched_setscheduler, ioprio_set on the \
             sibling; PR_SET_DUMPABLE; prlimit, setpriority, sched_setscheduler on itself"
        );
        assert_ne!(limit.rlim_cur, 3);
        assert_ne!(policy, libc::SCHED_IDLE);
    }

    /// `switch_ids(uid, gid)` in a forked child (the switch cannot be
    /// undone): `Ok(uid read back)` or the error's text.
    fn switch_in_child(uid: u32, gid: u32) -> Result<u32, String> {
        use nix::unistd::{fork, ForkResult};
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        // SAFETY: the child makes the id syscalls, formats a string
        // (glibc's malloc is fork-safe), writes it and `_exit`s.
        match unsafe { fork() }.unwrap() {
            ForkResult::Child => {
                drop(r);
                let out = match switch_ids(uid, gid) {
                    Ok(()) => format!("ok {}", nix::unistd::getuid()),
                    Err(e) => e.to_string(),
                };
                // SAFETY: writes a buffer that outlives the call, then ends
                // the child without running the parent's destructors.
                unsafe {
                    libc::write(w.as_raw_fd(), out.as_ptr().cast(), out.len());
                    libc::_exit(0)
                }
            }
            ForkResult::Parent { child } => {
                drop(w);
                let mut out = String::new();
                std::fs::File::from(r).read_to_string(&mut out).unwrap();
                nix::sys::wait::waitpid(child, None).unwrap();
                match out.strip_prefix("ok ") {
                    Some(u) => Ok(u.parse().unwrap()),
                    None => Err(out),
                }
            }
        }
    }

    /// The reviewer's probe: uid 4294967295 is -1 to `setresuid` ("leave
    /// unchanged"), so the switch "succeeds" and the worker stays root;
    /// the read-back refuses it, and 0.
    #[test]
    fn ids_the_kernel_leaves_unchanged_fail_the_switch() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: switching uids needs root");
            return;
        }
        let e = switch_in_child(u32::MAX, u32::MAX).unwrap_err();
        assert!(
            e.starts_with("uid 4294967295 gid 4294967295 not in force after the switch")
                && e.contains("uids [0, 0, 0]"),
            "{e}"
        );
        let e = switch_in_child(0, 0).unwrap_err();
        assert!(e.starts_with("uid 0 gid 0 not in force"), "{e}");
        // Only the gid left unchanged: refused as well.
        let e = switch_in_child(0x7000_0001, u32::MAX).unwrap_err();
        assert!(e.contains("gids [0, 0, 0]"), "{e}");
        assert_eq!(switch_in_child(0x7000_0001, 0x7000_0001), Ok(0x7000_0001));
    }

    /// A fresh directory under the temp dir, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(tag: &str) -> Self {
            let p =
                std::env::temp_dir().join(format!("ember-sandbox-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn writable_paths_must_exist_and_no_symlink_is_followed() {
        let s = Scratch::new("writable");
        let dir = s.0.join("data");
        std::fs::create_dir(&dir).unwrap();
        let file = s.0.join("file");
        std::fs::write(&file, b"").unwrap();
        let opened = open_writable(&[dir.clone(), file.clone()]).unwrap();
        assert_eq!(
            opened.iter().map(|w| w.dir).collect::<Vec<_>>(),
            [true, false]
        );
        let why = |p: PathBuf| match open_writable(&[dir.clone(), p.clone()]) {
            Err(e @ SandboxError::Writable { .. }) => {
                let SandboxError::Writable { ref path, .. } = e else {
                    unreachable!()
                };
                assert_eq!(*path, p, "the failing path is named");
                crate::sdk::error_chain(&e)
            }
            other => panic!("{p:?}: {:?}", other.map(|v| v.len())),
        };
        let missing = why(s.0.join("missing"));
        assert!(
            missing.contains("missing: does not exist (a writable path must exist"),
            "{missing}"
        );
        // A link to a directory the manifest could not name (emberd's
        // state, say): refused, last component or on the way.
        let link = s.0.join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let e = why(link.clone());
        assert!(e.contains("is or passes through a symbolic link"), "{e}");
        let e = why(link.join("sub"));
        assert!(e.contains("symbolic link"), "{e}");
        let e = why(PathBuf::from("/dev/null"));
        assert!(e.contains("neither a directory nor a regular file"), "{e}");
        let e = why(PathBuf::from("tmp"));
        assert!(e.contains("not an absolute path"), "{e}");
        let e = why(file.join("x"));
        assert!(e.contains("not a directory"), "{e}");
    }
}

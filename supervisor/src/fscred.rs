//! Opening files with a client's rights: the calling **thread's** filesystem
//! credentials (fsuid, fsgid, supplementary groups) switched to the
//! client's for the duration of a closure, then put back.
//!
//! emberd runs as root, but the files an `Install` or a `Deploy` names are
//! the client's choice: opened with emberd's rights, a root-only file would
//! be read for a client that may not read it, and an error quoting a field
//! of it (`unknown field …`, a name that does not match its pattern) would
//! hand part of it back. [`with_rights`] runs the opens with the client's
//! rights instead: the kernel checks search permission on every directory
//! and read permission on the file as it would for the client itself.
//!
//! Only this thread changes: the raw `setfsuid`, `setfsgid` and
//! `setgroups` system calls act on the calling task's credentials alone.
//! glibc's `setgroups` wrapper (and `nix::unistd::setgroups`, which calls
//! it) is not used: it applies the change to every thread of the process
//! (nptl's `SIGSETXID` broadcast, as POSIX wants for process credentials),
//! which would hand the client's groups to the actor and to every thread of
//! the blocking pool at once. Switching fsuid away from 0 drops the
//! filesystem capabilities (`CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`,
//! `CAP_FOWNER`…) from the thread's effective set, and switching it back
//! raises them again (capabilities(7), "Effect of user ID changes on
//! capabilities").
//!
//! The credentials are put back by a guard, on return as on a panic
//! unwinding out of the closure, and read back to check: a thread of the
//! blocking pool never goes back to the pool with a client's rights. One
//! that could not get its own back (which cannot happen to a thread that
//! could take the client's: both need the same capabilities) aborts the
//! process rather than run anything else.
//!
//! ```no_run
//! let client = supervisor::fscred::Credentials { uid: 1000, gid: 1000, groups: vec![27] };
//! let text = supervisor::fscred::with_rights(&client, || std::fs::read_to_string("/srv/m/module.toml"))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::cell::Cell;

/// A client's credentials, as the kernel recorded them when it connected
/// (`SO_PEERCRED` and `SO_PEERGROUPS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// The thread's filesystem credentials could not be switched to a client's.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The kernel kept the thread's fsuid or fsgid (emberd lacks
    /// `CAP_SETUID`/`CAP_SETGID`: it does not run as root).
    #[error(
        "emberd (uid {own}) cannot open files with the rights of uid {uid}: it needs \
         CAP_SETUID and CAP_SETGID (run emberd as root, or name the files as uid {own} or root)"
    )]
    NotPermitted {
        /// The client's uid.
        uid: u32,
        /// emberd's effective uid.
        own: u32,
    },
    /// `setgroups` refused the client's supplementary groups.
    #[error("cannot take the supplementary groups of uid {uid}")]
    Groups {
        /// The client's uid.
        uid: u32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

thread_local! {
    /// The uid whose rights this thread has while in [`with_rights`].
    static ACTING_FOR: Cell<Option<u32>> = const { Cell::new(None) };
}

/// The uid whose filesystem rights the calling thread has, while it runs
/// the closure of [`with_rights`] with a client's rights; `None` otherwise.
/// Errors of opens use it to say with whose rights the open was refused.
pub fn acting_for() -> Option<u32> {
    ACTING_FOR.with(Cell::get)
}

/// Whether opening files for a client with uid `uid` needs a switch: not
/// for root (it may read anything emberd may) nor for emberd's own uid.
pub fn needs_switch(uid: u32) -> bool {
    uid != 0 && uid != nix::unistd::geteuid().as_raw()
}

/// Runs `f` on this thread with `who`'s filesystem credentials, and puts
/// this thread's own back before returning, also when `f` panics. For a
/// client that needs no switch ([`needs_switch`]) `f` runs as is.
pub fn with_rights<T>(who: &Credentials, f: impl FnOnce() -> T) -> Result<T, SwitchError> {
    if !needs_switch(who.uid) {
        return Ok(f());
    }
    let restore = Restore {
        fsuid: raw::fsuid(),
        fsgid: raw::fsgid(),
        groups: raw::groups(),
    };
    let own = nix::unistd::geteuid().as_raw();
    if !raw::set_fsgid(who.gid) {
        drop(restore);
        return Err(SwitchError::NotPermitted { uid: who.uid, own });
    }
    if let Err(source) = raw::set_groups(&who.groups) {
        drop(restore);
        return Err(match source.raw_os_error() {
            Some(libc::EPERM) => SwitchError::NotPermitted { uid: who.uid, own },
            _ => SwitchError::Groups {
                uid: who.uid,
                source,
            },
        });
    }
    if !raw::set_fsuid(who.uid) {
        drop(restore);
        return Err(SwitchError::NotPermitted { uid: who.uid, own });
    }
    ACTING_FOR.with(|a| a.set(Some(who.uid)));
    let out = f();
    drop(restore);
    Ok(out)
}

/// The thread's own filesystem credentials, put back when dropped (on
/// return, on an early error, on a panic unwinding).
struct Restore {
    fsuid: u32,
    fsgid: u32,
    groups: Vec<u32>,
}

impl Drop for Restore {
    fn drop(&mut self) {
        ACTING_FOR.with(|a| a.set(None));
        // fsuid first: back to 0 it raises the filesystem capabilities again.
        let ok = raw::set_fsuid(self.fsuid)
            && raw::set_groups(&self.groups).is_ok()
            && raw::set_fsgid(self.fsgid)
            && raw::groups() == self.groups;
        if !ok {
            // Never let this thread run anything else (it belongs to the
            // blocking pool) with a client's rights.
            eprintln!(
                "emberd: a thread could not get its own filesystem credentials back \
                 (fsuid {}, fsgid {}); aborting",
                raw::fsuid(),
                raw::fsgid()
            );
            std::process::abort();
        }
    }
}

/// The raw system calls, on the calling thread only (see the module docs).
mod raw {
    /// An id no call accepts: `setfsuid(-1)` changes nothing and returns
    /// the current fsuid.
    const INVALID: libc::c_long = -1;

    fn setfsuid(uid: libc::c_long) -> u32 {
        // SAFETY: setfsuid takes an integer and has no memory arguments; it
        // changes (if permitted) the calling thread's fsuid only and
        // returns the previous one.
        unsafe { libc::syscall(libc::SYS_setfsuid, uid) as u32 }
    }

    fn setfsgid(gid: libc::c_long) -> u32 {
        // SAFETY: as setfsuid, for the fsgid.
        unsafe { libc::syscall(libc::SYS_setfsgid, gid) as u32 }
    }

    /// The thread's fsuid.
    pub(super) fn fsuid() -> u32 {
        setfsuid(INVALID)
    }

    /// The thread's fsgid.
    pub(super) fn fsgid() -> u32 {
        setfsgid(INVALID)
    }

    /// Sets the thread's fsuid; whether it is `uid` now (setfsuid reports
    /// no error: it returns the previous fsuid either way, so it is read
    /// back).
    pub(super) fn set_fsuid(uid: u32) -> bool {
        setfsuid(libc::c_long::from(uid));
        fsuid() == uid
    }

    /// As [`set_fsuid`], for the fsgid.
    pub(super) fn set_fsgid(gid: u32) -> bool {
        setfsgid(libc::c_long::from(gid));
        fsgid() == gid
    }

    /// The thread's supplementary groups.
    pub(super) fn groups() -> Vec<u32> {
        let mut groups: Vec<libc::gid_t> = Vec::new();
        loop {
            // SAFETY: with size 0 the kernel only returns the count and
            // writes nothing; the pointer is not used.
            let n = unsafe { libc::syscall(libc::SYS_getgroups, 0, std::ptr::null_mut::<u32>()) };
            if n < 0 {
                return groups;
            }
            groups.resize(n as usize, 0);
            // SAFETY: `groups` is a live, writable buffer of `n` gids; the
            // kernel writes at most `n` of them (EINVAL if there are more
            // by now, and the loop asks again).
            let got = unsafe { libc::syscall(libc::SYS_getgroups, n, groups.as_mut_ptr()) };
            if got >= 0 {
                groups.truncate(got as usize);
                return groups;
            }
        }
    }

    /// Sets the thread's supplementary groups (the raw call: this thread
    /// only, unlike glibc's `setgroups`).
    pub(super) fn set_groups(groups: &[u32]) -> std::io::Result<()> {
        // SAFETY: `groups` is a live buffer of `groups.len()` gids, only
        // read by the kernel; the call changes the calling thread's
        // credentials only.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_setgroups,
                groups.len() as libc::c_long,
                groups.as_ptr(),
            )
        };
        match rc {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field of this thread's `/proc/thread-self/status`.
    fn status(field: &str) -> String {
        let s = std::fs::read_to_string("/proc/thread-self/status").unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap()
            .trim()
            .to_owned()
    }

    fn nobody() -> Credentials {
        Credentials {
            uid: 65534,
            gid: 65534,
            groups: vec![4242, 4243],
        }
    }

    #[test]
    fn root_and_own_uid_need_no_switch() {
        assert!(!needs_switch(0));
        assert!(!needs_switch(nix::unistd::geteuid().as_raw()));
        let me = Credentials {
            uid: nix::unistd::geteuid().as_raw(),
            gid: 0,
            groups: vec![],
        };
        assert_eq!(with_rights(&me, acting_for).unwrap(), None);
    }

    #[test]
    fn only_this_thread_switches_and_it_switches_back() {
        if !nix::unistd::geteuid().is_root() {
            return; // needs CAP_SETUID
        }
        let before = (
            status("Uid"),
            status("Gid"),
            status("Groups"),
            status("CapEff"),
        );
        let secret = std::env::temp_dir().join(format!("ember-fscred-{}", std::process::id()));
        std::fs::write(&secret, "root only").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let (during, other) = std::thread::scope(|s| {
            // Another thread looks at its own credentials while this one
            // has the client's.
            let (tx, rx) = std::sync::mpsc::channel::<()>();
            let (back_tx, back_rx) = std::sync::mpsc::channel();
            s.spawn(move || {
                rx.recv().unwrap();
                back_tx
                    .send((status("Uid"), status("Groups"), status("CapEff")))
                    .unwrap();
            });
            let during = with_rights(&nobody(), || {
                tx.send(()).unwrap();
                let other = back_rx.recv().unwrap();
                let during = (status("Uid"), status("Gid"), status("Groups"));
                assert_eq!(acting_for(), Some(65534));
                // Root's 0600 file: refused with the client's rights.
                let e = std::fs::File::open(&secret).map(|_| ());
                (during, other, e)
            })
            .unwrap();
            let (during, other, e) = during;
            assert_eq!(e.unwrap_err().kind(), std::io::ErrorKind::PermissionDenied);
            (during, other)
        });
        // Real, effective, saved, fs: only the last one changed.
        assert!(during.0.ends_with("\t65534"), "{during:?}");
        assert!(during.0.starts_with("0\t0\t0"), "{during:?}");
        assert!(during.1.ends_with("\t65534"), "{during:?}");
        assert_eq!(during.2, "4242 4243");
        // The other thread kept its own, groups and capabilities included.
        assert_eq!(
            (&other.0, &other.1, &other.2),
            (&before.0, &before.2, &before.3)
        );
        assert_eq!(
            (
                status("Uid"),
                status("Gid"),
                status("Groups"),
                status("CapEff")
            ),
            before
        );
        assert_eq!(acting_for(), None);
        // And reads it again.
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "root only");
        std::fs::remove_file(&secret).unwrap();
    }

    #[test]
    fn a_panic_in_the_closure_still_switches_back() {
        if !nix::unistd::geteuid().is_root() {
            return; // needs CAP_SETUID
        }
        let before = (
            status("Uid"),
            status("Gid"),
            status("Groups"),
            status("CapEff"),
        );
        let r = std::panic::catch_unwind(|| {
            with_rights(&nobody(), || {
                assert_eq!(acting_for(), Some(65534));
                panic!("in the closure")
            })
        });
        assert!(r.is_err());
        assert_eq!(
            (
                status("Uid"),
                status("Gid"),
                status("Groups"),
                status("CapEff")
            ),
            before
        );
        assert_eq!(acting_for(), None);
    }
}

//! systemd socket activation of the control socket (`emberd.socket`).
//!
//! The service manager binds the socket, keeps it across emberd's restarts
//! (connections wait in its backlog meanwhile) and passes it as descriptor
//! 3 (and up) with `LISTEN_FDS` (how many), `LISTEN_PID` (for which process:
//! it must be ours, else the variables were inherited and are not meant for
//! us) and `LISTEN_FDNAMES` (the units' `FileDescriptorName=`, `:`-separated).
//! emberd takes the one named `control`, or the only one, checks that it is a
//! listening Unix stream socket, marks every passed descriptor close-on-exec
//! and removes the variables, so neither the zygote nor the workers inherit
//! them. The protocol is a few lines; see `sd_listen_fds(3)`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

/// The first passed descriptor (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// The name emberd looks for in `LISTEN_FDNAMES`.
pub const CONTROL_NAME: &str = "control";

/// The passed sockets cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS` is not a number.
    #[error("LISTEN_FDS={0:?} is not a count of descriptors")]
    BadCount(String),
    /// Several sockets and none named `control`.
    #[error(
        "{count} sockets passed by the service manager (LISTEN_FDNAMES={names:?}) and none is \
         named `control`: set FileDescriptorName=control on the control socket"
    )]
    NoControl {
        /// `LISTEN_FDS`.
        count: usize,
        /// `LISTEN_FDNAMES`.
        names: String,
    },
    /// The chosen descriptor is not what emberd can serve on.
    #[error("passed descriptor {fd} (`{name}`) is not a listening Unix stream socket: {why}")]
    NotUnixListener {
        /// The descriptor number.
        fd: RawFd,
        /// Its name in `LISTEN_FDNAMES` (`control` if none is given).
        name: String,
        /// What it is instead.
        why: String,
    },
}

/// The control socket passed by the service manager.
#[derive(Debug)]
pub struct Activated {
    /// The listening socket, non-blocking and close-on-exec.
    pub listener: UnixListener,
    /// Its path, if it is bound to one (not abstract or unnamed).
    pub path: Option<PathBuf>,
    /// The descriptor it was passed as.
    pub fd: RawFd,
}

/// What the `LISTEN_*` variables say.
#[derive(Debug, PartialEq, Eq)]
pub enum Passed {
    /// Not set: emberd binds its own socket.
    None,
    /// Set for another process (`LISTEN_PID` missing or not ours): ignored.
    NotOurs(String),
    /// `count` descriptors from fd 3, the control socket at `index`.
    Ours {
        /// `LISTEN_FDS`.
        count: usize,
        /// Index of the control socket among them.
        index: usize,
        /// Its name.
        name: String,
    },
}

/// Reads the variables (pure: `vars` are `LISTEN_FDS`, `LISTEN_PID`,
/// `LISTEN_FDNAMES`).
pub fn parse(
    fds: Option<&str>,
    pid: Option<&str>,
    names: Option<&str>,
    me: u32,
) -> Result<Passed, ActivationError> {
    let Some(fds) = fds else {
        return Ok(Passed::None);
    };
    match pid.map(str::trim) {
        Some(p) if p.parse::<u32>().ok() == Some(me) => {}
        other => return Ok(Passed::NotOurs(other.unwrap_or("(unset)").to_owned())),
    }
    let count: usize = fds
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadCount(fds.to_owned()))?;
    if count == 0 {
        return Ok(Passed::None);
    }
    // Names are optional; a list of the wrong length is ignored, as
    // `sd_listen_fds_with_names` does not trust it either.
    let list: Vec<&str> = names.map(|n| n.split(':').collect()).unwrap_or_default();
    let named = (list.len() == count).then_some(&list);
    if let Some(index) = named.and_then(|l| l.iter().position(|n| *n == CONTROL_NAME)) {
        return Ok(Passed::Ours {
            count,
            index,
            name: CONTROL_NAME.to_owned(),
        });
    }
    if count == 1 {
        let name = named.map_or(CONTROL_NAME, |l| l[0]).to_owned();
        return Ok(Passed::Ours {
            count,
            index: 0,
            name,
        });
    }
    Err(ActivationError::NoControl {
        count,
        names: names.unwrap_or_default().to_owned(),
    })
}

/// Takes the control socket from the environment, if the service manager
/// passed one for this process, and removes the `LISTEN_*` variables in any
/// case. Must run while the process is single-threaded (it changes the
/// environment) and before any other code uses descriptors 3 and up.
pub fn take_control_socket() -> Result<Option<Activated>, ActivationError> {
    let var = |k| std::env::var(k).ok();
    let (fds, pid, names) = (var("LISTEN_FDS"), var("LISTEN_PID"), var("LISTEN_FDNAMES"));
    for k in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let passed = parse(
        fds.as_deref(),
        pid.as_deref(),
        names.as_deref(),
        std::process::id(),
    )?;
    let (count, index, name) = match passed {
        Passed::None => return Ok(None),
        Passed::NotOurs(pid) => {
            tracing::warn!(
                listen_pid = pid,
                "LISTEN_FDS is set for another process: ignored, binding the socket"
            );
            return Ok(None);
        }
        Passed::Ours { count, index, name } => (count, index, name),
    };
    let mut chosen = None;
    for i in 0..count {
        let fd = LISTEN_FDS_START + i as RawFd;
        // Close-on-exec on every passed descriptor: none reaches the zygote.
        // SAFETY: fcntl on a descriptor number touches no memory; a number
        // that is not open fails with EBADF. The descriptors 3.. named by
        // LISTEN_FDS were passed to this process and nothing else uses them.
        let set = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        if set < 0 {
            let e = std::io::Error::last_os_error();
            if i == index {
                return Err(ActivationError::NotUnixListener {
                    fd,
                    name,
                    why: format!("it is not open ({e})"),
                });
            }
            continue;
        }
        if i == index {
            // SAFETY: the service manager passed this open descriptor to
            // this process (LISTEN_PID is ours, checked by `parse`), and
            // nothing else in emberd owns it: the variables that name it
            // were removed above, before any other code could read them.
            chosen = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
    let fd = chosen.expect("checked open above");
    check(fd, &name).map(Some)
}

/// Checks that `fd` is a listening `AF_UNIX` `SOCK_STREAM` socket and
/// makes it non-blocking.
fn check(fd: OwnedFd, name: &str) -> Result<Activated, ActivationError> {
    use nix::sys::socket::{
        getsockname, getsockopt, sockopt, AddressFamily, SockType, SockaddrLike, SockaddrStorage,
    };
    let raw = fd.as_raw_fd();
    let not = |why: String| ActivationError::NotUnixListener {
        fd: raw,
        name: name.to_owned(),
        why,
    };
    let addr =
        getsockname::<SockaddrStorage>(raw).map_err(|e| not(format!("not a socket ({e})")))?;
    if addr.family() != Some(AddressFamily::Unix) {
        return Err(not(format!("address family {:?}", addr.family())));
    }
    match getsockopt(&fd, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(t) => return Err(not(format!("socket type {t:?}"))),
        Err(e) => return Err(not(format!("cannot read its type ({e})"))),
    }
    match getsockopt(&fd, sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => return Err(not("it is not listening".into())),
        Err(e) => return Err(not(format!("cannot tell if it listens ({e})"))),
    }
    let path = addr
        .as_unix_addr()
        .and_then(|u| u.path())
        .map(|p| p.to_owned());
    let listener = UnixListener::from(fd);
    listener
        .set_nonblocking(true)
        .map_err(|e| not(format!("cannot make it non-blocking ({e})")))?;
    Ok(Activated {
        listener,
        path,
        fd: raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ours(count: usize, index: usize, name: &str) -> Passed {
        Passed::Ours {
            count,
            index,
            name: name.into(),
        }
    }

    #[test]
    fn variables_pick_the_control_socket() {
        assert_eq!(parse(None, None, None, 7).unwrap(), Passed::None);
        // Inherited from a parent that was activated: not ours.
        assert_eq!(
            parse(Some("1"), Some("6"), None, 7).unwrap(),
            Passed::NotOurs("6".into())
        );
        assert_eq!(
            parse(Some("1"), None, None, 7).unwrap(),
            Passed::NotOurs("(unset)".into())
        );
        assert_eq!(parse(Some("0"), Some("7"), None, 7).unwrap(), Passed::None);
        assert_eq!(
            parse(Some("1"), Some("7"), None, 7).unwrap(),
            ours(1, 0, "control")
        );
        assert_eq!(
            parse(Some("1"), Some("7"), Some("ctl"), 7).unwrap(),
            ours(1, 0, "ctl")
        );
        assert_eq!(
            parse(Some("3"), Some("7"), Some("a:control:b"), 7).unwrap(),
            ours(3, 1, "control")
        );
        assert!(matches!(
            parse(Some("2"), Some("7"), Some("a:b"), 7),
            Err(ActivationError::NoControl { count: 2, .. })
        ));
        // A name list of the wrong length names nothing.
        assert!(matches!(
            parse(Some("2"), Some("7"), Some("control"), 7),
            Err(ActivationError::NoControl { .. })
        ));
        let e = parse(Some("x"), Some("7"), None, 7).unwrap_err();
        assert_eq!(
            e.to_string(),
            "LISTEN_FDS=\"x\" is not a count of descriptors"
        );
    }

    #[test]
    fn only_a_listening_unix_stream_socket_is_taken() {
        let dir = std::env::temp_dir().join(format!("ember-activation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let l = UnixListener::bind(&path).unwrap();
        let a = check(OwnedFd::from(l), "control").unwrap();
        assert_eq!(a.path.as_deref(), Some(path.as_path()));

        let (s, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let e = check(OwnedFd::from(s), "control").unwrap_err().to_string();
        assert!(e.contains("not listening"), "{e}");
        let d = std::os::unix::net::UnixDatagram::unbound().unwrap();
        let e = check(OwnedFd::from(d), "control").unwrap_err().to_string();
        assert!(e.contains("socket type"), "{e}");
        let f = std::fs::File::open("/dev/null").unwrap();
        let e = check(OwnedFd::from(f), "control").unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = check(OwnedFd::from(t), "control").unwrap_err().to_string();
        assert!(e.contains("address family"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

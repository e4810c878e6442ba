//! Listening sockets the supervisor binds for a module and hands to every
//! replica, so replicas (and a later version) share one port without a
//! proxy.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

use crate::manifest::{ListenAddress, ListenerSpec};

/// A listener could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The TCP port is taken.
    #[error("listener {name}: {address} is in use")]
    PortInUse {
        /// Listener name.
        name: String,
        /// Address.
        address: String,
        /// Port.
        port: u16,
    },
    /// The Unix socket path belongs to a live socket.
    #[error("listener {name}: {} is in use", path.display())]
    PathInUse {
        /// Listener name.
        name: String,
        /// Path.
        path: PathBuf,
    },
    /// Something other than a socket is at the Unix path: emberd replaces
    /// only a stale socket, never a file.
    #[error("listener {name}: {} exists and is not a socket (emberd replaces only a stale socket)", path.display())]
    NotASocket {
        /// Listener name.
        name: String,
        /// Path.
        path: PathBuf,
    },
    /// The client that asked may not create a socket at the Unix path
    /// (emberd binds it with its own rights, so it checks the client's).
    #[error("listener {name}: uid {uid} may not create {}: {reason}", path.display())]
    Denied {
        /// Listener name.
        name: String,
        /// Path.
        path: PathBuf,
        /// The client's uid.
        uid: u32,
        /// Why.
        reason: String,
    },
    /// Binding failed otherwise.
    #[error("listener {name}: cannot bind {address}")]
    Bind {
        /// Listener name.
        name: String,
        /// Address.
        address: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A bound listener.
#[derive(Debug)]
pub struct Bound {
    /// Its name.
    pub name: String,
    /// The address actually bound (port 0 resolved).
    pub address: String,
    /// The socket.
    pub fd: OwnedFd,
    /// The Unix path to unlink when the module goes, with the device and
    /// inode of the socket bound there (only that socket is unlinked).
    pub unix_path: Option<(PathBuf, (u64, u64))>,
}

/// Binds one listener.
pub fn bind(spec: &ListenerSpec) -> Result<Bound, ListenError> {
    let bind_err = |source: std::io::Error| ListenError::Bind {
        name: spec.name.clone(),
        address: spec.address.to_string(),
        source,
    };
    match &spec.address {
        ListenAddress::Tcp(a) => match std::net::TcpListener::bind(a) {
            Ok(l) => Ok(Bound {
                name: spec.name.clone(),
                address: l
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_else(|_| a.to_string()),
                fd: l.into(),
                unix_path: None,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(ListenError::PortInUse {
                name: spec.name.clone(),
                address: a.to_string(),
                port: a.port(),
            }),
            Err(e) => Err(bind_err(e)),
        },
        ListenAddress::Unix(p) => {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            if let Ok(meta) = std::fs::symlink_metadata(p) {
                if !meta.file_type().is_socket() {
                    return Err(ListenError::NotASocket {
                        name: spec.name.clone(),
                        path: p.clone(),
                    });
                }
                if socket_is_live(p).map_err(bind_err)? {
                    return Err(ListenError::PathInUse {
                        name: spec.name.clone(),
                        path: p.clone(),
                    });
                }
                std::fs::remove_file(p).map_err(bind_err)?;
            }
            let l = std::os::unix::net::UnixListener::bind(p).map_err(bind_err)?;
            let id = std::fs::symlink_metadata(p)
                .map(|m| (m.dev(), m.ino()))
                .map_err(bind_err)?;
            Ok(Bound {
                name: spec.name.clone(),
                address: spec.address.to_string(),
                fd: l.into(),
                unix_path: Some((p.clone(), id)),
            })
        }
    }
}

/// Whether the calling thread, with a client's filesystem credentials (see
/// `crate::fscred::with_rights`), may create a socket at each Unix listener
/// path of `specs`: search and write permission on its directory, and, if
/// something is there already, ownership of it. emberd binds and later
/// unlinks the path with its own rights; a client may not make it do so
/// where the client could not. Blocking (filesystem): run it off the actor.
pub fn check_client_may_create(specs: &[ListenerSpec], uid: u32) -> Result<(), ListenError> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    for spec in specs {
        let ListenAddress::Unix(p) = &spec.address else {
            continue;
        };
        let denied = |reason: String| ListenError::Denied {
            name: spec.name.clone(),
            path: p.clone(),
            uid,
            reason,
        };
        let dir = p.parent().unwrap_or(std::path::Path::new("/"));
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| denied("the path holds a NUL byte".into()))?;
        // SAFETY: a valid NUL-terminated path; faccessat only reads it. With
        // AT_EACCESS the check uses this thread's fsuid/fsgid and groups.
        let rc = unsafe {
            libc::faccessat(
                libc::AT_FDCWD,
                c.as_ptr(),
                libc::W_OK | libc::X_OK,
                libc::AT_EACCESS,
            )
        };
        if rc != 0 {
            return Err(denied(format!(
                "no write access to {}: {}",
                dir.display(),
                std::io::Error::last_os_error()
            )));
        }
        if let Ok(m) = std::fs::symlink_metadata(p) {
            if m.uid() != uid {
                return Err(denied(format!("it exists and belongs to uid {}", m.uid())));
            }
        }
    }
    Ok(())
}

/// Whether a socket at `p` has a listener: a connect that never blocks
/// (a full backlog, `EAGAIN`, is a live listener too; refused is stale).
/// Runs on the actor thread, so it must not wait for the other side.
fn socket_is_live(p: &std::path::Path) -> std::io::Result<bool> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(p)?;
    match connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr) {
        Ok(()) | Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINPROGRESS) => Ok(true),
        Err(nix::errno::Errno::ECONNREFUSED) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Waits, up to `patience`, until no listener of `specs` is held by
/// another process: after a crash, the workers of the emberd that was
/// killed hold the modules' listeners until their parent-death `SIGKILL`
/// has ended them, which on a busy host takes a moment. Returns the
/// addresses still in use then (the restore reports them as it would
/// have). Blocking: call before the runtime starts.
pub fn wait_free(specs: &[ListenerSpec], patience: std::time::Duration) -> Vec<String> {
    let give_up = std::time::Instant::now() + patience;
    loop {
        let busy: Vec<String> = specs
            .iter()
            .filter(|s| match &s.address {
                ListenAddress::Tcp(a) => {
                    a.port() != 0
                        && matches!(
                            std::net::TcpListener::bind(a),
                            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse
                        )
                }
                ListenAddress::Unix(p) => {
                    use std::os::unix::fs::FileTypeExt;
                    std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
                        && socket_is_live(p).unwrap_or(false)
                }
            })
            .map(|s| s.address.to_string())
            .collect();
        if busy.is_empty() || std::time::Instant::now() >= give_up {
            return busy;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Binds all of a module's listeners, or none.
pub fn bind_all(specs: &[ListenerSpec]) -> Result<Vec<Bound>, ListenError> {
    let mut out = Vec::with_capacity(specs.len());
    for s in specs {
        match bind(s) {
            Ok(b) => out.push(b),
            Err(e) => {
                release(out);
                return Err(e);
            }
        }
    }
    Ok(out)
}

/// Closes listeners and unlinks their Unix paths, each only while it is
/// still the socket emberd bound there.
pub fn release(bound: Vec<Bound>) {
    for b in bound {
        if let Some((p, id)) = &b.unix_path {
            unlink_own(p, *id);
        }
    }
}

/// Unlinks `p` if it is still the socket with this device and inode.
pub fn unlink_own(p: &std::path::Path, id: (u64, u64)) {
    use std::os::unix::fs::MetadataExt;
    if std::fs::symlink_metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == id) {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_in_use_is_named() {
        let spec = ListenerSpec {
            name: "http".into(),
            address: ListenAddress::Tcp("127.0.0.1:0".parse().unwrap()),
        };
        let b = bind(&spec).unwrap();
        let taken = ListenerSpec {
            name: "again".into(),
            address: ListenAddress::Tcp(b.address.parse().unwrap()),
        };
        match bind_all(&[taken]) {
            Err(ListenError::PortInUse { port, .. }) => {
                assert_eq!(
                    port,
                    b.address
                        .rsplit(':')
                        .next()
                        .unwrap()
                        .parse::<u16>()
                        .unwrap()
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unix_stale_replaced_live_refused() {
        let dir = std::env::temp_dir().join(format!("ember-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let spec = ListenerSpec {
            name: "admin".into(),
            address: ListenAddress::Unix(path.clone()),
        };
        let b = bind(&spec).unwrap();
        assert!(matches!(bind(&spec), Err(ListenError::PathInUse { .. })));
        drop(b.fd);
        // Stale file now: replaced.
        let b = bind(&spec).unwrap();
        release(vec![b]);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_is_never_replaced_and_a_full_backlog_is_live() {
        let dir = std::env::temp_dir().join(format!("ember-listen-f-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("victim");
        std::fs::write(&file, "keep me").unwrap();
        let spec = |p: &PathBuf| ListenerSpec {
            name: "admin".into(),
            address: ListenAddress::Unix(p.clone()),
        };
        assert!(matches!(
            bind(&spec(&file)),
            Err(ListenError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
        // A listener that never accepts, its backlog full: a connect would
        // block; the probe does not, and calls it live.
        let sock = dir.join("full.sock");
        let held = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let mut clients = Vec::new();
        while let Ok(c) = {
            let c = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            let addr = nix::sys::socket::UnixAddr::new(&sock).unwrap();
            nix::sys::socket::connect(std::os::fd::AsRawFd::as_raw_fd(&c), &addr).map(|()| c)
        } {
            clients.push(c);
            assert!(clients.len() < 10_000, "backlog never filled");
        }
        assert!(matches!(
            bind(&spec(&sock)),
            Err(ListenError::PathInUse { .. })
        ));
        drop((held, clients));
        // A socket that replaced ours is not unlinked at release.
        let b = bind(&spec(&dir.join("own.sock"))).unwrap();
        std::fs::remove_file(dir.join("own.sock")).unwrap();
        let other = std::os::unix::net::UnixListener::bind(dir.join("own.sock")).unwrap();
        release(vec![b]);
        assert!(dir.join("own.sock").exists());
        drop(other);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

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
    /// The Unix path to unlink when the module goes.
    pub unix_path: Option<PathBuf>,
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
            if std::fs::symlink_metadata(p).is_ok() {
                if std::os::unix::net::UnixStream::connect(p).is_ok() {
                    return Err(ListenError::PathInUse {
                        name: spec.name.clone(),
                        path: p.clone(),
                    });
                }
                std::fs::remove_file(p).map_err(bind_err)?;
            }
            let l = std::os::unix::net::UnixListener::bind(p).map_err(bind_err)?;
            Ok(Bound {
                name: spec.name.clone(),
                address: spec.address.to_string(),
                fd: l.into(),
                unix_path: Some(p.clone()),
            })
        }
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

/// Closes listeners and unlinks their Unix paths.
pub fn release(bound: Vec<Bound>) {
    for b in bound {
        if let Some(p) = &b.unix_path {
            let _ = std::fs::remove_file(p);
        }
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
}

//! Default locations, for root and for an unprivileged user.

use std::path::PathBuf;

/// Environment variable `emberctl` reads for the socket path.
pub const SOCKET_ENV: &str = "EMBER_SOCKET";

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn env_dir(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

/// The runtime directory: `/run/ember` for root, else
/// `$XDG_RUNTIME_DIR/ember`, else `/tmp/ember-$UID`.
pub fn runtime_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/run/ember");
    }
    match env_dir("XDG_RUNTIME_DIR") {
        Some(d) => d.join("ember"),
        None => PathBuf::from(format!("/tmp/ember-{}", nix::unistd::geteuid())),
    }
}

/// The default control socket path.
pub fn default_socket() -> PathBuf {
    runtime_dir().join("control.sock")
}

/// The default state directory: `/var/lib/ember` for root, else
/// `$XDG_STATE_HOME/ember`, else `~/.local/state/ember`, else under the
/// runtime directory.
pub fn default_state_dir() -> PathBuf {
    if is_root() {
        return PathBuf::from("/var/lib/ember");
    }
    if let Some(d) = env_dir("XDG_STATE_HOME") {
        return d.join("ember");
    }
    match env_dir("HOME") {
        Some(h) => h.join(".local/state/ember"),
        None => runtime_dir().join("state"),
    }
}

/// The socket `emberctl` uses: the flag, else `$EMBER_SOCKET` unless unset
/// or empty, else the default.
pub fn client_socket(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| {
        std::env::var_os(SOCKET_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(default_socket)
}

//! Files a client names (an install's manifest and artifact): opened so
//! that nothing blocks and nothing but a regular file of bounded size gets
//! read.
//!
//! A FIFO, a device, a socket or a `/proc` magic link (`/proc/self/fd/0`)
//! named as `module.toml` or as an `entry` is refused before a byte is
//! read: the open never waits for a writer (`O_NONBLOCK`), never takes a
//! controlling terminal (`O_NOCTTY`), resolves no magic link
//! (`openat2(RESOLVE_NO_MAGICLINKS)`), and `fstat` of the descriptor (not a
//! second look at the path) must say regular file under the size cap. The
//! callers run this on the blocking pool, never on the actor's thread.
//!
//! ```no_run
//! # use std::path::Path;
//! let (file, len) = supervisor::input::open_regular(
//!     Path::new("/srv/hello/module.toml"),
//!     1 << 20,
//!     "install.max_manifest_bytes",
//! )?;
//! # Ok::<(), supervisor::input::FileError>(())
//! ```

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag, AT_FDCWD};

/// A named file was refused or could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Open, stat or read failed.
    #[error("cannot read {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a regular file (a FIFO, a device, a socket, a directory).
    #[error("{} is {kind}, not a regular file", path.display())]
    NotRegular {
        /// The file.
        path: PathBuf,
        /// What it is instead (`a FIFO`, `a character device`…).
        kind: &'static str,
    },
    /// The path goes through a `/proc` magic link (`/proc/PID/fd/N`, `exe`…).
    #[error("{} goes through a /proc magic link, not a regular file", path.display())]
    MagicLink {
        /// The path.
        path: PathBuf,
    },
    /// Larger than its cap.
    #[error("{} is {size} bytes, over the {cap}-byte cap (`{key}` in emberd's configuration)", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The cap.
        cap: u64,
        /// The configuration key that sets the cap.
        key: &'static str,
    },
    /// Not UTF-8 text (said without showing it).
    #[error("{} is not UTF-8 text", path.display())]
    NotText {
        /// The file.
        path: PathBuf,
    },
}

impl FileError {
    /// Whether the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// What a non-regular file is, for messages.
fn kind_of(t: std::fs::FileType) -> &'static str {
    if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_dir() {
        "a directory"
    } else {
        "not a plain file"
    }
}

/// Opens `path` for reading without blocking and checks, on the open
/// descriptor, that it is a regular file of at most `cap` bytes (`key`
/// names the cap in errors). Returns the file and its size.
pub fn open_regular(path: &Path, cap: u64, key: &'static str) -> Result<(File, u64), FileError> {
    let io = |source| FileError::Io {
        path: path.to_owned(),
        source,
    };
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match openat2(AT_FDCWD, path, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ELOOP) if through_magic_link(path) => {
            return Err(FileError::MagicLink {
                path: path.to_owned(),
            })
        }
        // Kernels before 5.6: a plain open with the same flags (no magic
        // link check; the type check below still refuses what is not a
        // regular file).
        Err(nix::errno::Errno::ENOSYS) => {
            nix::fcntl::open(path, flags, nix::sys::stat::Mode::empty())
                .map_err(|e| io(e.into()))?
        }
        Err(e) => return Err(io(e.into())),
    };
    let file = File::from(fd);
    let meta = file.metadata().map_err(io)?;
    if !meta.file_type().is_file() {
        return Err(FileError::NotRegular {
            path: path.to_owned(),
            kind: kind_of(meta.file_type()),
        });
    }
    if meta.len() > cap {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            size: meta.len(),
            cap,
            key,
        });
    }
    // Regular files never block; reads are plain from here on.
    let _ = nix::fcntl::fcntl(&file, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()));
    Ok((file, meta.len()))
}

/// Whether an `ELOOP` from `RESOLVE_NO_MAGICLINKS` came from a magic link
/// rather than a symlink loop: the same open without the restriction
/// resolves past it.
fn through_magic_link(path: &Path) -> bool {
    let how = OpenHow::new().flags(OFlag::O_PATH | OFlag::O_CLOEXEC);
    openat2(AT_FDCWD, path, how).is_ok()
}

/// Reads a whole text file of at most `cap` bytes (see [`open_regular`]).
pub fn read_text(path: &Path, cap: u64, key: &'static str) -> Result<String, FileError> {
    let (file, _) = open_regular(path, cap, key)?;
    let mut bytes = Vec::new();
    // It may have grown since the stat: never read past the cap.
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| FileError::Io {
            path: path.to_owned(),
            source,
        })?;
    if bytes.len() as u64 > cap {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            size: bytes.len() as u64,
            cap,
            key,
        });
    }
    String::from_utf8(bytes).map_err(|_| FileError::NotText {
        path: path.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "ember-input-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let d = dir();
        let p = d.join("module.toml");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = read_text(&p, 1024, "k").unwrap_err();
        assert!(
            matches!(e, FileError::NotRegular { kind: "a FIFO", .. }),
            "{e}"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn devices_directories_and_magic_links_are_refused() {
        let e = read_text(Path::new("/dev/zero"), 1024, "k").unwrap_err();
        assert!(
            matches!(
                e,
                FileError::NotRegular {
                    kind: "a character device",
                    ..
                }
            ),
            "{e}"
        );
        let e = read_text(Path::new("/"), 1024, "k").unwrap_err();
        assert!(matches!(e, FileError::NotRegular { .. }), "{e}");
        // Our own stdout, whatever it is, through its magic link.
        let e = read_text(Path::new("/proc/self/fd/1"), 1024, "k").unwrap_err();
        assert!(matches!(e, FileError::MagicLink { .. }), "{e}");
    }

    #[test]
    fn size_cap_names_the_key_and_plain_files_read() {
        let d = dir();
        let p = d.join("big");
        std::fs::write(&p, vec![b'a'; 2000]).unwrap();
        let e = read_text(&p, 1000, "install.max_manifest_bytes").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{} is 2000 bytes, over the 1000-byte cap (`install.max_manifest_bytes` in \
                 emberd's configuration)",
                p.display()
            )
        );
        assert_eq!(read_text(&p, 2000, "k").unwrap().len(), 2000);
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        assert!(matches!(
            read_text(&p, 10, "k"),
            Err(FileError::NotText { .. })
        ));
        // A symlink to a regular file is fine (it is not a magic link).
        let l = d.join("link");
        std::os::unix::fs::symlink(&p, &l).unwrap();
        assert!(open_regular(&l, 10, "k").is_ok());
        std::fs::remove_dir_all(d).unwrap();
    }
}

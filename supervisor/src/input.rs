//! Files a client names (an install's manifest and artifact): opened so
//! that nothing blocks and nothing but a regular file of bounded size gets
//! read.
//!
//! A FIFO, a device, a socket, a `/proc` magic link (`/proc/self/fd/0`) or
//! a file of a pseudo filesystem (`/proc/kmsg`, a sysfs or tracefs file)
//! named as `module.toml` or as an `entry` is refused before it is even
//! opened for reading: the path is first opened `O_PATH` (which opens no
//! device and reads nothing), resolving no magic link
//! (`openat2(RESOLVE_NO_MAGICLINKS)`); `fstat` and `fstatfs` of that
//! descriptor (not a second look at the path) must say a regular file under
//! the size cap on a filesystem that stores files. Only then is that same
//! file opened for reading, through the descriptor, with `O_NONBLOCK` and
//! `O_NOCTTY` kept, and [`read_text`] reads no more than the size `fstat`
//! gave (one byte more says it grew, an error). The callers run this on the
//! blocking pool, never on the actor's thread, with the rights of the
//! client that named the file ([`crate::fscred::with_rights`]): a file it
//! may not read is [`FileError::Denied`], naming its uid.
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
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
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
    /// Opened with a client's rights (see [`crate::fscred`]), which do not
    /// let it search a directory on the path or read the file.
    #[error("permission denied: {} (opened with the rights of uid {uid})", path.display())]
    Denied {
        /// The file.
        path: PathBuf,
        /// The client's uid.
        uid: u32,
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
    /// On a filesystem whose files are kernel interfaces, not stored
    /// bytes (their size says nothing and a read may block for ever).
    #[error("{} is on a pseudo filesystem ({fs}), not a regular file", path.display())]
    PseudoFs {
        /// The file.
        path: PathBuf,
        /// The filesystem (`proc`, `sysfs`…).
        fs: &'static str,
    },
    /// Its size changed between the check and the read.
    #[error("{} changed size while being read", path.display())]
    Changed {
        /// The file.
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
    /// An open or read of `path` failed: [`FileError::Denied`] when it was
    /// refused to a client whose rights this thread has, else
    /// [`FileError::Io`].
    fn io(path: &Path, source: std::io::Error) -> Self {
        match crate::fscred::acting_for() {
            Some(uid) if source.kind() == std::io::ErrorKind::PermissionDenied => {
                FileError::Denied {
                    path: path.to_owned(),
                    uid,
                }
            }
            _ => FileError::Io {
                path: path.to_owned(),
                source,
            },
        }
    }

    /// Whether the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// What a file of mode `mode` that is not regular is, for messages.
fn kind_of(mode: nix::sys::stat::mode_t) -> &'static str {
    use nix::sys::stat::SFlag;
    match SFlag::from_bits_truncate(mode) & SFlag::S_IFMT {
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFDIR => "a directory",
        _ => "not a plain file",
    }
}

/// Filesystems whose "regular files" are kernel interfaces (`f_type` of
/// `fstatfs`, from `linux/magic.h`): their size is 0 or a page whatever they
/// hold, a read may block for ever (`/proc/kmsg`, tracefs `trace_pipe`) or
/// change the system.
const PSEUDO_FS: &[(u32, &str)] = &[
    (0x9fa0, "proc"),
    (0x6265_6572, "sysfs"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0x0027_e0eb, "cgroup"),
    (0x6367_7270, "cgroup2"),
    (0x6265_6570, "configfs"),
    (0xcafe_4a11, "bpf"),
    (0x1cd1, "devpts"),
    (0x6165_676c, "pstore"),
    (0xde5e_81e4, "efivarfs"),
    (0xf97c_ff8c, "selinuxfs"),
    (0x4341_5d53, "smackfs"),
    (0x6573_5543, "fusectl"),
    (0x4249_4e4d, "binfmt_misc"),
    (0x6e73_6673, "nsfs"),
    (0x1980_0202, "mqueue"),
    (0x0765_5821, "resctrl"),
    (0x0904_1934, "anon_inode"),
    (0x5049_5045, "pipefs"),
    (0x534f_434b, "sockfs"),
];

/// The pseudo filesystem (see [`PSEUDO_FS`]) with magic `f_type`, if any.
fn pseudo_fs(f_type: u32) -> Option<&'static str> {
    PSEUDO_FS
        .iter()
        .find(|(magic, _)| *magic == f_type)
        .map(|(_, name)| *name)
}

/// Opens `path` for reading without blocking and checks, on the open
/// descriptor, that it is a regular file of at most `cap` bytes (`key`
/// names the cap in errors) on a filesystem that stores files. Returns the
/// file (still `O_NONBLOCK`) and its size.
pub fn open_regular(path: &Path, cap: u64, key: &'static str) -> Result<(File, u64), FileError> {
    let io = |source| FileError::io(path, source);
    // O_PATH: no device is opened (opening `/dev/watchdog` arms it), no
    // pseudo file sees an open; the checks below run on this descriptor.
    let how = OpenHow::new()
        .flags(OFlag::O_PATH | OFlag::O_CLOEXEC)
        .resolve(ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let at = match openat2(AT_FDCWD, path, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ELOOP) if through_magic_link(path) => {
            return Err(FileError::MagicLink {
                path: path.to_owned(),
            })
        }
        // Kernels before 5.6: a plain O_PATH open (no magic link check; the
        // type check below still refuses what is not a regular file).
        Err(nix::errno::Errno::ENOSYS) => nix::fcntl::open(
            path,
            OFlag::O_PATH | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| io(e.into()))?,
        Err(e) => return Err(io(e.into())),
    };
    let st = nix::sys::stat::fstat(&at).map_err(|e| io(e.into()))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(FileError::NotRegular {
            path: path.to_owned(),
            kind: kind_of(st.st_mode),
        });
    }
    let fs = nix::sys::statfs::fstatfs(&at).map_err(|e| io(e.into()))?;
    // `f_type` is a signed word of the platform; the magics are 32 bits.
    if let Some(fs) = pseudo_fs(fs.filesystem_type().0 as u32) {
        return Err(FileError::PseudoFs {
            path: path.to_owned(),
            fs,
        });
    }
    let len = st.st_size as u64;
    if len > cap {
        return Err(FileError::TooLarge {
            path: path.to_owned(),
            size: len,
            cap,
            key,
        });
    }
    // The file checked, opened for reading through its descriptor (the
    // path may name another file by now). Regular files ignore O_NONBLOCK
    // on the filesystems left; it stays set in case one does not.
    let fd = nix::fcntl::open(
        format!("/proc/self/fd/{}", at.as_raw_fd()).as_str(),
        OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| io(e.into()))?;
    let file = File::from(fd);
    let again = file.metadata().map_err(io)?;
    if (again.dev(), again.ino()) != (st.st_dev as u64, st.st_ino as u64) {
        // Only if /proc is not what it should be; never read another file.
        return Err(io(std::io::Error::other(
            "the file changed while being opened",
        )));
    }
    Ok((file, len))
}

/// Whether an `ELOOP` from `RESOLVE_NO_MAGICLINKS` came from a magic link
/// rather than a symlink loop: the same open without the restriction
/// resolves past it.
fn through_magic_link(path: &Path) -> bool {
    let how = OpenHow::new().flags(OFlag::O_PATH | OFlag::O_CLOEXEC);
    openat2(AT_FDCWD, path, how).is_ok()
}

/// Reads a whole text file of at most `cap` bytes (see [`open_regular`]):
/// no more than the size `fstat` gave, and a file that grew since is
/// refused ([`FileError::Changed`]).
pub fn read_text(path: &Path, cap: u64, key: &'static str) -> Result<String, FileError> {
    let (file, len) = open_regular(path, cap, key)?;
    let mut bytes = Vec::with_capacity(len as usize + 1);
    file.take(len + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| FileError::io(path, source))?;
    if bytes.len() as u64 != len {
        return Err(FileError::Changed {
            path: path.to_owned(),
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

    #[test]
    fn pseudo_filesystems_are_refused_before_a_read() {
        // /proc/kmsg blocks a read for ever (and as root drains the kernel
        // log); it is refused by its filesystem, whoever may open it.
        for (p, fs) in [
            ("/proc/kmsg", "proc"),
            ("/proc/self/status", "proc"),
            ("/sys/kernel/notes", "sysfs"),
        ] {
            if !Path::new(p).exists() {
                continue;
            }
            let e = read_text(Path::new(p), 1 << 20, "k").unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("{p} is on a pseudo filesystem ({fs}), not a regular file")
            );
        }
        assert_eq!(pseudo_fs(0x9fa0), Some("proc"));
        assert_eq!(pseudo_fs(0xef53), None, "ext4 stores files");
    }

    #[test]
    fn opened_with_a_clients_rights_a_file_it_cannot_read_is_denied() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::geteuid().is_root() {
            return; // needs CAP_SETUID
        }
        let d = dir();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        let client = crate::fscred::Credentials {
            uid: 65534,
            gid: 65534,
            groups: vec![],
        };
        let as_client =
            |p: &Path| crate::fscred::with_rights(&client, || read_text(p, 1024, "k")).unwrap();
        // Root's 0600 file, and a readable file in root's 0700 directory.
        let secret = d.join("secret");
        std::fs::write(&secret, "token = \"ghp_SECRET\"\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let closed = d.join("closed");
        std::fs::create_dir(&closed).unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
        let inside = closed.join("module.toml");
        std::fs::write(&inside, "name = \"ghp_SECRET\"\n").unwrap();
        for p in [&secret, &inside] {
            let e = as_client(p).unwrap_err();
            assert_eq!(
                e.to_string(),
                format!(
                    "permission denied: {} (opened with the rights of uid 65534)",
                    p.display()
                )
            );
        }
        // Readable by the client: read; and root reads the secret as before.
        let open = d.join("open");
        std::fs::write(&open, "name = \"hello\"\n").unwrap();
        assert_eq!(as_client(&open).unwrap(), "name = \"hello\"\n");
        assert!(read_text(&secret, 1024, "k").is_ok());
        std::fs::remove_dir_all(d).unwrap();
    }
}

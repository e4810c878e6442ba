//! ELF header check done before `dlopen`, so that a file that is not a
//! shared object, or one built for another architecture, is a clear error
//! instead of whatever the dynamic loader makes of it.

use std::io::Read;
use std::path::{Path, PathBuf};

/// Why a file cannot be loaded as a module or plugin.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No ELF magic (or too short).
    #[error("{path} is not an ELF file")]
    NotElf {
        /// The file.
        path: PathBuf,
    },
    /// ELF, but not `ET_DYN`.
    #[error("{path} is not a shared object (ELF type {e_type})")]
    NotSharedObject {
        /// The file.
        path: PathBuf,
        /// The `e_type` found.
        e_type: u16,
    },
    /// 32/64-bit or endianness differ from the host.
    #[error("{path} has the wrong ELF class or byte order ({found}, host is {expected})")]
    WrongClass {
        /// The file.
        path: PathBuf,
        /// What the file is.
        found: &'static str,
        /// What the host is.
        expected: &'static str,
    },
    /// Built for another machine.
    #[error("{path} is built for {found}, host is {expected}")]
    WrongArchitecture {
        /// The file.
        path: PathBuf,
        /// Machine named in the file.
        found: String,
        /// Host machine.
        expected: String,
    },
}

const ET_DYN: u16 = 3;

fn host_machine() -> u16 {
    if cfg!(target_arch = "x86_64") {
        62
    } else if cfg!(target_arch = "aarch64") {
        183
    } else if cfg!(target_arch = "riscv64") {
        243
    } else if cfg!(target_arch = "x86") {
        3
    } else if cfg!(target_arch = "arm") {
        40
    } else {
        0
    }
}

fn machine_name(m: u16) -> String {
    match m {
        3 => "x86".into(),
        40 => "arm".into(),
        62 => "x86_64".into(),
        183 => "aarch64".into(),
        243 => "riscv".into(),
        other => format!("ELF machine {other}"),
    }
}

fn class_name(class: u8, data: u8) -> &'static str {
    match (class, data) {
        (1, 1) => "32-bit little-endian",
        (1, 2) => "32-bit big-endian",
        (2, 1) => "64-bit little-endian",
        (2, 2) => "64-bit big-endian",
        _ => "unknown class",
    }
}

/// Checks that the first bytes of an ELF file describe a shared object for
/// this host. Pure function over the header bytes.
pub fn check_header(path: &Path, head: &[u8]) -> Result<(), ElfError> {
    if head.len() < 20 || head[..4] != *b"\x7fELF" {
        return Err(ElfError::NotElf {
            path: path.to_owned(),
        });
    }
    let (class, data) = (head[4], head[5]);
    let host_class = if cfg!(target_pointer_width = "64") {
        2
    } else {
        1
    };
    let host_data = if cfg!(target_endian = "little") { 1 } else { 2 };
    if (class, data) != (host_class, host_data) {
        return Err(ElfError::WrongClass {
            path: path.to_owned(),
            found: class_name(class, data),
            expected: class_name(host_class, host_data),
        });
    }
    let u16_at = |i: usize| {
        let b = [head[i], head[i + 1]];
        if data == 1 {
            u16::from_le_bytes(b)
        } else {
            u16::from_be_bytes(b)
        }
    };
    let e_type = u16_at(16);
    if e_type != ET_DYN {
        return Err(ElfError::NotSharedObject {
            path: path.to_owned(),
            e_type,
        });
    }
    let machine = u16_at(18);
    if machine != host_machine() {
        return Err(ElfError::WrongArchitecture {
            path: path.to_owned(),
            found: machine_name(machine),
            expected: machine_name(host_machine()),
        });
    }
    Ok(())
}

/// Reads the header of `path` and runs [`check_header`].
pub fn check_file(path: &Path) -> Result<(), ElfError> {
    check_file_as(path, path)
}

/// [`check_file`] of the file at `open`, with errors naming it `name` (for
/// a file opened through `/proc/self/fd`).
pub fn check_file_as(open: &Path, name: &Path) -> Result<(), ElfError> {
    let path = name;
    let read = |source| ElfError::Read {
        path: path.to_owned(),
        source,
    };
    let mut f = std::fs::File::open(open).map_err(read)?;
    let mut head = [0u8; 64];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(read(e)),
        }
    }
    check_header(path, &head[..n])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(class: u8, e_type: u16, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = 1;
        h[16..18].copy_from_slice(&e_type.to_le_bytes());
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn accepts_host_shared_object() {
        check_header(Path::new("x"), &header(2, ET_DYN, host_machine())).unwrap();
    }

    #[test]
    fn rejects_text_and_short_files() {
        assert!(matches!(
            check_header(Path::new("x"), b"hello world, not elf at all"),
            Err(ElfError::NotElf { .. })
        ));
        assert!(matches!(
            check_header(Path::new("x"), b"\x7fELF"),
            Err(ElfError::NotElf { .. })
        ));
    }

    #[test]
    fn rejects_executables_and_foreign_machines() {
        let e = check_header(Path::new("x"), &header(2, 2, host_machine())).unwrap_err();
        assert!(matches!(e, ElfError::NotSharedObject { e_type: 2, .. }));
        let other = if host_machine() == 62 { 183 } else { 62 };
        let e = check_header(Path::new("lib.so"), &header(2, ET_DYN, other)).unwrap_err();
        assert!(e.to_string().contains("is built for"), "{e}");
        let e = check_header(Path::new("x"), &header(1, ET_DYN, host_machine())).unwrap_err();
        assert!(matches!(e, ElfError::WrongClass { .. }));
    }

    #[test]
    fn own_test_binary_is_not_a_shared_object_or_is_pie() {
        // A PIE executable is ET_DYN too; the symbol check catches those.
        let exe = std::env::current_exe().unwrap();
        let r = check_file(&exe);
        assert!(r.is_ok() || matches!(r, Err(ElfError::NotSharedObject { .. })));
    }
}

//! memfd-backed segments: created with narrow permissions, sealed, passed as
//! descriptors. Nothing is ever named under `/dev/shm`, so a crash leaves
//! nothing behind: a segment lives exactly as long as some descriptor or
//! mapping of it.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::stat::fstat;
use nix::unistd::ftruncate;

/// Seals every Ember segment carries: nobody can change its size, so no
/// mapping of it can ever take `SIGBUS`, and nobody can add or remove seals.
pub const BASE_SEALS: SealFlag = SealFlag::F_SEAL_SHRINK
    .union(SealFlag::F_SEAL_GROW)
    .union(SealFlag::F_SEAL_SEAL);

/// Errors creating, sealing or opening a segment.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// A system call failed.
    #[error("{op} failed")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The error the kernel returned.
        #[source]
        source: std::io::Error,
    },
    /// The descriptor lacks seals this kind of segment requires.
    #[error("segment is missing required seals (has {has:#x}, needs {needs:#x})")]
    MissingSeals {
        /// Seals present.
        has: i32,
        /// Seals required.
        needs: i32,
    },
    /// The segment's size does not fit what it claims to hold.
    #[error("segment size {actual} does not fit: {reason}")]
    BadSize {
        /// Size of the file.
        actual: u64,
        /// Why it does not fit.
        reason: &'static str,
    },
    /// The segment's header is not what this kind of segment expects.
    #[error("invalid segment header: {0}")]
    BadHeader(&'static str),
}

impl SegmentError {
    pub(crate) fn os(op: &'static str, e: impl Into<std::io::Error>) -> Self {
        Self::Os {
            op,
            source: e.into(),
        }
    }
}

/// Creates an anonymous, close-on-exec, sealable memfd of `len` bytes.
pub fn create_memfd(name: &CStr, len: u64) -> Result<OwnedFd, SegmentError> {
    let fd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(|e| SegmentError::os("memfd_create", e))?;
    let len = i64::try_from(len).map_err(|_| SegmentError::BadSize {
        actual: len,
        reason: "larger than i64::MAX",
    })?;
    ftruncate(&fd, len).map_err(|e| SegmentError::os("ftruncate", e))?;
    Ok(fd)
}

/// Adds `seals` to a memfd.
pub fn add_seals(fd: BorrowedFd<'_>, seals: SealFlag) -> Result<(), SegmentError> {
    fcntl(fd, FcntlArg::F_ADD_SEALS(seals))
        .map_err(|e| SegmentError::os("fcntl(F_ADD_SEALS)", e))?;
    Ok(())
}

/// The seals a memfd carries.
pub fn seals(fd: BorrowedFd<'_>) -> Result<SealFlag, SegmentError> {
    let bits =
        fcntl(fd, FcntlArg::F_GET_SEALS).map_err(|e| SegmentError::os("fcntl(F_GET_SEALS)", e))?;
    Ok(SealFlag::from_bits_retain(bits))
}

/// Checks that `fd` carries at least `needs`, and returns its size.
pub fn check_sealed(fd: impl AsFd, needs: SealFlag) -> Result<u64, SegmentError> {
    let has = seals(fd.as_fd())?;
    if !has.contains(needs) {
        return Err(SegmentError::MissingSeals {
            has: has.bits(),
            needs: needs.bits(),
        });
    }
    let st = fstat(fd.as_fd()).map_err(|e| SegmentError::os("fstat", e))?;
    Ok(st.st_size as u64)
}

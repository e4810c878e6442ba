//! Sealed, read-only shared data: rkyv archives readers use in place.
//!
//! The owner writes an archive into a fresh memfd with `write(2)` (it never
//! maps it writable), then seals it against writing, resizing and further
//! sealing. Readers check those seals before mapping it read-only, so the
//! bytes they see can never change under them and a plain `&[u8]` to them is
//! sound. A [`Publisher`] hands out versions: each new version is a new
//! segment, announced to subscribers before the generation number in a
//! small control segment (which only the owner can write) moves forward, and
//! a reader still holding an old version keeps its mapping untouched.

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nix::fcntl::SealFlag;
use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
use rkyv::api::high::HighValidator;
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::Portable;

use crate::fdpass;
use crate::region::Region;
use crate::segment::{self, SegmentError, BASE_SEALS};

const DATA_MAGIC: u64 = u64::from_le_bytes(*b"EMBRDAT1");
const CONTROL_MAGIC: u64 = u64::from_le_bytes(*b"EMBRGEN1");
const LAYOUT_VERSION: u32 = 1;
/// Offset of the archive in a data segment; a multiple of rkyv's largest
/// alignment.
const PAYLOAD: usize = 64;
const CONTROL_LEN: usize = 4096;
/// Seals of a data segment: nothing about it can ever change.
const DATA_SEALS: SealFlag = BASE_SEALS.union(SealFlag::F_SEAL_WRITE);
/// Seals of a control segment: only the owner's existing mapping can write.
const CONTROL_SEALS: SealFlag = BASE_SEALS.union(SealFlag::F_SEAL_FUTURE_WRITE);

/// Errors publishing or reading shared data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The segment is missing, unsealed, or malformed.
    #[error("shared data segment")]
    Segment(#[from] SegmentError),
    /// The archive failed validation.
    #[error("shared data failed validation")]
    Invalid(#[source] rancor::Error),
    /// Serializing the value failed.
    #[error("serializing shared data failed")]
    Serialize(#[source] rancor::Error),
    /// The publisher went away or dropped this subscriber for lagging.
    #[error("publisher is gone or dropped this subscriber")]
    PublisherGone,
    /// A socket operation failed.
    #[error("{op} failed")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn os(op: &'static str, e: impl Into<std::io::Error>) -> DataError {
    DataError::Os {
        op,
        source: e.into(),
    }
}

/// Writes `archive` into a new sealed data segment and returns its
/// descriptor, ready to hand to readers.
pub fn seal_bytes(archive: &[u8], generation: u64) -> Result<OwnedFd, SegmentError> {
    let fd = segment::create_memfd(c"ember-data", (PAYLOAD + archive.len()) as u64)?;
    let mut header = [0u8; PAYLOAD];
    header[0..8].copy_from_slice(&DATA_MAGIC.to_le_bytes());
    header[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&generation.to_le_bytes());
    header[24..32].copy_from_slice(&(archive.len() as u64).to_le_bytes());
    let mut file = std::fs::File::from(fd);
    file.write_all(&header)
        .map_err(|e| SegmentError::os("write", e))?;
    file.write_all(archive)
        .map_err(|e| SegmentError::os("write", e))?;
    let fd = OwnedFd::from(file);
    segment::add_seals(fd.as_fd(), DATA_SEALS)?;
    Ok(fd)
}

/// One sealed version of shared data, mapped read-only.
#[derive(Debug)]
pub struct SealedData {
    region: Region,
    generation: u64,
    len: usize,
}

impl SealedData {
    /// Maps a sealed data segment after checking its seals and header.
    pub fn open(fd: impl AsFd) -> Result<Self, SegmentError> {
        let size = segment::check_sealed(fd.as_fd(), DATA_SEALS)?;
        if size < PAYLOAD as u64 || size > usize::MAX as u64 {
            return Err(SegmentError::BadSize {
                actual: size,
                reason: "smaller than a data header",
            });
        }
        let region =
            Region::map_ro(fd.as_fd(), size as usize).map_err(|e| SegmentError::os("mmap", e))?;
        // SAFETY: F_SEAL_WRITE was checked above: no process can write this
        // memfd any more, and our mapping is read-only.
        let bytes = unsafe { region.sealed_bytes() };
        let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        if word(0) != DATA_MAGIC {
            return Err(SegmentError::BadHeader(
                "not a shared data segment (bad magic)",
            ));
        }
        if u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) != LAYOUT_VERSION {
            return Err(SegmentError::BadHeader(
                "unsupported shared data layout version",
            ));
        }
        let len = word(24);
        if len > size - PAYLOAD as u64 {
            return Err(SegmentError::BadHeader("payload length exceeds segment"));
        }
        Ok(Self {
            generation: word(16),
            len: len as usize,
            region,
        })
    }

    /// The version number the publisher gave this data.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The archive bytes, in place.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `open` checked F_SEAL_WRITE; the mapping is read-only.
        let all = unsafe { self.region.sealed_bytes() };
        &all[PAYLOAD..PAYLOAD + self.len]
    }

    /// The archived root, validated (use this for data from anyone).
    pub fn access<T>(&self) -> Result<&T, DataError>
    where
        T: Portable + for<'a> CheckBytes<HighValidator<'a, rancor::Error>>,
    {
        rkyv::access::<T, rancor::Error>(self.bytes()).map_err(DataError::Invalid)
    }

    /// The archived root without validation.
    ///
    /// # Safety
    /// The writer is trusted to have archived a `T` (e.g. the base itself
    /// published it). The bytes cannot change: the segment is sealed.
    pub unsafe fn access_unchecked<T: Portable>(&self) -> &T {
        // SAFETY: the caller vouches for the archive's type and validity.
        unsafe { rkyv::access_unchecked::<T>(self.bytes()) }
    }
}

/// The owner of a stream of shared data versions.
///
/// ```
/// use shm_ipc::data::{Publisher, Subscriber};
///
/// let mut publisher = Publisher::new()?;
/// let end = publisher.subscribe()?; // goes to the reader's process
/// publisher.publish(&vec![1u32, 2, 3])?;
/// let mut reader = Subscriber::open(end)?;
/// let data = reader.latest()?.expect("published");
/// let nums = data.access::<rkyv::Archived<Vec<u32>>>()?;
/// assert_eq!(nums.as_slice(), [1, 2, 3]);
/// # Ok::<(), shm_ipc::data::DataError>(())
/// ```
#[derive(Debug)]
pub struct Publisher {
    control: Region,
    control_fd: OwnedFd,
    subscribers: Vec<OwnedFd>,
    generation: u64,
    current: Option<OwnedFd>,
}

/// What a reader's process needs to subscribe: the control segment and its
/// end of the announcement socket.
#[derive(Debug)]
pub struct SubscriberEnd {
    control: OwnedFd,
    sock: OwnedFd,
}

impl SubscriberEnd {
    /// Wraps descriptors received from another process.
    pub fn from_fds(control: OwnedFd, sock: OwnedFd) -> Self {
        Self { control, sock }
    }
    /// The control segment and socket descriptors, in that order.
    pub fn into_fds(self) -> (OwnedFd, OwnedFd) {
        (self.control, self.sock)
    }
    /// Borrows both descriptors, e.g. to send them.
    pub fn fds(&self) -> [BorrowedFd<'_>; 2] {
        [self.control.as_fd(), self.sock.as_fd()]
    }
}

impl Publisher {
    /// Creates the control segment (sealed so only this mapping can write).
    pub fn new() -> Result<Self, DataError> {
        let control_fd = segment::create_memfd(c"ember-data-control", CONTROL_LEN as u64)?;
        let control =
            Region::map_rw(&control_fd, CONTROL_LEN).map_err(|e| SegmentError::os("mmap", e))?;
        control.u64_at(0).store(CONTROL_MAGIC, Ordering::Relaxed);
        segment::add_seals(control_fd.as_fd(), CONTROL_SEALS)?;
        Ok(Self {
            control,
            control_fd,
            subscribers: Vec::new(),
            generation: 0,
            current: None,
        })
    }

    /// The generation of the latest version (0: none yet).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Archives `value` with rkyv and publishes it as the next version.
    pub fn publish<T>(&mut self, value: &T) -> Result<u64, DataError>
    where
        T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rancor::Error,
            >,
        >,
    {
        let bytes = rkyv::to_bytes::<rancor::Error>(value).map_err(DataError::Serialize)?;
        self.publish_bytes(&bytes)
    }

    /// Publishes an already archived value as the next version: seals it,
    /// sends it to every subscriber, then advances the generation.
    pub fn publish_bytes(&mut self, archive: &[u8]) -> Result<u64, DataError> {
        let generation = self.generation + 1;
        let fd = seal_bytes(archive, generation)?;
        self.subscribers
            .retain(|sock| announce(sock.as_fd(), generation, fd.as_fd()).is_ok());
        self.generation = generation;
        // Release: pairs with the Acquire in `Subscriber::latest`; the
        // announcement is queued on every socket before readers see it.
        self.control.u64_at(8).store(generation, Ordering::Release);
        self.current = Some(fd);
        Ok(generation)
    }

    /// Adds a subscriber; it is sent the current version at once.
    pub fn subscribe(&mut self) -> Result<SubscriberEnd, DataError> {
        let (mine, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| os("socketpair", e))?;
        if let Some(fd) = &self.current {
            announce(mine.as_fd(), self.generation, fd.as_fd()).map_err(|e| os("sendmsg", e))?;
        }
        self.subscribers.push(mine);
        let control = self.control_fd.try_clone().map_err(|e| os("dup", e))?;
        Ok(SubscriberEnd {
            control,
            sock: theirs,
        })
    }
}

fn announce(sock: BorrowedFd<'_>, generation: u64, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let raw = [fd.as_raw_fd()];
    let bytes = generation.to_le_bytes();
    let iov = [std::io::IoSlice::new(&bytes)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// A reader of a publisher's versions.
#[derive(Debug)]
pub struct Subscriber {
    control: Region,
    sock: OwnedFd,
    current: Option<Arc<SealedData>>,
}

impl Subscriber {
    /// Maps the control segment read-only, after checking that nobody but
    /// its owner can write it.
    pub fn open(end: SubscriberEnd) -> Result<Self, DataError> {
        let size = segment::check_sealed(&end.control, CONTROL_SEALS)?;
        if size < CONTROL_LEN as u64 {
            return Err(SegmentError::BadSize {
                actual: size,
                reason: "smaller than a control segment",
            }
            .into());
        }
        let control =
            Region::map_ro(&end.control, CONTROL_LEN).map_err(|e| SegmentError::os("mmap", e))?;
        if control.u64_at(0).load(Ordering::Relaxed) != CONTROL_MAGIC {
            return Err(SegmentError::BadHeader("not a shared data control segment").into());
        }
        Ok(Self {
            control,
            sock: end.sock,
            current: None,
        })
    }

    /// The newest version published, or `None` before the first. Versions a
    /// caller still holds stay mapped and unchanged.
    pub fn latest(&mut self) -> Result<Option<Arc<SealedData>>, DataError> {
        // Acquire: pairs with the Release in `Publisher::publish_bytes`.
        let want = self.control.u64_at(8).load(Ordering::Acquire);
        while self.current.as_ref().map_or(0, |c| c.generation) < want {
            let mut buf = [0u8; 8];
            let (n, fds) = fdpass::recv_with_fds_flags(self.sock.as_fd(), &mut buf, true)
                .map_err(|e| os("recvmsg", e))?;
            if n == 0 {
                return Err(DataError::PublisherGone);
            }
            let Some(fd) = fds.into_iter().next() else {
                return Err(SegmentError::BadHeader("announcement without a descriptor").into());
            };
            let data = SealedData::open(&fd)?;
            if data.generation != u64::from_le_bytes(buf) {
                return Err(
                    SegmentError::BadHeader("announced generation does not match segment").into(),
                );
            }
            self.current = Some(Arc::new(data));
        }
        Ok(self.current.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_version_does_not_disturb_old_reader() {
        let mut p = Publisher::new().unwrap();
        let mut s = Subscriber::open(p.subscribe().unwrap()).unwrap();
        assert!(s.latest().unwrap().is_none());
        p.publish(&String::from("one")).unwrap();
        let v1 = s.latest().unwrap().unwrap();
        p.publish(&String::from("two")).unwrap();
        p.publish(&String::from("three")).unwrap();
        let v3 = s.latest().unwrap().unwrap();
        assert_eq!(
            v1.access::<rkyv::Archived<String>>().unwrap().as_str(),
            "one"
        );
        assert_eq!(
            v3.access::<rkyv::Archived<String>>().unwrap().as_str(),
            "three"
        );
        assert_eq!((v1.generation(), v3.generation()), (1, 3));
    }

    #[test]
    fn data_segment_cannot_be_written_or_mapped_writable() {
        let fd = seal_bytes(b"payload", 1).unwrap();
        let mut f = std::fs::File::from(fd.try_clone().unwrap());
        assert!(
            f.write_all(b"x").is_err(),
            "write to sealed segment must fail"
        );
        assert!(
            Region::map_rw(&fd, 4096).is_err(),
            "writable mapping must fail"
        );
        assert_eq!(SealedData::open(&fd).unwrap().bytes(), b"payload");
    }

    #[test]
    fn control_segment_cannot_be_mapped_writable_by_readers() {
        let mut p = Publisher::new().unwrap();
        let (control, _sock) = p.subscribe().unwrap().into_fds();
        assert!(Region::map_rw(&control, CONTROL_LEN).is_err());
    }

    #[test]
    fn unsealed_segment_is_refused() {
        let fd = segment::create_memfd(c"x", 128).unwrap();
        assert!(matches!(
            SealedData::open(&fd),
            Err(SegmentError::MissingSeals { .. })
        ));
    }

    #[test]
    fn invalid_archive_is_an_error_not_ub() {
        // A vector whose relative pointer and length point far outside.
        let fd = seal_bytes(&[0x7f; 16], 1).unwrap();
        let d = SealedData::open(&fd).unwrap();
        assert!(d.access::<rkyv::Archived<Vec<u64>>>().is_err());
    }
}

//! The frame every control message travels in: `magic "EMBW" | u16 version
//! | u16 kind | u32 body_len | body`, little-endian; strings are `u32 len |
//! UTF-8`. The length prefix also lets the frames travel over a stream
//! transport.

use super::Grant;
use crate::abi::GrantKind;

/// Protocol version carried in every frame.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest frame accepted (header included).
pub const MAX_FRAME: usize = 1 << 20;
pub(crate) const MAGIC: [u8; 4] = *b"EMBW";
pub(crate) const HEADER: usize = 12;

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than its header or its declared body.
    #[error("frame truncated")]
    Truncated,
    /// Wrong magic.
    #[error("bad frame magic")]
    BadMagic,
    /// Unsupported protocol version.
    #[error("unsupported protocol version {0}")]
    Version(u16),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    /// A field held a value outside its enum.
    #[error("invalid value {value} for {field}")]
    InvalidValue {
        /// Field.
        field: &'static str,
        /// Value.
        value: u32,
    },
    /// A string was not UTF-8.
    #[error("string is not UTF-8")]
    Utf8,
    /// Bytes left after the body.
    #[error("trailing bytes after frame body")]
    Trailing,
    /// Larger than [`MAX_FRAME`].
    #[error("frame too large")]
    TooLarge,
}

pub(crate) mod kind {
    pub(crate) const LAUNCH: u16 = 1;
    pub(crate) const STOP: u16 = 2;
    pub(crate) const ATTACH: u16 = 3;
    /// More descriptors of the message before it (no body).
    pub(crate) const MORE_FDS: u16 = 4;
    pub(crate) const IDLE: u16 = 100;
    pub(crate) const TRANSITION: u16 = 101;
    pub(crate) const FAILED: u16 = 102;
    pub(crate) const LOG: u16 = 103;
    pub(crate) const SANDBOXED: u16 = 104;
}

pub(crate) struct Enc(Vec<u8>);

impl Enc {
    pub(crate) fn new(kind: u16) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&MAGIC);
        v.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        v.extend_from_slice(&kind.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        Self(v)
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn str(&mut self, s: &str) {
        // Strings longer than u32::MAX cannot be framed anyway (MAX_FRAME).
        self.u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(s.as_bytes());
    }
    pub(crate) fn grants(&mut self, grants: &[Grant]) {
        self.u32(u32::try_from(grants.len()).unwrap_or(u32::MAX));
        for g in grants {
            self.u32(g.kind as u32);
            self.str(&g.name);
        }
    }
    pub(crate) fn strs<'s>(&mut self, v: impl ExactSizeIterator<Item = &'s str>) {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        for x in v {
            self.str(x);
        }
    }
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let body = u32::try_from(self.0.len() - HEADER).unwrap_or(u32::MAX);
        self.0[8..12].copy_from_slice(&body.to_le_bytes());
        self.0
    }
}

pub(crate) struct Dec<'a>(pub(crate) &'a [u8]);

impl<'a> Dec<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    pub(crate) fn grants(&mut self) -> Result<Vec<Grant>, DecodeError> {
        let n = self.u32()?;
        let mut grants = Vec::new();
        for _ in 0..n {
            let v = self.u32()?;
            let kind = GrantKind::from_u32(v).ok_or(DecodeError::InvalidValue {
                field: "grant kind",
                value: v,
            })?;
            grants.push(Grant {
                kind,
                name: self.str()?,
            });
        }
        Ok(grants)
    }
    pub(crate) fn strs(&mut self) -> Result<Vec<String>, DecodeError> {
        let n = self.u32()?;
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(self.str()?);
        }
        Ok(v)
    }
    pub(crate) fn flag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::InvalidValue {
                field,
                value: v.into(),
            }),
        }
    }
    pub(crate) fn str(&mut self) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Utf8)
    }
}

/// Splits a frame into `(kind, body)` after checking its header.
pub(crate) fn open_frame(buf: &[u8]) -> Result<(u16, &[u8]), DecodeError> {
    if buf.len() > MAX_FRAME {
        return Err(DecodeError::TooLarge);
    }
    let mut d = Dec(buf);
    if d.take(4)? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = d.u16()?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version(version));
    }
    let kind = d.u16()?;
    let len = d.u32()? as usize;
    let body = d.take(len)?;
    if !d.0.is_empty() {
        return Err(DecodeError::Trailing);
    }
    Ok((kind, body))
}

pub(crate) fn done(d: Dec<'_>) -> Result<(), DecodeError> {
    if d.0.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Trailing)
    }
}

/// A message type of the protocol.
pub trait Message: Sized {
    /// Encodes the frame.
    fn encode(&self) -> Vec<u8>;
    /// Decodes one complete frame.
    fn decode(buf: &[u8]) -> Result<Self, DecodeError>;
    /// How many descriptors travel with this message.
    fn fd_count(&self) -> usize {
        0
    }
}

//! `Logs(name, lines)`: a module's output, optionally followed.

use serde::{Deserialize, Serialize};

use crate::varlink::ErrorReply;

/// Lines returned when `lines` is not given.
pub const DEFAULT_LINES: u32 = 50;
/// Most lines one call may ask for.
pub const MAX_LINES: u32 = 100_000;

/// Parameters of `Logs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logs {
    /// Module name.
    pub name: String,
    /// How many trailing lines.
    pub lines: Option<u32>,
}

impl Logs {
    pub(crate) fn validated(self) -> Result<Self, ErrorReply> {
        match self.lines {
            Some(n) if n > MAX_LINES => {
                Err(super::invalid_input(format!("lines: at most {MAX_LINES}")))
            }
            _ => Ok(self),
        }
    }

    /// Lines asked for.
    pub fn lines(&self) -> usize {
        self.lines.unwrap_or(DEFAULT_LINES) as usize
    }
}

/// One reply of `Logs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogsReply {
    /// Lines, without their newline.
    pub lines: Vec<String>,
}

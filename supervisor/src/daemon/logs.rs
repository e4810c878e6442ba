//! Reading module logs: the tail, then what is appended.

use std::io::SeekFrom;
use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// How often a followed log is checked for new lines.
pub const POLL: Duration = Duration::from_millis(200);
/// At most this much of the end of a log is read for its tail.
const TAIL_WINDOW: u64 = 1 << 20;
/// At most this much is read per poll.
const CHUNK: u64 = 1 << 20;

/// The last `n` lines and the offset just past them. A missing log (the
/// module has not written yet) is empty.
pub async fn tail(path: &Path, n: usize) -> std::io::Result<(Vec<String>, u64)> {
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(e),
    };
    let len = f.metadata().await?.len();
    let start = len.saturating_sub(TAIL_WINDOW);
    f.seek(SeekFrom::Start(start)).await?;
    let mut bytes = Vec::new();
    f.take(len - start).read_to_end(&mut bytes).await?;
    // Only complete lines; a partial last line is picked up by `read_new`.
    let end = bytes
        .iter()
        .rposition(|&b| b == b'\n')
        .map(|i| i + 1)
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&bytes[..end]);
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    Ok((lines.split_off(skip), start + end as u64))
}

/// What a poll of a followed log found.
#[derive(Debug, PartialEq, Eq)]
pub enum Followed {
    /// Complete lines written since the last poll (maybe none).
    Lines(Vec<String>),
    /// The last lines: the log was removed (the module was uninstalled)
    /// and everything written to it before has been read.
    Ended(Vec<String>),
}

/// Follows a module's log from an offset. The file is kept open, so what
/// was written just before the module was uninstalled (its `stop`'s last
/// words) is still read after the file has been unlinked; the stream ends
/// once that is read.
#[derive(Debug)]
pub struct Follower {
    path: std::path::PathBuf,
    file: Option<tokio::fs::File>,
    offset: u64,
    partial: Vec<u8>,
}

impl Follower {
    /// Follows `path` from `offset` (where [`tail`] stopped).
    pub async fn new(path: &Path, offset: u64) -> Self {
        Self {
            path: path.to_owned(),
            file: tokio::fs::File::open(path).await.ok(),
            offset,
            partial: Vec::new(),
        }
    }

    /// Reads what is new.
    pub async fn poll(&mut self) -> std::io::Result<Followed> {
        use std::os::unix::fs::MetadataExt;
        if self.file.is_none() {
            match tokio::fs::File::open(&self.path).await {
                Ok(f) => self.file = Some(f),
                // Nothing written yet.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.offset == 0 => {
                    return Ok(Followed::Lines(Vec::new()))
                }
                // It existed and is gone.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Ok(Followed::Ended(Vec::new()))
                }
                Err(e) => return Err(e),
            }
        }
        let f = self.file.as_mut().expect("opened above");
        // Unlinked before we read: what we read now is all there will be.
        let meta = f.metadata().await?;
        let (len, removed) = (meta.len(), meta.nlink() == 0);
        if len < self.offset {
            // Truncated: start over.
            self.offset = 0;
            self.partial.clear();
        }
        if len > self.offset {
            f.seek(SeekFrom::Start(self.offset)).await?;
            let mut bytes = Vec::new();
            f.take(CHUNK).read_to_end(&mut bytes).await?;
            self.offset += bytes.len() as u64;
            self.partial.extend_from_slice(&bytes);
        }
        let end = self
            .partial
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let rest = self.partial.split_off(end);
        let mut lines: Vec<String> = String::from_utf8_lossy(&self.partial)
            .lines()
            .map(str::to_owned)
            .collect();
        self.partial = rest;
        if removed && self.offset >= len {
            if !self.partial.is_empty() {
                lines.push(String::from_utf8_lossy(&self.partial).into_owned());
                self.partial.clear();
            }
            return Ok(Followed::Ended(lines));
        }
        Ok(Followed::Lines(lines))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tail_then_follow_to_the_last_line_of_a_removed_log() {
        let path = std::env::temp_dir().join(format!("ember-logs-{}.log", std::process::id()));
        std::fs::write(&path, "a\nb\nc\npart").unwrap();
        let (lines, off) = tail(&path, 2).await.unwrap();
        assert_eq!(lines, ["b", "c"]);
        let mut follow = Follower::new(&path, off).await;
        assert_eq!(follow.poll().await.unwrap(), Followed::Lines(Vec::new()));
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"ial\nd\n").unwrap();
        assert_eq!(
            follow.poll().await.unwrap(),
            Followed::Lines(vec!["partial".into(), "d".into()])
        );
        // Written, then removed before the next poll: still read, then the end.
        f.write_all(b"bye\nno newline").unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            follow.poll().await.unwrap(),
            Followed::Ended(vec!["bye".into(), "no newline".into()])
        );
        let (none, _) = tail(&path, 5).await.unwrap();
        assert!(none.is_empty());
    }
}

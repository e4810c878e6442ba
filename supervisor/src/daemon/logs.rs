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

/// Complete lines written since `offset`; `partial` keeps an unfinished
/// line. Fails once the log is gone (module uninstalled).
pub async fn read_new(
    path: &Path,
    offset: &mut u64,
    partial: &mut Vec<u8>,
) -> std::io::Result<Vec<String>> {
    let mut f = match tokio::fs::File::open(path).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && *offset == 0 => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let len = f.metadata().await?.len();
    if len < *offset {
        // Truncated: start over.
        *offset = 0;
        partial.clear();
    }
    if len == *offset {
        return Ok(Vec::new());
    }
    f.seek(SeekFrom::Start(*offset)).await?;
    let mut bytes = Vec::new();
    f.take(CHUNK).read_to_end(&mut bytes).await?;
    *offset += bytes.len() as u64;
    partial.extend_from_slice(&bytes);
    let Some(end) = partial.iter().rposition(|&b| b == b'\n') else {
        return Ok(Vec::new());
    };
    let rest = partial.split_off(end + 1);
    let text = String::from_utf8_lossy(partial).into_owned();
    *partial = rest;
    Ok(text.lines().map(str::to_owned).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tail_then_follow() {
        let path = std::env::temp_dir().join(format!("ember-logs-{}.log", std::process::id()));
        std::fs::write(&path, "a\nb\nc\npart").unwrap();
        let (lines, mut off) = tail(&path, 2).await.unwrap();
        assert_eq!(lines, ["b", "c"]);
        let mut partial = Vec::new();
        assert!(read_new(&path, &mut off, &mut partial)
            .await
            .unwrap()
            .is_empty());
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"ial\nd\n").unwrap();
        assert_eq!(
            read_new(&path, &mut off, &mut partial).await.unwrap(),
            ["partial", "d"]
        );
        std::fs::remove_file(&path).unwrap();
        assert!(read_new(&path, &mut off, &mut partial).await.is_err());
        let (none, _) = tail(&path, 5).await.unwrap();
        assert!(none.is_empty());
    }
}

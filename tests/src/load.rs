//! A small, bounded HTTP/1.1 load generator over std `TcpStream`, for tests
//! that change a module under its clients and must prove none of them saw
//! a failure.
//!
//! [`Load::start`] runs `clients` threads; each issues GET requests one
//! after another (a new connection per request, `Connection: close`) until
//! [`Load::stop`], or by itself after [`Load::MAX_RUN`] or
//! [`Load::MAX_REQUESTS`] requests per client, whichever comes first. Every
//! request has a hard deadline ([`Load::REQUEST_TIMEOUT`]) for connecting,
//! writing and reading the whole response. Each is recorded: when it
//! started and ended, its path, and its status and body, or why it failed
//! (connect error, reset, a response cut short or malformed, the deadline)
//! — or a status the caller's `accept` rejects.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One request as a client saw it.
#[derive(Debug, Clone)]
pub struct Record {
    /// The client thread that sent it.
    pub client: usize,
    pub started: Instant,
    pub finished: Instant,
    pub path: String,
    /// Status and body, or why the request failed.
    pub outcome: Result<(u16, String), String>,
}

impl Record {
    /// The body of a successful request.
    pub fn body(&self) -> Option<&str> {
        self.outcome.as_ref().ok().map(|(_, b)| b.as_str())
    }
}

/// Picks each request's path: `(client, sequence number)`.
pub type PathFn = dyn Fn(usize, u64) -> String + Send + Sync;
/// Whether a status is acceptable for a path.
pub type AcceptFn = dyn Fn(&str, u16) -> bool + Send + Sync;

/// Load in progress.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Record>>>,
}

/// Every request of a finished load, in the order each client sent them.
#[derive(Debug, Default)]
pub struct Report {
    pub records: Vec<Record>,
}

impl Load {
    /// A request that takes longer than this (connect to last byte) failed.
    pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
    /// A client stops by itself after this long…
    pub const MAX_RUN: Duration = Duration::from_secs(240);
    /// …or after this many requests.
    pub const MAX_REQUESTS: u64 = 500_000;

    /// Starts `clients` threads sending GET `path(client, n)` to `addr`;
    /// a response whose status `accept(path, status)` rejects is a failure.
    pub fn start(
        addr: SocketAddr,
        clients: usize,
        path: Arc<PathFn>,
        accept: Arc<AcceptFn>,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..clients)
            .map(|client| {
                let stop = stop.clone();
                let path = path.clone();
                let accept = accept.clone();
                std::thread::Builder::new()
                    .name(format!("load-{client}"))
                    .spawn(move || {
                        let end = Instant::now() + Self::MAX_RUN;
                        let mut records = Vec::new();
                        let mut n = 0;
                        while !stop.load(Ordering::Relaxed)
                            && n < Self::MAX_REQUESTS
                            && Instant::now() < end
                        {
                            let p = path(client, n);
                            let started = Instant::now();
                            let outcome = get(addr, &p).and_then(|(status, body)| {
                                if accept(&p, status) {
                                    Ok((status, body))
                                } else {
                                    Err(format!("unexpected status {status}: {body}"))
                                }
                            });
                            records.push(Record {
                                client,
                                started,
                                finished: Instant::now(),
                                path: p,
                                outcome,
                            });
                            n += 1;
                        }
                        records
                    })
                    .expect("spawn a load client")
            })
            .collect();
        Load { stop, threads }
    }

    /// `clients` threads sending `GET path` (the same path every time),
    /// accepting only 200.
    pub fn get(addr: SocketAddr, clients: usize, path: &str) -> Self {
        let path = path.to_owned();
        Self::start(
            addr,
            clients,
            Arc::new(move |_, _| path.clone()),
            Arc::new(|_, status| status == 200),
        )
    }

    /// Stops every client (each finishes the request it is sending) and
    /// returns what they saw.
    pub fn stop(mut self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        let mut records = Vec::new();
        for t in std::mem::take(&mut self.threads) {
            records.extend(t.join().expect("a load client panicked"));
        }
        Report { records }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // A test that fails while the load runs still ends its clients.
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Report {
    /// The failed requests.
    pub fn failures(&self) -> Vec<&Record> {
        self.records.iter().filter(|r| r.outcome.is_err()).collect()
    }

    /// Requests that started at or after `t`.
    pub fn started_after(&self, t: Instant) -> impl Iterator<Item = &Record> {
        self.records.iter().filter(move |r| r.started >= t)
    }

    /// Requests that were in flight at some moment of `[from, to]`.
    pub fn overlapping(&self, from: Instant, to: Instant) -> impl Iterator<Item = &Record> {
        self.records
            .iter()
            .filter(move |r| r.finished >= from && r.started <= to)
    }

    /// Fails the test if any request failed, listing the first few (with
    /// the time since the load began).
    pub fn assert_no_failures(&self, what: &str) {
        let failed = self.failures();
        if failed.is_empty() {
            return;
        }
        let t0 = self.records.iter().map(|r| r.started).min().unwrap();
        let listed: Vec<String> = failed
            .iter()
            .take(10)
            .map(|r| {
                format!(
                    "  client {} at {:?} (took {:?}) GET {}: {}",
                    r.client,
                    r.started - t0,
                    r.finished - r.started,
                    r.path,
                    r.outcome.as_ref().unwrap_err()
                )
            })
            .collect();
        panic!(
            "{what}: {} of {} requests failed:\n{}",
            failed.len(),
            self.records.len(),
            listed.join("\n")
        );
    }
}

/// One GET over a new connection, all of it within
/// [`Load::REQUEST_TIMEOUT`]: the status and body, or why not.
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let deadline = Instant::now() + Load::REQUEST_TIMEOUT;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| "timed out".to_owned())
    };
    let mut s = TcpStream::connect_timeout(&addr, left()?).map_err(|e| format!("connect: {e}"))?;
    s.set_write_timeout(Some(left()?))
        .map_err(|e| format!("set timeout: {e}"))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        s.set_read_timeout(Some(left()?))
            .map_err(|e| format!("set timeout: {e}"))?;
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(format!("timed out after {} bytes", buf.len()))
            }
            Err(e) => return Err(format!("read after {} bytes: {e}", buf.len())),
        }
    }
    parse(&buf)
}

/// A whole `Connection: close` response: status line, head, and a body of
/// exactly `Content-Length` bytes.
fn parse(buf: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(buf);
    if buf.is_empty() {
        return Err("connection closed without a response".into());
    }
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(format!("incomplete response head: {text:?}"));
    };
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.split_whitespace();
    let status = match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code,
        _ => return Err(format!("malformed status line: {status_line:?}")),
    };
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>())
        .transpose()
        .map_err(|_| format!("bad Content-Length in {head:?}"))?;
    if let Some(n) = length {
        if body.len() != n {
            return Err(format!(
                "incomplete body: {} of {n} bytes ({body:?})",
                body.len()
            ));
        }
    }
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_whole_responses_and_rejects_cut_ones() {
        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi";
        assert_eq!(parse(ok), Ok((200, "hi".into())));
        assert!(parse(b"").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Len").is_err());
        assert!(parse(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhi").is_err());
        assert!(parse(b"garbage\r\n\r\n").is_err());
    }
}

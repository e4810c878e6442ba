//! A bounded HTTP/1.1 load client over std `TcpStream`, for benchmarks that
//! measure what clients of a module see while it changes under them.
//!
//! [`Load::start`] runs `clients` threads. Even-numbered clients keep one
//! connection alive for as many requests as the server allows (a response
//! with `Connection: close`, or an HTTP/1.0 one without `keep-alive`, ends
//! it); odd-numbered clients open a new connection per request and send
//! `Connection: close`. Each client sends one request every `interval`
//! (closed loop: never more than one in flight) until [`Load::stop`], the
//! `max_duration` or the `max_requests` cap, whichever comes first.
//!
//! Every request is recorded ([`Record`]): when it started, its latency, its
//! route and, if it failed, why ([`Failure`]): connect refused or reset, the
//! connection closed before a full response, a timeout, a malformed
//! response, or a status that is not 2xx (404 is fine for `/kv/get/KEY`, a
//! key nobody put yet). A reused keep-alive connection that fails before
//! any byte of the response arrived (the server closed it while idle) is
//! retried once on a new connection, as browsers and HTTP libraries do; the
//! record says so (`retried`), and a retry that fails is a failure.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Samples;

/// The largest response head accepted.
const MAX_HEAD: usize = 64 * 1024;

/// A response that is not HTTP/1.x as this client understands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The status line is not `HTTP/1.x NNN …`.
    #[error("malformed status line")]
    StatusLine,
    /// A header line has no colon, or the head is not UTF-8.
    #[error("malformed header")]
    Header,
    /// `Content-Length` is not a number, or appears twice with two values.
    #[error("bad Content-Length")]
    Length,
    /// `Transfer-Encoding` other than `identity` (chunked bodies are not
    /// supported: the modules benchmarked send `Content-Length`).
    #[error("unsupported Transfer-Encoding")]
    TransferEncoding,
    /// No end of head within 64 KiB.
    #[error("response head too large")]
    TooLarge,
}

/// One parsed response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Whether the server closes the connection after it
    /// (`Connection: close`, HTTP/1.0 without `keep-alive`, or a body
    /// delimited by the end of the connection).
    pub close: bool,
    /// The body.
    pub body: Vec<u8>,
}

/// Parses the response at the start of `buf`: `Ok(None)` while it is
/// incomplete, else the response and how many bytes of `buf` it took.
/// `eof`: the peer closed the connection, so a body without
/// `Content-Length` ends at the end of `buf`.
pub fn parse_response(buf: &[u8], eof: bool) -> Result<Option<(Response, usize)>, ParseError> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD {
            Err(ParseError::TooLarge)
        } else {
            Ok(None)
        };
    };
    if head_end > MAX_HEAD {
        return Err(ParseError::TooLarge);
    }
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| ParseError::Header)?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(ParseError::StatusLine),
    };
    let status: u16 = parts
        .next()
        .filter(|s| s.len() == 3)
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..600).contains(s))
        .ok_or(ParseError::StatusLine)?;
    let mut length: Option<usize> = None;
    let mut close = http10;
    for line in lines {
        let (name, value) = line.split_once(':').ok_or(ParseError::Header)?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value.parse().map_err(|_| ParseError::Length)?;
            if length.is_some_and(|l| l != n) {
                return Err(ParseError::Length);
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                    close = false;
                }
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && !value.eq_ignore_ascii_case("identity")
        {
            return Err(ParseError::TransferEncoding);
        }
    }
    let body_start = head_end + 4;
    let no_body = (100..200).contains(&status) || status == 204 || status == 304;
    match (no_body, length) {
        (true, _) => Ok(Some((
            Response {
                status,
                close,
                body: Vec::new(),
            },
            body_start,
        ))),
        (false, Some(n)) if buf.len() >= body_start + n => Ok(Some((
            Response {
                status,
                close,
                body: buf[body_start..body_start + n].to_vec(),
            },
            body_start + n,
        ))),
        (false, Some(_)) => Ok(None),
        // Delimited by the end of the connection.
        (false, None) if eof => Ok(Some((
            Response {
                status,
                close: true,
                body: buf[body_start..].to_vec(),
            },
            buf.len(),
        ))),
        (false, None) => Ok(None),
    }
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The connection could not be made (refused, reset, …).
    Connect,
    /// Writing the request or reading the response failed with an error
    /// other than a timeout (e.g. reset by peer).
    Io,
    /// The connection closed before a full response.
    Eof,
    /// No full response within the timeout.
    Timeout,
    /// The response is not valid HTTP/1.x.
    Malformed,
    /// The response's status is not a success.
    Status(u16),
}

impl Failure {
    /// A short name, for reports.
    pub fn name(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Io => "io",
            Failure::Eof => "eof",
            Failure::Timeout => "timeout",
            Failure::Malformed => "malformed",
            Failure::Status(_) => "status",
        }
    }
}

/// What a request asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/hello/NAME`.
    Hello,
    /// `/kv/get/KEY`: a kv service call through the module.
    KvGet,
    /// `/kv/put/KEY/VALUE`: a kv service call through the module.
    KvPut,
}

impl Route {
    /// Whether the request makes the module call the kv service.
    pub fn is_kv(self) -> bool {
        matches!(self, Route::KvGet | Route::KvPut)
    }
}

/// Which routes the clients request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mix {
    /// Of every 5 requests, 3 `/hello/…`, 1 `/kv/put/…`, 1 `/kv/get/…`.
    HelloAndKv,
    /// Only `/hello/…`.
    HelloOnly,
}

impl Mix {
    /// The route and path of a client's `n`-th request.
    pub fn request(self, client: usize, n: u64) -> (Route, String) {
        let key = format!("c{client}k{}", n % 16);
        match (self, n % 5) {
            (Mix::HelloAndKv, 3) => (Route::KvPut, format!("/kv/put/{key}/v{n}")),
            (Mix::HelloAndKv, 4) => (Route::KvGet, format!("/kv/get/{key}")),
            _ => (Route::Hello, format!("/hello/c{client}")),
        }
    }
}

/// One request, as a client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// When it started (before connecting, if it had to), since
    /// [`Load::t0`].
    pub start: Duration,
    /// Until the full response (or the failure), retry included.
    pub latency: Duration,
    /// Its route.
    pub route: Route,
    /// Why it failed, if it did.
    pub failure: Option<Failure>,
    /// Whether it was retried on a new connection after its reused
    /// keep-alive connection failed before any response byte.
    pub retried: bool,
    /// Whether the client keeps connections alive.
    pub keep_alive: bool,
}

impl Record {
    /// When it ended, since [`Load::t0`].
    pub fn end(&self) -> Duration {
        self.start + self.latency
    }

    /// Whether it overlaps any of `windows` (`(from, to)` since
    /// [`Load::t0`]).
    pub fn overlaps(&self, windows: &[(Duration, Duration)]) -> bool {
        windows
            .iter()
            .any(|&(from, to)| self.start <= to && self.end() >= from)
    }
}

/// How to load the server.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// The server.
    pub addr: SocketAddr,
    /// Concurrent clients (half keep-alive, half a connection per request).
    pub clients: usize,
    /// Each client starts a request at most this often.
    pub interval: Duration,
    /// A request without a full response after this long failed.
    pub timeout: Duration,
    /// Hard cap on the load's duration.
    pub max_duration: Duration,
    /// Hard cap on requests, over all clients.
    pub max_requests: u64,
    /// Routes to request.
    pub mix: Mix,
}

/// Load running in background threads; stopped (and joined) on
/// [`Load::stop`] or drop.
#[derive(Debug)]
pub struct Load {
    t0: Instant,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Vec<Record>>>,
}

impl Load {
    /// Starts the clients.
    pub fn start(cfg: &LoadConfig) -> Self {
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let issued = Arc::new(AtomicU64::new(0));
        let threads = (0..cfg.clients)
            .map(|i| {
                let cfg = cfg.clone();
                let stop = stop.clone();
                let issued = issued.clone();
                std::thread::Builder::new()
                    .name(format!("http-client-{i}"))
                    .spawn(move || client(i, &cfg, t0, &stop, &issued))
                    .expect("spawn an HTTP client thread")
            })
            .collect();
        Self { t0, stop, threads }
    }

    /// When the load started: [`Record::start`] counts from here.
    pub fn t0(&self) -> Instant {
        self.t0
    }

    /// Stops the clients and returns every request, in start order.
    pub fn stop(mut self) -> Vec<Record> {
        self.finish()
    }

    fn finish(&mut self) -> Vec<Record> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all: Vec<Record> = self
            .threads
            .drain(..)
            .flat_map(|t| t.join().expect("HTTP client thread panicked"))
            .collect();
        all.sort_by_key(|r| r.start);
        all
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.finish();
    }
}

fn client(
    i: usize,
    cfg: &LoadConfig,
    t0: Instant,
    stop: &AtomicBool,
    issued: &AtomicU64,
) -> Vec<Record> {
    let keep_alive = i % 2 == 0;
    let deadline = t0 + cfg.max_duration;
    let mut conn: Option<Conn> = None;
    let mut out = Vec::new();
    // Spread the clients' first requests over one interval.
    std::thread::sleep(cfg.interval * i as u32 / cfg.clients.max(1) as u32);
    let mut n = 0u64;
    loop {
        let start = Instant::now();
        if stop.load(Ordering::Relaxed)
            || start >= deadline
            || issued.fetch_add(1, Ordering::Relaxed) >= cfg.max_requests
        {
            break;
        }
        let (route, path) = cfg.mix.request(i, n);
        n += 1;
        let reused = conn.is_some();
        let mut result = attempt(&mut conn, cfg, &path, keep_alive, start);
        let mut retried = false;
        if let Err((_, false)) = result {
            if reused {
                retried = true;
                result = attempt(&mut conn, cfg, &path, keep_alive, Instant::now());
            }
        }
        let latency = start.elapsed();
        let failure = match result {
            Ok(status) if (200..300).contains(&status) => None,
            Ok(404) if route == Route::KvGet => None,
            Ok(status) => Some(Failure::Status(status)),
            Err((f, _)) => Some(f),
        };
        out.push(Record {
            start: start - t0,
            latency,
            route,
            failure,
            retried,
            keep_alive,
        });
        let next = start + cfg.interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
    }
    out
}

/// A connection and the bytes read from it but not consumed yet.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// One request on `conn` (connecting first if there is none): the status,
/// or the failure and whether any byte of a response had arrived. Leaves
/// `conn` open only if the server keeps it alive and `keep_alive`.
fn attempt(
    conn: &mut Option<Conn>,
    cfg: &LoadConfig,
    path: &str,
    keep_alive: bool,
    start: Instant,
) -> Result<u16, (Failure, bool)> {
    let deadline = start + cfg.timeout;
    let mut c = match conn.take() {
        Some(c) => c,
        None => {
            let stream = TcpStream::connect_timeout(&cfg.addr, cfg.timeout).map_err(|e| {
                let f = if is_timeout(&e) {
                    Failure::Timeout
                } else {
                    Failure::Connect
                };
                (f, false)
            })?;
            let _ = stream.set_nodelay(true);
            Conn {
                stream,
                buf: Vec::with_capacity(1024),
            }
        }
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ember-bench\r\n{}\r\n",
        cfg.addr,
        if keep_alive {
            ""
        } else {
            "Connection: close\r\n"
        }
    );
    let io = |e: std::io::Error, got: bool| {
        let f = if is_timeout(&e) {
            Failure::Timeout
        } else {
            Failure::Io
        };
        (f, got)
    };
    let _ = c
        .stream
        .set_write_timeout(Some(cfg.timeout.max(Duration::from_millis(1))));
    c.stream
        .write_all(req.as_bytes())
        .map_err(|e| io(e, false))?;
    // Bytes left over from an earlier response are a protocol error the
    // server made, not part of this response.
    c.buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        match parse_response(&c.buf, false) {
            Ok(Some((resp, used))) => {
                c.buf.drain(..used);
                if keep_alive && !resp.close {
                    *conn = Some(c);
                }
                return Ok(resp.status);
            }
            Ok(None) => {}
            Err(_) => return Err((Failure::Malformed, true)),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err((Failure::Timeout, !c.buf.is_empty()));
        }
        let _ = c.stream.set_read_timeout(Some(left));
        match c.stream.read(&mut chunk) {
            Ok(0) => {
                return match parse_response(&c.buf, true) {
                    Ok(Some((resp, _))) => Ok(resp.status),
                    Ok(None) => Err((Failure::Eof, !c.buf.is_empty())),
                    Err(_) => Err((Failure::Malformed, true)),
                };
            }
            Ok(k) => c.buf.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                let got = !c.buf.is_empty();
                return Err(io(e, got));
            }
        }
    }
}

/// One `GET path` on a new connection (`Connection: close`): the full
/// response, or why there is none.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Response, Failure> {
    let start = Instant::now();
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| {
        if is_timeout(&e) {
            Failure::Timeout
        } else {
            Failure::Connect
        }
    })?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|_| Failure::Io)?;
    stream.write_all(req.as_bytes()).map_err(|_| Failure::Io)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = (start + timeout).saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::Timeout);
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|_| Failure::Io)?;
        let eof = match stream.read(&mut chunk) {
            Ok(0) => true,
            Ok(k) => {
                buf.extend_from_slice(&chunk[..k]);
                false
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if is_timeout(&e) => return Err(Failure::Timeout),
            Err(_) => return Err(Failure::Io),
        };
        match parse_response(&buf, eof) {
            Ok(Some((r, _))) => return Ok(r),
            Ok(None) if eof => return Err(Failure::Eof),
            Ok(None) => {}
            Err(_) => return Err(Failure::Malformed),
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Counts and latencies of a set of requests.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub failed: u64,
    /// Requests retried on a new connection (whether or not the retry
    /// succeeded).
    pub retried: u64,
    /// Latencies of the requests that did not fail.
    pub latency: Samples,
    /// The failures, by [`Failure::name`] (and status code).
    pub failures: std::collections::BTreeMap<String, u64>,
}

impl Summary {
    /// Summarizes the `records` that `keep` selects.
    pub fn of<'a>(
        records: impl IntoIterator<Item = &'a Record>,
        keep: impl Fn(&Record) -> bool,
    ) -> Self {
        let mut s = Summary::default();
        for r in records.into_iter().filter(|r| keep(r)) {
            s.requests += 1;
            s.retried += u64::from(r.retried);
            match r.failure {
                None => s.latency.push(r.latency),
                Some(f) => {
                    s.failed += 1;
                    let key = match f {
                        Failure::Status(c) => format!("status {c}"),
                        f => f.name().to_owned(),
                    };
                    *s.failures.entry(key).or_default() += 1;
                }
            }
        }
        s
    }

    /// The `p`-th percentile latency of the successful requests, in
    /// milliseconds (0 when there are none).
    pub fn p_ms(&mut self, p: f64) -> f64 {
        if self.latency.is_empty() {
            0.0
        } else {
            crate::ms(self.latency.percentile(p))
        }
    }

    /// The failures as `kind=count, …` (or `none`).
    pub fn failures_text(&self) -> String {
        if self.failures.is_empty() {
            return "none".into();
        }
        self.failures
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn parse(s: &str, eof: bool) -> Result<Option<(Response, usize)>, ParseError> {
        parse_response(s.as_bytes(), eof)
    }

    #[test]
    fn parses_a_keep_alive_response_with_length() {
        let text = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\ncontent-length: 5\r\n\r\nhello";
        let (r, used) = parse(text, false).unwrap().unwrap();
        assert_eq!(
            (r.status, r.close, &r.body[..], used),
            (200, false, &b"hello"[..], text.len())
        );
    }

    #[test]
    fn waits_for_the_whole_head_and_body() {
        assert_eq!(parse("HTTP/1.1 200 OK\r\nContent-Len", false), Ok(None));
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", false),
            Ok(None)
        );
        // The connection closed mid-body: still incomplete (the caller
        // reports it as an EOF before a full response).
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", true),
            Ok(None)
        );
    }

    #[test]
    fn honours_connection_close_and_http10() {
        let (r, _) = parse(
            "HTTP/1.1 503 Error\r\nConnection: Close\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((r.status, r.close), (503, true));
        let (r, _) = parse(
            "HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(r.close);
        let (r, _) = parse("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(r.close, "HTTP/1.0 closes by default");
        let (r, _) = parse(
            "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!r.close);
    }

    #[test]
    fn a_body_without_length_ends_with_the_connection() {
        let text = "HTTP/1.1 200 OK\r\n\r\nuntil eof";
        assert_eq!(parse(text, false), Ok(None));
        let (r, used) = parse(text, true).unwrap().unwrap();
        assert_eq!(
            (&r.body[..], r.close, used),
            (&b"until eof"[..], true, text.len())
        );
        let (r, _) = parse("HTTP/1.1 204 No Content\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(r.body.is_empty());
    }

    #[test]
    fn takes_one_response_of_several() {
        let text = "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\naHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
        let (r, used) = parse(text, false).unwrap().unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"a"[..]));
        let (r, _) = parse(&text[used..], false).unwrap().unwrap();
        assert_eq!(r.status, 404);
    }

    #[test]
    fn rejects_what_it_does_not_understand() {
        assert_eq!(
            parse("HTTP/2 200\r\n\r\n", false),
            Err(ParseError::StatusLine)
        );
        assert_eq!(
            parse("HTTP/1.1 2000 OK\r\n\r\n", false),
            Err(ParseError::StatusLine)
        );
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nbad header\r\n\r\n", false),
            Err(ParseError::Header)
        );
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false),
            Err(ParseError::Length)
        );
        assert_eq!(
            parse(
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false
            ),
            Err(ParseError::Length)
        );
        assert_eq!(
            parse(
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            ),
            Err(ParseError::TransferEncoding)
        );
        let big = format!("HTTP/1.1 200 OK\r\nX: {}", "a".repeat(MAX_HEAD + 1));
        assert_eq!(parse(&big, false), Err(ParseError::TooLarge));
    }

    #[test]
    fn windows_overlap() {
        let r = Record {
            start: Duration::from_millis(10),
            latency: Duration::from_millis(5),
            route: Route::Hello,
            failure: None,
            retried: false,
            keep_alive: true,
        };
        let ms = Duration::from_millis;
        assert!(r.overlaps(&[(ms(0), ms(10))]));
        assert!(r.overlaps(&[(ms(15), ms(20))]));
        assert!(r.overlaps(&[(ms(11), ms(12))]));
        assert!(!r.overlaps(&[(ms(0), ms(9)), (ms(16), ms(30))]));
    }

    /// A keep-alive server that serves `per_conn` responses per connection
    /// and then closes it without answering the next request (an idle
    /// close racing the client), once with `Connection: close`, and
    /// answers `/kv/get/…` with 404 and `/fail` with 503.
    fn server(l: TcpListener, per_conn: usize) {
        while let Ok((s, _)) = l.accept() {
            std::thread::spawn(move || connection(s, per_conn));
        }
    }

    fn connection(mut s: TcpStream, per_conn: usize) {
        {
            let mut buf = Vec::new();
            let mut served = 0;
            let mut chunk = [0u8; 1024];
            loop {
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    if served == per_conn {
                        break;
                    }
                    served += 1;
                    let path = head.split(' ').nth(1).unwrap_or("");
                    let status = if path.starts_with("/kv/get/") {
                        "404 Not Found"
                    } else if path == "/fail" {
                        "503 Error"
                    } else {
                        "200 OK"
                    };
                    let close = head.contains("Connection: close");
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Length: 2\r\n{}\r\nok",
                        if close { "Connection: close\r\n" } else { "" }
                    );
                    s.write_all(resp.as_bytes()).unwrap();
                    if close {
                        served = per_conn;
                    }
                }
                if served == per_conn {
                    break;
                }
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(k) => buf.extend_from_slice(&chunk[..k]),
                }
            }
        }
    }

    #[test]
    fn keep_alive_reuses_and_retries_once_on_a_new_connection() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || server(l, 3));
        let cfg = LoadConfig {
            addr,
            clients: 1,
            interval: Duration::ZERO,
            timeout: Duration::from_secs(5),
            max_duration: Duration::from_secs(10),
            max_requests: 7,
            mix: Mix::HelloAndKv,
        };
        let mut conn = None;
        let mut statuses = Vec::new();
        let mut retries = 0;
        for n in 0..7 {
            let (_, path) = cfg.mix.request(0, n);
            let reused = conn.is_some();
            let mut r = attempt(&mut conn, &cfg, &path, true, Instant::now());
            if let (Err((_, false)), true) = (r, reused) {
                retries += 1;
                r = attempt(&mut conn, &cfg, &path, true, Instant::now());
            }
            statuses.push(r.unwrap());
        }
        // 3 per connection: requests 4 and 7 found their connection closed
        // and were retried on a new one.
        assert_eq!(statuses, [200, 200, 200, 200, 404, 200, 200]);
        assert_eq!(retries, 2);
    }

    #[test]
    fn load_counts_failures_and_stops_at_the_cap() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || server(l, 1000));
        let cfg = LoadConfig {
            addr,
            clients: 2,
            interval: Duration::from_millis(1),
            timeout: Duration::from_secs(5),
            max_duration: Duration::from_secs(10),
            max_requests: 40,
            mix: Mix::HelloAndKv,
        };
        let records = Load::start(&cfg).stop_after_cap();
        assert_eq!(records.len(), 40);
        assert!(records.iter().all(|r| !r.retried));
        let s = Summary::of(&records, |_| true);
        assert_eq!(s.requests, 40);
        assert_eq!(s.failed, 0, "{}", s.failures_text());
        assert!(records.iter().any(|r| r.route == Route::KvGet));
        let addr_closed = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let cfg = LoadConfig {
            addr: addr_closed,
            max_requests: 4,
            ..cfg
        };
        let records = Load::start(&cfg).stop_after_cap();
        let s = Summary::of(&records, |_| true);
        assert_eq!((s.requests, s.failed), (4, 4));
        assert_eq!(s.failures_text(), "connect=4");
    }

    impl Load {
        /// Waits until every client has stopped by itself.
        fn stop_after_cap(mut self) -> Vec<Record> {
            let mut all: Vec<Record> = self
                .threads
                .drain(..)
                .flat_map(|t| t.join().unwrap())
                .collect();
            all.sort_by_key(|r| r.start);
            all
        }
    }
}

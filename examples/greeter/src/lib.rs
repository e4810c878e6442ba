//! The greeter module: an async (tokio) module serving HTTP/1.1 on a
//! listener handed in by the supervisor, calling the `kv` service over
//! shm-ipc and the `catalog` plugin in-process.
//!
//! Routes (GET only; connections are kept alive unless the client sends
//! `Connection: close` or speaks HTTP/1.0):
//! - `/hello/<name>`: a greeting naming this instance;
//! - `/version`: `<version> <identity>`, e.g. `0.1.0 greeter@0.1.0#0`;
//! - `/catalog/<id>`: the catalog entry (plugin call, no IPC);
//! - `/catalog/sum`: the sum of every entry's price (reads the whole table);
//! - `/kv/put/<key>/<value>`, `/kv/get/<key>`: calls to the kv service;
//! - `/stats`: catalog size, the pid that initialized the catalog, own pid.
//!
//! On shutdown it drains: it stops accepting (the listening socket is
//! shared with the other replicas and revisions, which go on accepting from
//! the same queue), lets every request in flight finish, answers a further
//! request on a kept-alive connection with `Connection: close`, closes idle
//! connections after a grace (half the stop time left, at most 1 s), and
//! returns from `serve` only when every connection is closed.

use std::sync::Arc;
use std::time::Duration;

use example_schema::{ArchivedKvResponse, CatalogTable, KvRequest, KvResponse, KV_SERVICE};
use module_runtime::service::{AsyncServiceClient, Retry, ServiceError};
use module_runtime::{export_module, tracing, AsyncModule, ModuleContext, ModuleError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

type KvClient = AsyncServiceClient<KvRequest, KvResponse>;

/// How long a kv call may take, waiting for a kv end included.
const KV_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head.
const MAX_HEAD: usize = 8192;

struct State {
    greeting: String,
    identity: String,
    version: String,
    catalog: Option<&'static CatalogTable>,
    /// Follows the kv exporter: holds a channel to every ready kv replica
    /// and adopts each new one the supervisor attaches (kv scaled,
    /// restarted or released). Shared by every connection without a lock:
    /// concurrent calls go out on different channels. kv's requests are
    /// idempotent (get, put of a value, delete), so a call whose kv went
    /// away unanswered is repeated on another channel.
    kv: KvClient,
}

/// The greeter module.
pub struct Greeter {
    listener: Option<TcpListener>,
    state: Arc<State>,
}

impl AsyncModule for Greeter {
    async fn start(ctx: &ModuleContext) -> Result<Self, ModuleError> {
        let std_listener = ctx.tcp_listener("http")?;
        std_listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std_listener)?;
        let catalog = match ctx.plugin::<CatalogTable>() {
            Ok(t) => {
                tracing::info!(entries = t.len(), "catalog plugin found");
                Some(t)
            }
            Err(e) => {
                tracing::warn!("running without the catalog: {e}");
                None
            }
        };
        let kv = ctx
            .import_async::<KvRequest, KvResponse>(KV_SERVICE)?
            .with_retry(Retry::Idempotent);
        if !kv.is_connected() {
            tracing::info!("kv not wired yet");
        }
        let greeting = ctx
            .config()
            .get("greeting")
            .and_then(|v| v.as_str())
            .unwrap_or("hello")
            .to_owned();
        let state = Arc::new(State {
            greeting,
            identity: ctx.identity().to_string(),
            version: ctx.version().to_owned(),
            catalog,
            kv,
        });
        Ok(Greeter {
            listener: Some(listener),
            state,
        })
    }

    async fn serve(&mut self, ctx: &ModuleContext) -> Result<(), ModuleError> {
        ctx.ready();
        let shutdown = ctx.shutdown();
        let Some(listener) = self.listener.take() else {
            return Ok(());
        };
        // `Some(grace)` once draining: how long an idle connection is kept.
        let (drain_tx, drain_rx) = watch::channel(None::<Duration>);
        let mut conns = JoinSet::new();
        {
            let stop = shutdown.requested();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    accepted = listener.accept() => {
                        let stream = match accepted {
                            Ok((stream, _)) => stream,
                            Err(e) => {
                                tracing::warn!("accept failed: {e}");
                                continue;
                            }
                        };
                        let state = self.state.clone();
                        let drain = drain_rx.clone();
                        conns.spawn(async move {
                            if let Err(e) = handle(stream, &state, drain).await {
                                tracing::debug!("connection failed: {e}");
                            }
                        });
                        // Reap finished connections as we go.
                        while conns.try_join_next().is_some() {}
                    }
                }
            }
        }
        // Stop accepting; the queue stays with the other workers sharing
        // the socket (dropping our descriptor does not close it for them).
        drop(listener);
        let remaining = shutdown.remaining().unwrap_or(Duration::from_secs(2));
        let grace = (remaining / 2).min(Duration::from_secs(1));
        let budget = remaining.saturating_sub((remaining / 4).min(Duration::from_millis(250)));
        tracing::info!(
            connections = conns.len(),
            "greeter draining (idle connections closed after {grace:?})"
        );
        let _ = drain_tx.send(Some(grace));
        let all_closed = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(budget, all_closed).await.is_err() {
            tracing::warn!(
                connections = conns.len(),
                "stop deadline near: dropping the connections still open"
            );
            conns.abort_all();
            while conns.join_next().await.is_some() {}
        }
        tracing::info!("greeter drained");
        Ok(())
    }
}

async fn route(path: &str, state: &State) -> (u16, String) {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match parts.as_slice() {
        ["hello", name] => (
            200,
            format!("{}, {name}! (from {})", state.greeting, state.identity),
        ),
        ["catalog", "sum"] => match state.catalog {
            // Reads every entry, in place: the whole shared table becomes
            // resident in this worker (and stays shared with the others).
            Some(c) => {
                let n = c.len();
                (
                    200,
                    format!(
                        "price_sum={} entries={n} pid={}",
                        c.price_sum(0, n),
                        std::process::id()
                    ),
                )
            }
            None => (503, "catalog plugin not loaded".into()),
        },
        ["catalog", id] => match (state.catalog, id.parse::<u64>()) {
            (Some(c), Ok(id)) => match c.get(id) {
                Some(e) => (200, format!("{} {} {}", e.id, e.name(), e.price_cents)),
                None => (404, "no such item".into()),
            },
            (None, _) => (503, "catalog plugin not loaded".into()),
            (_, Err(_)) => (400, "bad id".into()),
        },
        ["kv", "put", key, value] => {
            kv_call(
                state,
                KvRequest::Put {
                    key: (*key).into(),
                    value: (*value).into(),
                },
            )
            .await
        }
        ["kv", "get", key] => kv_call(state, KvRequest::Get { key: (*key).into() }).await,
        ["version"] => (200, format!("{} {}", state.version, state.identity)),
        ["stats"] => {
            let n = state.catalog.map_or(0, |c| c.len());
            let init = state.catalog.map_or(0, |c| c.init_pid());
            let pid = std::process::id();
            (
                200,
                format!("catalog_entries={n} catalog_init_pid={init} pid={pid}"),
            )
        }
        ["listen-fds"] => {
            // Socket activation as the worker set it up (fd 3 onwards).
            let var = |k: &str| std::env::var(k).unwrap_or_else(|_| "-".into());
            let pid_matches = var("LISTEN_PID") == std::process::id().to_string();
            (
                200,
                format!(
                    "LISTEN_FDS={} LISTEN_FDNAMES={} LISTEN_PID_is_self={pid_matches}",
                    var("LISTEN_FDS"),
                    var("LISTEN_FDNAMES")
                ),
            )
        }
        _ => (404, "not found".into()),
    }
}

async fn kv_call(state: &State, req: KvRequest) -> (u16, String) {
    // The reply is read in place, in a buffer the client lends it
    // (validated, not deserialized).
    let reply = state.kv.call_timeout(&req, KV_TIMEOUT).await;
    match reply.as_deref() {
        Ok(ArchivedKvResponse::Value(v)) => match v.as_ref() {
            Some(v) => (200, v.to_string()),
            None => (404, "no such key".into()),
        },
        Ok(ArchivedKvResponse::Done) => (200, "ok".into()),
        Ok(ArchivedKvResponse::Error(e)) => (400, e.to_string()),
        Err(ServiceError::NoEnd { .. }) => (503, "kv not imported".into()),
        Err(e) if e.is_timeout() => (504, "kv timed out".into()),
        Err(e) => (
            502,
            format!("kv failed: {}", module_runtime::error_chain(e)),
        ),
    }
}

/// One parsed request head.
struct Head {
    /// Bytes the head took in the buffer.
    len: usize,
    method: String,
    path: String,
    /// The client lets the connection stay open after the reply.
    keep_alive: bool,
}

fn parse_head(buf: &[u8]) -> Option<Head> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = String::from_utf8_lossy(&buf[..end]);
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_owned();
    let path = first.next().unwrap_or("").to_owned();
    let version = first.next().unwrap_or("");
    let mut keep_alive = version == "HTTP/1.1";
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("connection")
            && value
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("close"))
        {
            keep_alive = false;
        }
        // A body we do not read: answer, then close.
        let has_body = (name.eq_ignore_ascii_case("content-length") && value.trim() != "0")
            || name.eq_ignore_ascii_case("transfer-encoding");
        if has_body {
            keep_alive = false;
        }
    }
    Some(Head {
        len: end,
        method,
        path,
        keep_alive,
    })
}

/// Serves the requests of one connection until either side closes it.
async fn handle(
    mut stream: TcpStream,
    state: &State,
    mut drain: watch::Receiver<Option<Duration>>,
) -> std::io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = vec![0u8; 4096];
    loop {
        // Wait for a whole request head.
        let head = loop {
            if let Some(h) = parse_head(&buf) {
                break h;
            }
            if buf.len() >= MAX_HEAD {
                return stream
                    .write_all(
                        b"HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await;
            }
            let grace = *drain.borrow_and_update();
            let n = match grace {
                None => tokio::select! {
                    r = stream.read(&mut chunk) => r?,
                    changed = drain.changed() => {
                        if changed.is_err() {
                            return Ok(());
                        }
                        continue;
                    }
                },
                // Draining: a connection that stays idle for the grace is
                // closed.
                Some(grace) => match tokio::time::timeout(grace, stream.read(&mut chunk)).await {
                    Ok(r) => r?,
                    Err(_) => return Ok(()),
                },
            };
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        buf.drain(..head.len);
        let (status, body) = match head.method.as_str() {
            "GET" => route(&head.path, state).await,
            _ => (405, "only GET".into()),
        };
        // Draining: this is the connection's last reply.
        let keep_alive = head.keep_alive && head.method == "GET" && drain.borrow().is_none();
        let reason = match status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let resp = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(resp.as_bytes()).await?;
        if !keep_alive {
            return stream.shutdown().await;
        }
    }
}

export_module!(async Greeter);

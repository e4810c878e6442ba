//! The greeter module: an async (tokio) module serving HTTP on a listener
//! handed in by the supervisor, calling the `kv` service over shm-ipc and
//! the `catalog` plugin in-process.
//!
//! Routes (GET only, one request per connection):
//! - `/hello/<name>`: a greeting naming this instance;
//! - `/catalog/<id>`: the catalog entry (plugin call, no IPC);
//! - `/catalog/sum`: the sum of every entry's price (reads the whole table);
//! - `/kv/put/<key>/<value>`, `/kv/get/<key>`: calls to the kv service;
//! - `/stats`: catalog size, the pid that initialized the catalog, own pid.

use std::sync::Arc;

use example_schema::{CatalogTable, KvRequest, KvResponse, KV_SERVICE};
use module_runtime::sdk::Attachments;
use module_runtime::service::AsyncServiceClient;
use module_runtime::{export_module, tracing, AsyncModule, ModuleContext, ModuleError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type KvClient = AsyncServiceClient<KvRequest, KvResponse>;

struct State {
    greeting: String,
    identity: String,
    catalog: Option<&'static CatalogTable>,
    /// The kv client; replaced when the supervisor attaches a newer client
    /// end (kv came up after us, or restarted).
    kv: tokio::sync::Mutex<Option<KvClient>>,
    attachments: Attachments,
}

/// The greeter module.
pub struct Greeter {
    listener: TcpListener,
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
        let attachments = ctx.attachments();
        let kv = match attachments.take_latest_import(KV_SERVICE) {
            Ok(fds) => Some(KvClient::open(fds)?),
            Err(e) => {
                tracing::info!("kv not wired yet: {e}");
                None
            }
        };
        let greeting = ctx
            .config()
            .get("greeting")
            .and_then(|v| v.as_str())
            .unwrap_or("hello")
            .to_owned();
        let state = Arc::new(State {
            greeting,
            identity: ctx.identity().to_string(),
            catalog,
            kv: tokio::sync::Mutex::new(kv),
            attachments,
        });
        Ok(Greeter { listener, state })
    }

    async fn serve(&mut self, ctx: &ModuleContext) -> Result<(), ModuleError> {
        ctx.ready();
        let shutdown = ctx.shutdown();
        let stop = shutdown.requested();
        tokio::pin!(stop);
        // Connections being served: awaited once a stop is requested, so
        // that a replica that drains answers what it accepted (the runtime
        // would drop them unfinished when `serve` returns).
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = self.listener.accept() => {
                    let (stream, _) = accepted?;
                    let state = self.state.clone();
                    while in_flight.try_join_next().is_some() {}
                    in_flight.spawn(async move {
                        if let Err(e) = handle(stream, &state).await {
                            tracing::debug!("connection failed: {e}");
                        }
                    });
                }
            }
        }
        tracing::info!(connections = in_flight.len(), "greeter draining");
        while in_flight.join_next().await.is_some() {}
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
    let mut slot = state.kv.lock().await;
    // A newer client end means kv (re)started: switch to it.
    if let Ok(fds) = state.attachments.take_latest_import(KV_SERVICE) {
        match KvClient::open(fds) {
            Ok(c) => *slot = Some(c),
            Err(e) => tracing::warn!("cannot open the new kv channel: {e}"),
        }
    }
    let Some(client) = slot.as_mut() else {
        return (503, "kv not imported".into());
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), client.call(&req)).await {
        Ok(Ok(KvResponse::Value(Some(v)))) => (200, v),
        Ok(Ok(KvResponse::Value(None))) => (404, "no such key".into()),
        Ok(Ok(KvResponse::Done)) => (200, "ok".into()),
        Ok(Ok(KvResponse::Error(e))) => (400, e),
        Ok(Err(e)) => (502, format!("kv failed: {e}")),
        Err(_) => (504, "kv timed out".into()),
    }
}

async fn handle(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        if n == buf.len() {
            return stream
                .write_all(
                    b"HTTP/1.1 431 Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
        }
        let k = stream.read(&mut buf[n..]).await?;
        if k == 0 {
            return Ok(());
        }
        n += k;
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut line = head.lines().next().unwrap_or("").split_whitespace();
    let (status, body) = match (line.next(), line.next()) {
        (Some("GET"), Some(path)) => route(path, state).await,
        _ => (405, "only GET".into()),
    };
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Error",
    };
    let resp = format!("HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

export_module!(async Greeter);

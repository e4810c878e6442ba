//! The kv module: exports the `kv` service (rkyv messages from
//! `example-schema`) over shm-ipc, serving every importing client's channel
//! from one thread, including channels attached after launch.

use std::collections::HashMap;

use example_schema::{ArchivedKvRequest, KvRequest, KvResponse, KV_SERVICE};
use module_runtime::service::ServiceServer;
use module_runtime::{export_module, tracing, Module, ModuleContext, ModuleError};

/// The kv module.
pub struct Kv {
    server: ServiceServer<KvRequest, KvResponse>,
    map: HashMap<String, String>,
    max_value: usize,
}

impl Module for Kv {
    fn start(ctx: &ModuleContext) -> Result<Self, ModuleError> {
        let server = ServiceServer::new();
        let max_value = ctx
            .config()
            .get("max_value_bytes")
            .and_then(|v| v.as_integer())
            .unwrap_or(1024) as usize;
        tracing::info!(replica = ctx.replica(), "kv starting");
        Ok(Kv {
            server,
            map: HashMap::new(),
            max_value,
        })
    }

    fn serve(&mut self, ctx: &ModuleContext) -> Result<(), ModuleError> {
        ctx.ready();
        let map = &mut self.map;
        let max = self.max_value;
        // Serves the server ends granted at launch and those attached later
        // (one per importing instance). On shutdown it drains: it goes on
        // serving until every importer has moved to the new kv (dropping
        // its old end), or no request came for a moment, or the stop
        // deadline is near.
        //
        // The handler reads each request in place, validated, as its
        // archived form (no deserialization); the response is serialized
        // straight into the reply slot.
        self.server.serve_export(ctx, KV_SERVICE, |req| match req {
            ArchivedKvRequest::Get { key } => KvResponse::Value(map.get(key.as_str()).cloned()),
            ArchivedKvRequest::Put { value, .. } if value.len() > max => {
                KvResponse::Error(format!("value longer than {max} bytes"))
            }
            ArchivedKvRequest::Put { key, value } => {
                map.insert(key.to_string(), value.to_string());
                KvResponse::Done
            }
            ArchivedKvRequest::Delete { key } => {
                map.remove(key.as_str());
                KvResponse::Done
            }
        })?;
        Ok(())
    }

    fn stop(self, _ctx: &ModuleContext) -> Result<(), ModuleError> {
        tracing::info!(keys = self.map.len(), "kv stopped");
        Ok(())
    }
}

export_module!(Kv);

//! The smallest Ember module: logs, becomes ready, waits for the stop
//! request, stops cleanly.

use module_runtime::{export_module, tracing, Module, ModuleContext, ModuleError};

/// The hello module.
pub struct Hello {
    greeting: String,
}

impl Module for Hello {
    fn start(ctx: &ModuleContext) -> Result<Self, ModuleError> {
        let greeting = ctx
            .config()
            .get("greeting")
            .and_then(|v| v.as_str())
            .unwrap_or("hello")
            .to_owned();
        tracing::info!(module = %ctx.identity(), "starting");
        if ctx.config().get("log_hash_probe").and_then(|v| v.as_bool()) == Some(true) {
            // The keys of a fresh std `RandomState` (what every `HashMap`
            // uses): this module's std was never used before the fork, so
            // each worker seeds its own (docs/abi.md §5).
            use std::hash::BuildHasher;
            let probe = std::collections::hash_map::RandomState::new().hash_one(42u64);
            tracing::info!("std RandomState probe: hash_one(42) = {probe:#018x}");
        }
        if let Some(text) = ctx.config().get("print").and_then(|v| v.as_str()) {
            // Plain stdout/stderr, as any library might write: the worker's
            // stdout and stderr are the module's log.
            println!("stdout: {text}");
            eprintln!("stderr: {text}");
        }
        // Optional sealed shared data: a message of the day published by the base.
        if let Ok(data) = ctx.open_shared_data("motd") {
            match data.access::<module_runtime::rkyv::Archived<String>>() {
                Ok(motd) => {
                    tracing::info!(generation = data.generation(), "motd: {}", motd.as_str())
                }
                Err(e) => tracing::warn!("motd is not a valid archive: {e}"),
            }
        }
        Ok(Hello { greeting })
    }

    fn serve(&mut self, ctx: &ModuleContext) -> Result<(), ModuleError> {
        ctx.ready();
        tracing::info!("{}, world", self.greeting);
        ctx.shutdown().wait();
        tracing::info!(
            remaining_ms = ctx
                .shutdown()
                .remaining()
                .map_or(0, |d| d.as_millis() as u64),
            "shutdown requested"
        );
        Ok(())
    }

    fn stop(self, _ctx: &ModuleContext) -> Result<(), ModuleError> {
        tracing::info!("goodbye");
        Ok(())
    }
}

export_module!(Hello);

//! The host callbacks in `HostApi`: what the module calls into the worker
//! (ready, log, error, shutdown time left, plugin lookup, attached grants).

use std::ffi::c_void;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::plugins;
use super::shared::shared_from;
use crate::abi::{self, FfiGrant, FfiStr, PluginRef};
use crate::protocol::LogLevel;

pub(super) unsafe extern "C" fn host_ready(ctx: *const c_void) {
    shared_from(ctx).mark_ready();
}

pub(super) unsafe extern "C" fn host_log(
    ctx: *const c_void,
    level: u32,
    target: FfiStr,
    message: FfiStr,
) {
    // SAFETY: the module passes strings valid for the call.
    let (t, m) = unsafe { (target.to_string_lossy(), message.to_string_lossy()) };
    shared_from(ctx).log(LogLevel::from_u32(level), &t, m);
}

pub(super) unsafe extern "C" fn host_error(ctx: *const c_void, message: FfiStr) {
    // SAFETY: as in `host_log`.
    let m = unsafe { message.to_string_lossy() };
    *shared_from(ctx)
        .last_error
        .lock()
        .unwrap_or_else(|p| p.into_inner()) = Some(m);
}

pub(super) unsafe extern "C" fn host_shutdown_remaining_ms(ctx: *const c_void) -> i64 {
    let s = shared_from(ctx);
    if !s.shutdown_requested.load(Ordering::Acquire) {
        return -1;
    }
    let d = *s
        .shutdown_deadline
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    d.map_or(0, |d| {
        i64::try_from(d.saturating_duration_since(Instant::now()).as_millis()).unwrap_or(i64::MAX)
    })
}

pub(super) unsafe extern "C" fn host_plugin_lookup(
    _ctx: *const c_void,
    name: FfiStr,
    table_version: u32,
    out: *mut PluginRef,
) -> i32 {
    if out.is_null() {
        return abi::LOOKUP_NOT_FOUND;
    }
    // SAFETY: the module passes a name valid for the call.
    let name = unsafe { name.to_string_lossy() };
    // SAFETY: non-null out-pointer provided by the module for this call.
    let out = unsafe { &mut *out };
    plugins::lookup(&name, table_version, out)
}

pub(super) unsafe extern "C" fn host_take_attached(
    ctx: *const c_void,
    out: *mut FfiGrant,
    cap: usize,
) -> usize {
    let s = shared_from(ctx);
    if out.is_null() || cap == 0 {
        return 0;
    }
    let mut q = s.attached.lock().unwrap_or_else(|p| p.into_inner());
    let n = q.len().min(cap);
    for (i, g) in q.drain(..n).enumerate() {
        // SAFETY: the module passes room for `cap` grants at `out`, and i < n <= cap.
        unsafe { out.add(i).write(g) };
    }
    if q.is_empty() {
        // Drain the doorbell while holding the queue lock, so a concurrent
        // attach re-arms it after we emptied it.
        let mut buf = [0u8; 64];
        while matches!(nix::unistd::read(s.attach_r.as_fd(), &mut buf), Ok(k) if k > 0) {}
    }
    n
}

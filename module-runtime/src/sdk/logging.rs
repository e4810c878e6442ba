//! A `tracing` subscriber that forwards every event to the host's `log`
//! callback; the worker sends it on to the supervisor over the control
//! socket, where it is tagged with the instance's identity.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

/// Sink for formatted records: (level 1..=5, target, message).
pub(crate) type Sink = Box<dyn Fn(u32, &str, &str) + Send + Sync>;

pub(crate) struct Forward {
    sink: Sink,
    max: Level,
    next_span: AtomicU64,
}

impl Forward {
    pub(crate) fn new(sink: Sink, max: Level) -> Self {
        Self {
            sink,
            max,
            next_span: AtomicU64::new(1),
        }
    }
}

pub(crate) fn level_code(l: &Level) -> u32 {
    match *l {
        Level::ERROR => 1,
        Level::WARN => 2,
        Level::INFO => 3,
        Level::DEBUG => 4,
        _ => 5,
    }
}

struct Fields(String);

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl Subscriber for Forward {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        *metadata.level() <= self.max
    }

    fn new_span(&self, _span: &Attributes<'_>) -> Id {
        // Relaxed: ids only need to be unique, not ordered.
        Id::from_u64(self.next_span.fetch_add(1, Ordering::Relaxed))
    }

    fn record(&self, _span: &Id, _values: &Record<'_>) {}

    fn record_follows_from(&self, _span: &Id, _follows: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut f = Fields(String::new());
        event.record(&mut f);
        (self.sink)(
            level_code(event.metadata().level()),
            event.metadata().target(),
            f.0.trim_start(),
        );
    }

    fn enter(&self, _span: &Id) {}

    fn exit(&self, _span: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn formats_message_and_fields() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let sub = Forward::new(
            Box::new(move |l, t, m| s.lock().unwrap().push((l, t.to_owned(), m.to_owned()))),
            Level::INFO,
        );
        tracing::subscriber::with_default(sub, || {
            tracing::info!(target: "hello", answer = 42, "started");
            tracing::debug!("hidden");
            tracing::error!(who = "me", "bad");
        });
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(
            seen[0],
            (3, "hello".to_owned(), "started answer=42".to_owned())
        );
        assert_eq!(seen[1].0, 1);
        assert_eq!(seen[1].2, "bad who=\"me\"");
    }
}

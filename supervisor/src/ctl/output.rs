//! Output: the one writer every verb prints through, aligned tables and
//! key/value blocks.

use std::io::Write;

use serde_json::Value;

use super::client::CtlError;

/// Where every verb prints: stdout. When its reader has gone
/// (`emberctl list | head -1`: `EPIPE`, as Rust ignores `SIGPIPE`), printing
/// stops quietly and the command finishes as it would have; other write
/// errors fail the command.
#[derive(Debug, Default)]
pub struct Printer {
    closed: bool,
}

impl Printer {
    /// A printer to stdout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `text` as is and flushes it; nothing once stdout is closed.
    pub fn print(&mut self, text: &str) -> Result<(), CtlError> {
        if self.closed {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                self.closed = true;
                Ok(())
            }
            Err(e) => Err(CtlError::Output(e)),
        }
    }

    /// Writes `line` and a newline.
    pub fn line(&mut self, line: &str) -> Result<(), CtlError> {
        self.print(&format!("{line}\n"))
    }

    /// Writes `v` as indented JSON.
    pub fn json(&mut self, v: &Value) -> Result<(), CtlError> {
        self.line(&serde_json::to_string_pretty(v).expect("a Value always serializes"))
    }

    /// Whether stdout's reader has gone (a verb that would print forever,
    /// `logs -f`, stops then).
    pub fn closed(&self) -> bool {
        self.closed
    }
}

/// Formats rows as left-aligned columns under a header.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// A value as a table cell: strings bare, null as `-`.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Bytes as KiB/MiB/GiB.
pub fn bytes(v: &Value) -> String {
    let Some(n) = v.as_u64() else { return cell(v) };
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut x = n as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

/// `key: value` lines, keys aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{:>w$}: {v}\n", k, w = w))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligns() {
        let t = table(
            &["NAME", "STATE"],
            &[
                vec!["kv".into(), "running".into()],
                vec!["greeter".into(), "-".into()],
            ],
        );
        assert_eq!(t, "NAME     STATE\nkv       running\ngreeter  -\n");
        assert_eq!(bytes(&Value::from(1536u64)), "1.5 KiB");
        assert_eq!(bytes(&Value::from(12u64)), "12 B");
        assert_eq!(cell(&Value::Null), "-");
    }
}

//! RFC 3339 timestamps (emberd's `exited_at`) to protobuf Timestamps.

use std::time::{SystemTime, UNIX_EPOCH};

use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;

/// Now.
pub fn now() -> Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`; `None` when it is not that.
pub fn parse_rfc3339(s: &str) -> Option<Timestamp> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &s[start..i.min(start + 9)];
        nanos = frac.parse::<i64>().ok()? * 10i64.pow(9 - frac.len() as u32);
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        c @ (b'+' | b'-') if b.len() == i + 6 && b[i + 3] == b':' => {
            let o = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *c == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    let seconds = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset;
    Some(Timestamp {
        seconds,
        nanos: nanos as i32,
        ..Default::default()
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: &str) -> (i64, i32) {
        let t = parse_rfc3339(s).unwrap_or_else(|| panic!("{s} did not parse"));
        (t.seconds, t.nanos)
    }

    #[test]
    fn rfc3339_timestamps_parse_to_unix_time() {
        assert_eq!(secs("1970-01-01T00:00:00Z"), (0, 0));
        // date -u -d 2026-12-05T22:31:28Z +%s
        assert_eq!(secs("2026-12-05T22:31:28Z"), (1_796_509_888, 0));
        assert_eq!(secs("2026-12-05T22:31:28.5Z"), (1_796_509_888, 500_000_000));
        assert_eq!(
            secs("2026-12-05T22:31:28.123456789123Z"),
            (1_796_509_888, 123_456_789)
        );
        assert_eq!(secs("2026-12-05T23:31:28+01:00"), (1_796_509_888, 0));
        assert_eq!(secs("2000-02-29T00:00:00Z"), (951_782_400, 0));
    }

    #[test]
    fn malformed_timestamps_are_refused() {
        for s in [
            "",
            "yesterday",
            "2026-12-05",
            "2026-13-05T00:00:00Z",
            "2026-12-05T00:00:00",
            "2026-12-05T00:00:00.Z",
            "2026-12-05T00:00:00+0100",
            "2026-12-05T00:00:00Zjunk",
        ] {
            assert!(parse_rfc3339(s).is_none(), "{s} parsed");
        }
    }
}

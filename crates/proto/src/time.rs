//! Time as it appears in reports: unix nanoseconds inside, RFC 3339 UTC strings outside.

/// Formats unix nanoseconds as an RFC 3339 UTC timestamp with millisecond precision,
/// e.g. `2026-11-22T05:21:27.123Z`.
pub fn rfc3339_from_unix_ns(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let millis = (unix_ns / 1_000_000) % 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Parses an RFC 3339 timestamp (`2026-12-03T18:30:00Z`, fractions and `+01:00`-style offsets
/// allowed; `T` or a space between date and time) into unix nanoseconds. `None` when it is not
/// one, or before 1970.
pub fn unix_ns_from_rfc3339(s: &str) -> Option<u64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos: i64 = 0;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        let mut scale = 100_000_000i64;
        for c in frac[..digits].bytes().take(9) {
            nanos += i64::from(c - b'0') * scale;
            scale /= 10;
        }
        rest = &frac[digits..];
    }
    let offset_s: i64 = match rest {
        "Z" | "z" => 0,
        _ => {
            let ob = rest.as_bytes();
            if ob.len() != 6 || !matches!(ob[0], b'+' | b'-') || ob[3] != b':' {
                return None;
            }
            let h: i64 = rest.get(1..3)?.parse().ok()?;
            let m: i64 = rest.get(4..6)?.parse().ok()?;
            let v = h * 3600 + m * 60;
            if ob[0] == b'+' {
                v
            } else {
                -v
            }
        }
    };
    let days = days_from_civil(year, month as u32, day as u32);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_s;
    if secs < 0 {
        return None;
    }
    u64::try_from(secs)
        .ok()?
        .checked_mul(1_000_000_000)?
        .checked_add(nanos as u64)
}

/// (year, month, day) to days since 1970-01-01 (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days` algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Current wall-clock time in unix nanoseconds (0 if the clock is before 1970).
pub fn now_unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// **Test only.** `UNDERSTUDY_TEST_CLOCK=<origin_unix_ns>:<factor>` makes the clock of the
/// recovery history (cut times stamped by a primary, `now` of a replica's retention) run
/// `factor` times faster than real time from `origin`, so that a test fits hours of history
/// into a minute. Give every daemon of a test the same value. Nothing else uses it: health,
/// deadlines, events and heartbeats keep the real clock. Unset or unparsable: real time.
pub const TEST_CLOCK_ENV: &str = "UNDERSTUDY_TEST_CLOCK";

fn test_clock() -> Option<(u64, u64)> {
    static CLOCK: std::sync::OnceLock<Option<(u64, u64)>> = std::sync::OnceLock::new();
    *CLOCK.get_or_init(|| {
        let v = std::env::var(TEST_CLOCK_ENV).ok()?;
        let (origin, factor) = v.split_once(':')?;
        Some((origin.parse().ok()?, factor.parse().ok()?))
    })
}

/// Whether the test clock ([`TEST_CLOCK_ENV`]) is in effect (the daemon logs it at start).
pub fn test_clock_in_effect() -> bool {
    test_clock().is_some()
}

/// `real_ns` on the recovery history's clock: itself, unless a test compressed time
/// ([`TEST_CLOCK_ENV`]).
pub fn history_clock_ns(real_ns: u64) -> u64 {
    match test_clock() {
        None => real_ns,
        Some((origin, factor)) => {
            origin.saturating_add(real_ns.saturating_sub(origin).saturating_mul(factor))
        }
    }
}

/// Now on the recovery history's clock (see [`history_clock_ns`]).
pub fn history_now_ns() -> u64 {
    history_clock_ns(now_unix_ns())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_from_unix_ns(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 12:34:56.789 UTC (a leap day).
        assert_eq!(
            rfc3339_from_unix_ns(951_827_696_789_000_000),
            "2000-02-29T12:34:56.789Z"
        );
        assert_eq!(
            rfc3339_from_unix_ns(1_795_324_887_000_000_000),
            "2026-11-22T05:21:27.000Z"
        );
    }
}

#[cfg(test)]
mod parse_tests {
    use super::*;

    #[test]
    fn rfc3339_parses_what_it_formats_and_offsets() {
        for ns in [0u64, 1_767_225_600_123_000_000, 1_795_000_000_000_000_000] {
            assert_eq!(unix_ns_from_rfc3339(&rfc3339_from_unix_ns(ns)), Some(ns));
        }
        assert_eq!(
            unix_ns_from_rfc3339("2026-01-01T01:00:00+01:00"),
            unix_ns_from_rfc3339("2026-01-01T00:00:00Z")
        );
        assert_eq!(
            unix_ns_from_rfc3339("2026-01-01 00:00:00Z"),
            Some(1_767_225_600_000_000_000)
        );
        for bad in [
            "",
            "tomorrow",
            "2026-13-01T00:00:00Z",
            "2026-01-01T00:00:00",
            "2026-01-01T00:00:00+1",
            "1969-12-31T23:59:59Z",
            "2026-01-01T00:00:00.Z",
        ] {
            assert_eq!(unix_ns_from_rfc3339(bad), None, "{bad:?}");
        }
    }
}

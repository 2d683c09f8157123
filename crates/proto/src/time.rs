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

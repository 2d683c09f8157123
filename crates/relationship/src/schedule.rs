//! When a resynchronization starts by itself (`replication set NAME --auto-resynchronize on
//! [--resynchronize-window 18:30-06:00]`, Hyper-V's "automatically start resynchronization /
//! only during the following hours / manually"). Pure: the time is passed in.
//!
//! Window times are **UTC** (the same on both hosts and in every script, with no daylight-saving
//! jump that would skip or repeat an hour); `replication status` prints them with "UTC".

use std::fmt;

use serde::{Deserialize, Serialize};

const NS_PER_SEC: u64 = 1_000_000_000;
const SECS_PER_DAY: u64 = 86_400;
/// Minutes in a day: a window's ends are minutes of the day, `0..MINUTES_PER_DAY`.
const MINUTES_PER_DAY: u16 = 24 * 60;

/// Whether and when a relationship that becomes `ResynchronizationRequired` starts a
/// resynchronization without a command.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum AutoResync {
    /// Manual (the default): it waits for `replication resume NAME --resynchronize`.
    #[default]
    Off,
    /// Automatic: at once, or with a window at its next start (at once inside it).
    On { window: Option<ResyncWindow> },
}

impl AutoResync {
    /// When a resynchronization required at `now_unix_ns` starts: `None` when manual.
    pub fn start_at(self, now_unix_ns: u64) -> Option<u64> {
        match self {
            AutoResync::Off => None,
            AutoResync::On { window: None } => Some(now_unix_ns),
            AutoResync::On { window: Some(w) } => Some(w.next_start(now_unix_ns)),
        }
    }
}

/// A daily window `start-end` in UTC minutes of the day; `end < start` wraps midnight
/// (`18:30-06:00` is 18:30 to 06:00 the next morning). `start == end` is refused: it would be
/// either empty or the whole day, so an admin means "no window" (`none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ResyncWindow {
    start_min: u16,
    end_min: u16,
}

impl ResyncWindow {
    /// A window from minute `start_min` to minute `end_min` of the day (UTC).
    pub fn new(start_min: u16, end_min: u16) -> Result<ResyncWindow, String> {
        if start_min >= MINUTES_PER_DAY || end_min >= MINUTES_PER_DAY {
            return Err(format!(
                "a window's times are 00:00 to 23:59 (got minutes {start_min} and {end_min})"
            ));
        }
        if start_min == end_min {
            return Err(
                "the window starts and ends at the same time; omit it (`--resynchronize-window none`) to allow any time"
                    .into(),
            );
        }
        Ok(ResyncWindow { start_min, end_min })
    }

    /// Parses `HH:MM-HH:MM` (UTC; a trailing ` UTC` or `Z` is accepted).
    pub fn parse(text: &str) -> Result<ResyncWindow, String> {
        let bad = || format!("invalid window {text:?}: give HH:MM-HH:MM in UTC, e.g. 18:30-06:00");
        let t = text.trim();
        let t = t
            .strip_suffix("UTC")
            .or_else(|| t.strip_suffix('Z'))
            .unwrap_or(t)
            .trim();
        let (a, b) = t.split_once('-').ok_or_else(bad)?;
        let minute = |s: &str| -> Option<u16> {
            let (h, m) = s.trim().split_once(':')?;
            if h.is_empty() || h.len() > 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (start, end) = (minute(a).ok_or_else(bad)?, minute(b).ok_or_else(bad)?);
        ResyncWindow::new(start, end)
    }

    /// Minute of the day (UTC) the window opens.
    pub fn start_minute(self) -> u16 {
        self.start_min
    }

    /// Minute of the day (UTC) the window closes.
    pub fn end_minute(self) -> u16 {
        self.end_min
    }

    /// Whether `unix_ns` falls inside the window (start included, end excluded).
    pub fn contains(self, unix_ns: u64) -> bool {
        let m = minute_of_day(unix_ns);
        if self.start_min < self.end_min {
            self.start_min <= m && m < self.end_min
        } else {
            m >= self.start_min || m < self.end_min
        }
    }

    /// `now_unix_ns` itself when inside the window, else the window's next opening.
    pub fn next_start(self, now_unix_ns: u64) -> u64 {
        if self.contains(now_unix_ns) {
            return now_unix_ns;
        }
        let now_s = now_unix_ns / NS_PER_SEC;
        let mut at = now_s - now_s % SECS_PER_DAY + u64::from(self.start_min) * 60;
        if at <= now_s {
            at += SECS_PER_DAY;
        }
        at.saturating_mul(NS_PER_SEC)
    }
}

fn minute_of_day(unix_ns: u64) -> u16 {
    ((unix_ns / NS_PER_SEC % SECS_PER_DAY) / 60) as u16
}

impl fmt::Display for ResyncWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start_min / 60,
            self.start_min % 60,
            self.end_min / 60,
            self.end_min % 60
        )
    }
}

impl TryFrom<String> for ResyncWindow {
    type Error = String;
    fn try_from(s: String) -> Result<ResyncWindow, String> {
        ResyncWindow::parse(&s)
    }
}

impl From<ResyncWindow> for String {
    fn from(w: ResyncWindow) -> String {
        w.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-03T00:00:00Z.
    const DAY: u64 = 1_796_256_000 * NS_PER_SEC;

    fn at(h: u64, m: u64) -> u64 {
        DAY + (h * 3600 + m * 60) * NS_PER_SEC
    }

    fn w(s: &str) -> ResyncWindow {
        ResyncWindow::parse(s).unwrap()
    }

    #[test]
    fn parses_and_prints_windows() {
        assert_eq!(w("18:30-06:00").to_string(), "18:30-06:00");
        assert_eq!(w(" 8:05-9:00 UTC").to_string(), "08:05-09:00");
        assert_eq!(w("00:00-23:59Z").to_string(), "00:00-23:59");
        for bad in [
            "",
            "18:30",
            "18:30-",
            "24:00-01:00",
            "10:60-11:00",
            "1030-1100",
            "10:30-10:30",
            "a:b-c:d",
            "10:3-11:00",
        ] {
            assert!(ResyncWindow::parse(bad).is_err(), "{bad:?}");
        }
        let json = serde_json::to_string(&w("18:30-06:00")).unwrap();
        assert_eq!(json, "\"18:30-06:00\"");
        assert_eq!(
            serde_json::from_str::<ResyncWindow>(&json).unwrap(),
            w("18:30-06:00")
        );
        assert!(serde_json::from_str::<ResyncWindow>("\"25:00-01:00\"").is_err());
    }

    #[test]
    fn a_window_inside_the_day_starts_now_inside_and_at_its_start_outside() {
        let day = w("09:00-17:00");
        assert_eq!(day.next_start(at(12, 0)), at(12, 0));
        assert_eq!(day.next_start(at(9, 0)), at(9, 0));
        assert_eq!(day.next_start(at(8, 59)), at(9, 0));
        // Its end is outside: the next start is tomorrow's.
        assert_eq!(day.next_start(at(17, 0)), at(24 + 9, 0));
        assert_eq!(day.next_start(at(23, 0)), at(24 + 9, 0));
    }

    #[test]
    fn a_window_that_wraps_midnight_covers_both_sides() {
        let night = w("18:30-06:00");
        for inside in [at(18, 30), at(23, 59), at(0, 0), at(5, 59)] {
            assert!(night.contains(inside));
            assert_eq!(night.next_start(inside), inside);
        }
        assert_eq!(night.next_start(at(6, 0)), at(18, 30));
        assert_eq!(night.next_start(at(12, 0)), at(18, 30));
        assert_eq!(night.next_start(at(18, 29)), at(18, 30));
    }

    #[test]
    fn auto_resync_start_times() {
        assert_eq!(AutoResync::Off.start_at(at(1, 0)), None);
        assert_eq!(
            AutoResync::On { window: None }.start_at(at(1, 0)),
            Some(at(1, 0))
        );
        assert_eq!(
            AutoResync::On {
                window: Some(w("02:00-04:00"))
            }
            .start_at(at(1, 0)),
            Some(at(2, 0))
        );
    }
}

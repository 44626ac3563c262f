//! When the agent last did something worth staying awake for, and what it
//! has scheduled: the source of `GET /v1/activity`, which the operator polls
//! to scale an idle agent to zero and to wake it in time (docs/operator.md,
//! "Scale to zero").
//!
//! Activity is recorded where it happens (serving a peer, a declared change,
//! a new version published or fetched) with one cheap call; running fetches
//! are read from the fetch registry, so the data plane needs no hooks. The
//! report itself is `activity_report.rs` (it needs the whole agent, which
//! holds this clock).

use std::sync::Mutex;
use std::time::Instant;

#[cfg(test)]
use crate::declare::activity;

/// The activity clock of one agent.
#[derive(Debug)]
pub struct Activity {
    started: Instant,
    last: Mutex<Option<(Instant, &'static str)>>,
    next_url_refresh: Mutex<Option<u64>>,
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

impl Activity {
    /// A clock that starts now, with no activity yet.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            last: Mutex::new(None),
            next_url_refresh: Mutex::new(None),
        }
    }

    /// Records activity of `kind` (one of [`activity`]) now.
    pub fn touch(&self, kind: &'static str) {
        self.touch_at(Instant::now(), kind);
    }

    /// Records activity that happened at `at` (kept only if it is newer).
    pub fn touch_at(&self, at: Instant, kind: &'static str) {
        if let Ok(mut l) = self.last.lock()
            && l.is_none_or(|(t, _)| at >= t)
        {
            *l = Some((at, kind));
        }
    }

    /// The last activity, if any since the agent started.
    pub fn last(&self) -> Option<(Instant, &'static str)> {
        self.last.lock().ok().and_then(|l| *l)
    }

    /// Seconds since the agent started.
    pub fn uptime_secs(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Sets (or clears) when offline-seeding URLs must next be refreshed
    /// (unix seconds). The offline-seeding code calls this after presigning;
    /// the operator wakes a sleeping agent in time for it.
    pub fn set_next_url_refresh(&self, unix: Option<u64>) {
        if let Ok(mut n) = self.next_url_refresh.lock() {
            *n = unix;
        }
    }

    /// See [`Activity::set_next_url_refresh`].
    pub fn next_url_refresh(&self) -> Option<u64> {
        self.next_url_refresh.lock().ok().and_then(|n| *n)
    }
}

/// Scheduled and pending work of the declared shares, filled by
/// `Declarations::plan` and folded into the report.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Schedule {
    /// Work in progress, one line each.
    pub pending: Vec<String>,
    /// The next scheduled run (unix seconds) and what it is.
    pub next: Option<(u64, String)>,
}

impl Schedule {
    /// Keeps the earlier of the current next run and `(at, what)`.
    pub fn due(&mut self, at: u64, what: String) {
        if self.next.as_ref().is_none_or(|(t, _)| at < *t) {
            self.next = Some((at, what));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_newer_activity_moves_the_clock() {
        let a = Activity::new();
        assert!(a.last().is_none());
        let t0 = Instant::now();
        a.touch_at(t0, activity::SERVE);
        if let Some(t) = t0.checked_sub(std::time::Duration::from_secs(5)) {
            a.touch_at(t, activity::FETCH);
        }
        assert_eq!(a.last().map(|(_, k)| k), Some(activity::SERVE));
        a.touch(activity::PUBLISH);
        assert_eq!(a.last().map(|(_, k)| k), Some(activity::PUBLISH));
    }

    #[test]
    fn schedule_keeps_the_earliest() {
        let mut s = Schedule::default();
        s.due(200, "b".into());
        s.due(100, "a".into());
        s.due(300, "c".into());
        assert_eq!(s.next, Some((100, "a".into())));
    }
}

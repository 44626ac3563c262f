//! `GET /v1/activity`: the agent's activity clock, its running and finished
//! fetches and the declared shares' schedule, folded into one
//! [`ActivityReport`] for the operator's scale-to-zero decision.

use std::time::Instant;

use crate::declare::{ActivityReport, DUE_SOON_SECS, MAX_PENDING, activity};
use crate::node::activity::Schedule;
use crate::node::agent::Agent;
use crate::node::fetch::progress::FetchState;

impl Agent {
    /// The report `GET /v1/activity` answers: the activity clock, the
    /// fetches, and `schedule` (the declared shares' work, when there are any).
    pub fn activity_report(&self, schedule: Schedule) -> ActivityReport {
        let agent = self;
        let now = Instant::now();
        let mut pending = schedule.pending;
        // Fetches: running ones are pending work; finished ones were activity
        // when they finished (their bytes moved until then).
        for f in agent.all_fetches() {
            let state = f.state.lock().map(|s| s.0).unwrap_or(FetchState::Failed);
            match state {
                FetchState::Starting | FetchState::Transferring => {
                    pending.push(format!("fetch of share {} running", f.share_id));
                }
                FetchState::Done | FetchState::Failed => {
                    let fin = f.finished_secs.lock().ok().and_then(|s| *s);
                    if let Some(secs) = fin
                        && f.bytes_received.load(std::sync::atomic::Ordering::Relaxed) > 0
                    {
                        let at = std::time::Duration::try_from_secs_f64(secs)
                            .ok()
                            .and_then(|d| f.started.checked_add(d))
                            .unwrap_or(now);
                        agent.activity.touch_at(at.min(now), activity::FETCH);
                    }
                }
            }
        }
        let mut next = schedule.next;
        let refresh = agent.activity.next_url_refresh();
        if let Some(r) = refresh
            && next.as_ref().is_none_or(|(t, _)| r < *t)
        {
            next = Some((r, "refresh of offline-seeding URLs".to_string()));
        }
        let unix = crate::util::unix_now();
        if let Some((at, what)) = &next
            && at.saturating_sub(unix) <= DUE_SOON_SECS
        {
            // No seconds in the text: the operator copies it into a condition,
            // which should not change on every poll.
            pending.push(format!("{what} due within {DUE_SOON_SECS} s"));
        }
        pending.truncate(MAX_PENDING);
        let last = agent.activity.last();
        ActivityReport {
            uptime_secs: agent.activity.uptime_secs(),
            idle_secs: last.map(|(t, _)| now.saturating_duration_since(t).as_secs()),
            last_activity: last.map(|(_, k)| k.to_string()),
            pending,
            next_wake_unix: next.as_ref().map(|(t, _)| *t),
            next_wake_reason: next.map(|(_, w)| w),
            next_url_refresh_unix: refresh,
        }
    }
}

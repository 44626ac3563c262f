//! Prometheus metrics of the operator, served on `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::crd::{Agent, AgentPhase};

/// Every phase the `agents` gauge reports (a zero is written for each, so a
/// dashboard's stacked panel never has holes).
const PHASES: [AgentPhase; 4] = [
    AgentPhase::Pending,
    AgentPhase::Ready,
    AgentPhase::Degraded,
    AgentPhase::Sleeping,
];

/// All metrics, registered in their own registry (no global state, so tests
/// can make as many as they like).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles finished, by controller and result (`ok`, `input_error`, `error`).
    pub reconciles: IntCounterVec,
    /// Reconcile problems by controller and reason (a condition reason or an API error kind).
    pub errors: IntCounterVec,
    /// Reconcile wall time.
    pub duration: HistogramVec,
    /// Status patches actually sent (a reconcile that changed nothing sends none).
    pub status_patches: IntCounterVec,
    /// 1 while this replica holds the leader Lease.
    pub leader: IntGauge,
    /// Calls to agents' admin APIs, by call and result (`ok`, `refused`,
    /// `unreachable`, `error`).
    pub agent_calls: IntCounterVec,
    /// Agents by `status.phase` (an Agent without status counts as
    /// Pending), from the controller's cache.
    pub agents: IntGaugeVec,
}

impl Metrics {
    /// Builds and registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("caravan_operator".into()), None)?;
        let reconciles = IntCounterVec::new(
            Opts::new("reconciles_total", "Reconciles finished, by result"),
            &["controller", "result"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new("reconcile_errors_total", "Reconcile problems, by reason"),
            &["controller", "reason"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new("reconcile_duration_seconds", "Reconcile wall time").buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["controller"],
        )?;
        let status_patches = IntCounterVec::new(
            Opts::new("status_patches_total", "Status patches sent"),
            &["controller"],
        )?;
        let leader = IntGauge::new("leader", "1 while this replica is the leader")?;
        let agent_calls = IntCounterVec::new(
            Opts::new(
                "agent_calls_total",
                "Calls to agents' admin APIs, by result",
            ),
            &["call", "result"],
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(status_patches.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        let agents = IntGaugeVec::new(Opts::new("agents", "Agents by status.phase"), &["phase"])?;
        registry.register(Box::new(agent_calls.clone()))?;
        registry.register(Box::new(agents.clone()))?;
        // caravan_operator_process_{resident_memory_bytes,cpu_seconds_total,open_fds,…}
        #[cfg(target_os = "linux")]
        registry.register(Box::new(caravan_agent::process_metrics::Process::for_self()))?;
        Ok(Self {
            registry,
            reconciles,
            errors,
            duration,
            status_patches,
            leader,
            agent_calls,
            agents,
        })
    }

    /// Sets the `agents` gauge from the Agents the controller knows.
    pub fn count_agents<'a>(&self, agents: impl IntoIterator<Item = &'a Agent>) {
        let mut counts = [0i64; PHASES.len()];
        for a in agents {
            let phase = a
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .unwrap_or(AgentPhase::Pending);
            if let Some(i) = PHASES.iter().position(|p| *p == phase) {
                counts[i] += 1;
            }
        }
        for (p, n) in PHASES.iter().zip(counts) {
            self.agents.with_label_values(&[p.as_str()]).set(n);
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{AgentSpec, AgentStatus};

    fn agent(phase: Option<AgentPhase>) -> Agent {
        let spec: AgentSpec =
            serde_json::from_value(serde_json::json!({"storage": {"scheme": "fs"}})).unwrap();
        let mut a = Agent::new("a", spec);
        a.status = phase.map(|p| AgentStatus {
            phase: Some(p),
            ..Default::default()
        });
        a
    }

    #[test]
    fn agents_gauge_counts_every_phase_and_writes_zeros() {
        let m = Metrics::new().unwrap();
        let list = [
            agent(Some(AgentPhase::Ready)),
            agent(Some(AgentPhase::Ready)),
            agent(Some(AgentPhase::Sleeping)),
            agent(None),
        ];
        m.count_agents(list.iter());
        let text = m.render();
        assert!(
            text.contains("caravan_operator_agents{phase=\"Ready\"} 2"),
            "{text}"
        );
        assert!(text.contains("caravan_operator_agents{phase=\"Sleeping\"} 1"));
        assert!(text.contains("caravan_operator_agents{phase=\"Pending\"} 1"));
        assert!(text.contains("caravan_operator_agents{phase=\"Degraded\"} 0"));
        m.count_agents(list[..1].iter());
        assert!(
            m.render()
                .contains("caravan_operator_agents{phase=\"Sleeping\"} 0")
        );
    }
}

//! Prometheus metrics of the operator, served on `/metrics`.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

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
        registry.register(Box::new(agent_calls.clone()))?;
        Ok(Self {
            registry,
            reconciles,
            errors,
            duration,
            status_patches,
            leader,
            agent_calls,
        })
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

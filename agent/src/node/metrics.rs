//! Prometheus metrics of one agent. Each agent owns its registry (the demo
//! runs several agents in one process, so a global registry would mix them).

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Counters and gauges an agent exports on `/metrics`.
#[derive(Clone)]
pub struct Metrics {
    /// The registry they are registered in.
    pub registry: Registry,
    /// Chunk ciphertext bytes served to peers.
    pub bytes_sent: IntCounter,
    /// Chunk ciphertext bytes received from peers (verified or not).
    pub bytes_received: IntCounter,
    /// Chunks served to peers.
    pub chunks_sent: IntCounter,
    /// Chunks received and verified.
    pub chunks_received: IntCounter,
    /// Chunks that failed verification (corrupt peer or bad data).
    pub chunks_rejected: IntCounter,
    /// Chunks taken from local storage instead of the network.
    pub chunks_reused: IntCounter,
    /// Peer connections currently open to this agent.
    pub peers_connected: IntGauge,
    /// Shares this agent holds and serves.
    pub shares_held: IntGauge,
    /// Errors by kind.
    pub errors: IntCounterVec,
}

impl Metrics {
    /// Creates and registers all metrics.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new_custom(Some("caravan".into()), None)?;
        let counter = |name: &str, help: &str| -> prometheus::Result<IntCounter> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let errors = IntCounterVec::new(Opts::new("errors_total", "Errors by kind"), &["kind"])?;
        registry.register(Box::new(errors.clone()))?;
        Ok(Metrics {
            bytes_sent: counter("bytes_sent_total", "Chunk bytes served to peers")?,
            bytes_received: counter("bytes_received_total", "Chunk bytes received from peers")?,
            chunks_sent: counter("chunks_sent_total", "Chunks served to peers")?,
            chunks_received: counter("chunks_received_total", "Chunks received and verified")?,
            chunks_rejected: counter("chunks_rejected_total", "Chunks that failed verification")?,
            chunks_reused: counter("chunks_reused_total", "Chunks reused from local storage")?,
            peers_connected: gauge("peers_connected", "Open inbound peer connections")?,
            shares_held: gauge("shares_held", "Shares held and served")?,
            errors,
            registry,
        })
    }

    /// Counts one error of a kind.
    pub fn error(&self, kind: &str) {
        self.errors.with_label_values(&[kind]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}

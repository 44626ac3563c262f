//! Prometheus metrics of one agent. Each agent owns its registry (the demo
//! runs several agents in one process, so a global registry would mix them).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

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
    /// Of those, chunks served as the publish pass sealed them (no second
    /// read, encryption and hash).
    pub chunks_sent_sealed: IntCounter,
    /// Of those, chunks cut from a stream of their file in object storage
    /// (one GET for a run of chunks instead of one each).
    pub chunks_sent_streamed: IntCounter,
    /// Fetched files written to S3 by one streamed PUT each
    /// (`store/streamed_put.rs`) instead of a multipart upload.
    pub files_put_streamed: IntCounter,
    /// Streamed PUTs that failed with a temporary error, whose file was
    /// fetched again as a multipart upload.
    pub files_put_retried: IntCounter,
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
    /// Failures talking to one peer, by peer (short agent id) and kind
    /// (`connect`, `request`, `corrupt_chunk`). One series per peer met.
    pub peer_errors: IntCounterVec,
    /// Wall time of completed fetches.
    pub fetch_duration: Histogram,
    /// Plaintext bytes per second of completed fetches.
    pub fetch_throughput: Histogram,
    /// Fetches running now.
    pub fetches_active: IntGauge,
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
        let peer_errors = IntCounterVec::new(
            Opts::new(
                "peer_errors_total",
                "Failures talking to a peer, by peer and kind",
            ),
            &["peer", "kind"],
        )?;
        registry.register(Box::new(peer_errors.clone()))?;
        let fetch_duration = Histogram::with_opts(
            HistogramOpts::new("fetch_duration_seconds", "Wall time of completed fetches").buckets(
                vec![
                    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                ],
            ),
        )?;
        registry.register(Box::new(fetch_duration.clone()))?;
        let fetch_throughput = Histogram::with_opts(
            HistogramOpts::new(
                "fetch_throughput_bytes_per_second",
                "Plaintext bytes per second of completed fetches",
            )
            .buckets(prometheus::exponential_buckets(65_536.0, 4.0, 10)?),
        )?;
        registry.register(Box::new(fetch_throughput.clone()))?;
        // RSS, CPU seconds, open and max file descriptors, start time (Linux).
        #[cfg(target_os = "linux")]
        registry.register(Box::new(crate::process_metrics::Process::for_self()))?;
        Ok(Metrics {
            bytes_sent: counter("bytes_sent_total", "Chunk bytes served to peers")?,
            bytes_received: counter("bytes_received_total", "Chunk bytes received from peers")?,
            chunks_sent: counter("chunks_sent_total", "Chunks served to peers")?,
            chunks_sent_sealed: counter(
                "chunks_sent_sealed_total",
                "Chunks served from the publish pass's cache of sealed chunks",
            )?,
            chunks_sent_streamed: counter(
                "chunks_sent_streamed_total",
                "Chunks served from a stream of their file in object storage",
            )?,
            files_put_streamed: counter(
                "files_put_streamed_total",
                "Fetched files written to S3 by one streamed PUT each",
            )?,
            files_put_retried: counter(
                "files_put_retried_total",
                "Streamed PUTs that failed, their file fetched again as a multipart upload",
            )?,
            chunks_received: counter("chunks_received_total", "Chunks received and verified")?,
            chunks_rejected: counter("chunks_rejected_total", "Chunks that failed verification")?,
            chunks_reused: counter(
                "chunks_reused_total",
                "Chunks reused from local storage or copied from a repeat in the same share",
            )?,
            peers_connected: gauge("peers_connected", "Open inbound peer connections")?,
            shares_held: gauge("shares_held", "Shares held and served")?,
            errors,
            peer_errors,
            fetch_duration,
            fetch_throughput,
            fetches_active: gauge("fetches_active", "Fetches running now")?,
            registry,
        })
    }

    /// Counts one failure talking to `peer` (its short id).
    pub fn peer_error(&self, peer: &str, kind: &str) {
        self.peer_errors.with_label_values(&[peer, kind]).inc();
    }

    /// Records a completed fetch.
    pub fn fetch_done(&self, bytes: u64, seconds: f64) {
        self.fetch_duration.observe(seconds);
        if seconds > 0.0 {
            self.fetch_throughput.observe(bytes as f64 / seconds);
        }
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

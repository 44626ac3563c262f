//! How far a fetch got: the live counters and the snapshot the admin API
//! and the CLI show.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::manifest::ShareId;
/// Where a fetch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FetchState {
    /// Looking for peers and the manifest.
    Starting,
    /// Moving bytes.
    Transferring,
    /// Every file is in place and verified.
    Done,
    /// Stopped with an error (see `error`).
    Failed,
}

/// Live progress of one fetch, readable while it runs.
#[derive(Debug)]
pub struct FetchProgress {
    /// The share.
    pub share_id: ShareId,
    /// Destination directory.
    pub dest: String,
    pub(crate) started: Instant,
    pub(crate) state: Mutex<(FetchState, Option<String>)>,
    pub(crate) seq: AtomicU64,
    pub(crate) bytes_total: AtomicU64,
    pub(crate) bytes_done: AtomicU64,
    pub(crate) chunks_total: AtomicU64,
    pub(crate) chunks_done: AtomicU64,
    pub(crate) chunks_fetched: AtomicU64,
    pub(crate) chunks_reused: AtomicU64,
    pub(crate) files_total: AtomicU64,
    pub(crate) files_done: AtomicU64,
    pub(crate) bytes_received: AtomicU64,
    pub(crate) peers: Mutex<Vec<String>>,
    pub(crate) finished_secs: Mutex<Option<f64>>,
    pub(crate) first_byte_secs: std::sync::OnceLock<f64>,
    /// Ends this attempt at once (`caravan-agent cancel`).
    pub(crate) cancel: tokio_util::sync::CancellationToken,
    /// See [`ProgressSnapshot::already_in_place`].
    pub(crate) already_in_place: std::sync::atomic::AtomicBool,
}

/// A copy of [`FetchProgress`] for the admin API and the CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgressSnapshot {
    /// The share.
    pub share_id: String,
    /// Destination directory.
    pub dest: String,
    /// State.
    pub state: FetchState,
    /// Error message when failed.
    pub error: Option<String>,
    /// Version being fetched.
    pub seq: u64,
    /// Bytes in the share.
    pub bytes_total: u64,
    /// Bytes verified and written (or verified in place).
    pub bytes_done: u64,
    /// Chunks in the share.
    pub chunks_total: u64,
    /// Chunks verified and written.
    pub chunks_done: u64,
    /// Chunks downloaded from peers.
    pub chunks_fetched: u64,
    /// Chunks found locally and not downloaded.
    pub chunks_reused: u64,
    /// Files in the share.
    pub files_total: u64,
    /// Files complete.
    pub files_done: u64,
    /// Ciphertext bytes received from peers.
    pub bytes_received: u64,
    /// Peers in use (agent ids).
    pub peers: Vec<String>,
    /// Seconds since start (or total when finished).
    pub seconds: f64,
    /// Seconds from the start until the first verified chunk was written.
    #[serde(default)]
    pub first_byte_seconds: Option<f64>,
    /// The version was held here already, every file in place: nothing
    /// was written.
    #[serde(default)]
    pub already_in_place: bool,
}

impl FetchProgress {
    /// Bytes this fetch has still to write while it transfers (none
    /// otherwise): the free space it counted on is spoken for.
    pub(crate) fn still_to_write(&self) -> u64 {
        let transferring = self
            .state
            .lock()
            .is_ok_and(|s| s.0 == FetchState::Transferring);
        match transferring {
            true => self
                .bytes_total
                .load(Ordering::Relaxed)
                .saturating_sub(self.bytes_done.load(Ordering::Relaxed)),
            false => 0,
        }
    }

    /// Forgets what was counted done, before a new pass over the same
    /// destination (following a live share again, or its signed manifest
    /// after all) counts again what is in place. Bytes and chunks received
    /// stay: they were received.
    pub(crate) fn recount(&self) {
        for c in [
            &self.bytes_done,
            &self.chunks_done,
            &self.chunks_reused,
            &self.files_done,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }

    pub(crate) fn new(share_id: ShareId, dest: String) -> Self {
        FetchProgress {
            share_id,
            dest,
            started: Instant::now(),
            state: Mutex::new((FetchState::Starting, None)),
            seq: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            chunks_total: AtomicU64::new(0),
            chunks_done: AtomicU64::new(0),
            chunks_fetched: AtomicU64::new(0),
            chunks_reused: AtomicU64::new(0),
            files_total: AtomicU64::new(0),
            files_done: AtomicU64::new(0),
            bytes_received: AtomicU64::new(0),
            peers: Mutex::new(Vec::new()),
            finished_secs: Mutex::new(None),
            first_byte_secs: std::sync::OnceLock::new(),
            cancel: tokio_util::sync::CancellationToken::new(),
            already_in_place: Default::default(),
        }
    }

    /// Notes the first verified chunk written (only the first call counts).
    pub(crate) fn first_byte(&self) {
        let _ = self
            .first_byte_secs
            .set(self.started.elapsed().as_secs_f64());
    }

    pub(crate) fn set_state(&self, s: FetchState, err: Option<String>) {
        if let Ok(mut g) = self.state.lock() {
            *g = (s, err);
        }
        if matches!(s, FetchState::Done | FetchState::Failed)
            && let Ok(mut f) = self.finished_secs.lock()
        {
            *f = Some(self.started.elapsed().as_secs_f64());
        }
    }

    /// Whether it is still running (neither done nor failed).
    pub(crate) fn running(&self) -> bool {
        self.state
            .lock()
            .is_ok_and(|g| matches!(g.0, FetchState::Starting | FetchState::Transferring))
    }

    /// A consistent-enough copy for reporting.
    pub fn snapshot(&self) -> ProgressSnapshot {
        let (state, error) = self
            .state
            .lock()
            .map(|g| g.clone())
            .unwrap_or((FetchState::Failed, Some("progress lock poisoned".into())));
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProgressSnapshot {
            share_id: self.share_id.to_string(),
            dest: self.dest.clone(),
            state,
            error,
            seq: l(&self.seq),
            bytes_total: l(&self.bytes_total),
            bytes_done: l(&self.bytes_done),
            chunks_total: l(&self.chunks_total),
            chunks_done: l(&self.chunks_done),
            chunks_fetched: l(&self.chunks_fetched),
            chunks_reused: l(&self.chunks_reused),
            files_total: l(&self.files_total),
            files_done: l(&self.files_done),
            bytes_received: l(&self.bytes_received),
            peers: self.peers.lock().map(|p| p.clone()).unwrap_or_default(),
            seconds: self
                .finished_secs
                .lock()
                .ok()
                .and_then(|f| *f)
                .unwrap_or_else(|| self.started.elapsed().as_secs_f64()),
            first_byte_seconds: self.first_byte_secs.get().copied(),
            already_in_place: self.already_in_place.load(Ordering::Relaxed),
        }
    }
}

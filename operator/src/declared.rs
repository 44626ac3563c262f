//! What the Share and TrustGrant controllers share: their context (the
//! Kubernetes client, the agent API client, Events, metrics, a clock and
//! per-object backoff), their error type, Event publishing and the loop
//! settings. The reconcilers themselves live in `crate::shares` and
//! `crate::grants`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer;

use crate::agent_api::AgentApi;
use crate::metrics::Metrics;
use crate::status::Transition;

/// Shared state of the Share and TrustGrant reconciles.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Calls agents' admin APIs.
    pub agents: Arc<dyn AgentApi>,
    /// Publishes Events (events.k8s.io/v1).
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Time source for lastTransitionTime (fixed in tests).
    pub clock: fn() -> Timestamp,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// A context with the real clock.
    pub fn new(
        client: Client,
        agents: Arc<dyn AgentApi>,
        recorder: Recorder,
        metrics: Metrics,
    ) -> Self {
        Self {
            client,
            agents,
            recorder,
            metrics,
            clock: Timestamp::now,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Server-side-applies `status` to the status of `obj` (a Share or a
    /// TrustGrant) as the operator's field manager, and counts the patch
    /// under `kind`.
    pub async fn apply_status<K, S>(&self, obj: &K, status: &S, kind: &str) -> Result<(), Error>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        S: serde::Serialize,
    {
        use kube::ResourceExt;
        let ns = obj
            .namespace()
            .ok_or(Error::MissingField("metadata.namespace"))?;
        let patch = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        });
        kube::Api::<K>::namespaced(self.client.clone(), &ns)
            .patch_status(
                &obj.name_any(),
                &kube::api::PatchParams::apply(crate::config::FIELD_MANAGER).force(),
                &kube::api::Patch::Apply(&patch),
            )
            .await?;
        self.metrics.status_patches.with_label_values(&[kind]).inc();
        Ok(())
    }

    /// Counts one more consecutive failure of `key`; returns the count.
    pub fn record_failure(&self, key: String) -> u32 {
        let mut m = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    /// Forgets the failures of `key` after a success.
    pub fn reset_failures(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Requeue after the agent of object `key` did not answer: 5 s, then
    /// doubling per consecutive time up to 5 minutes, so objects of an agent
    /// that never answers do not come back every 5 s (each such call may
    /// hold a worker for the whole call timeout).
    pub fn unreachable_requeue(&self, key: &str) -> Duration {
        let n = self.record_failure(format!("unreachable:{key}"));
        let exp = n.saturating_sub(1).min(6);
        Duration::from_secs((5u64 << exp).min(300))
    }

    /// The agent of object `key` answered: the next unreachable requeue
    /// starts at 5 s again.
    pub fn agent_answered(&self, key: &str) {
        self.reset_failures(&format!("unreachable:{key}"));
    }

    /// Runs one reconcile of `controller` (`share`, `trustgrant`) for the
    /// object `key`: records its duration and result, and forgets the
    /// object's failures when it succeeded.
    pub async fn measured(
        &self,
        controller: &str,
        key: &str,
        reconcile: impl std::future::Future<Output = Result<kube::runtime::controller::Action, Error>>,
    ) -> Result<kube::runtime::controller::Action, Error> {
        let start = std::time::Instant::now();
        let result = reconcile.await;
        self.metrics
            .duration
            .with_label_values(&[controller])
            .observe(start.elapsed().as_secs_f64());
        self.metrics
            .reconciles
            .with_label_values(&[controller, if result.is_ok() { "ok" } else { "error" }])
            .inc();
        if result.is_ok() {
            self.reset_failures(key);
        }
        result
    }

    /// After a failed reconcile of `controller` for `key`: counts the error
    /// and returns how long to wait (per-object exponential [`backoff`]).
    pub fn retry_delay(&self, controller: &str, key: String, err: &Error) -> Duration {
        let n = self.record_failure(key);
        self.metrics
            .errors
            .with_label_values(&[controller, &err.metric_reason()])
            .inc();
        backoff(n)
    }

    /// Publishes one Event; a failure is logged, never fails the reconcile.
    pub async fn publish(
        &self,
        obj: &k8s_openapi::api::core::v1::ObjectReference,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, obj).await {
            tracing::warn!(error = %e, reason, "cannot publish event");
        }
    }

    /// Publishes the Events of a status change.
    pub async fn publish_all(
        &self,
        obj: &k8s_openapi::api::core::v1::ObjectReference,
        ts: Vec<Transition>,
    ) {
        for t in ts {
            self.publish(obj, t.warning, &t.reason, t.note).await;
        }
    }
}

/// What a Share or TrustGrant reconcile can fail with (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or could not be reached.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An object from the API lacks a field the API always sets.
    #[error("object has no {0}")]
    MissingField(&'static str),
    /// Cleanup must wait (the agent must first stop serving or revoke).
    #[error("cleanup waits: {0}")]
    CleanupPending(String),
    /// Adding or removing the finalizer failed.
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// Short label for the errors metric.
    pub fn metric_reason(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(s)) if !s.reason.is_empty() => s.reason.clone(),
            Error::Kube(kube::Error::Api(s)) => format!("Http{}", s.code),
            Error::Kube(_) => "ApiUnreachable".into(),
            Error::MissingField(_) => "MissingField".into(),
            Error::CleanupPending(_) => "CleanupPending".into(),
            Error::Finalizer(_) => "Finalizer".into(),
        }
    }
}

impl From<finalizer::Error<Error>> for Error {
    fn from(e: finalizer::Error<Error>) -> Self {
        match e {
            finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
            finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e) => {
                Error::Kube(e)
            }
            other => Error::Finalizer(other.to_string()),
        }
    }
}

/// Exponential backoff after `failures` consecutive errors: 1 s, 2 s, 4 s …
/// capped at 2 minutes (a share or grant waiting on an agent heals fast).
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(7);
    Duration::from_secs((1u64 << exp).min(120))
}

/// Settings of the Share and TrustGrant loops.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// At most this many objects reconcile at once (per controller).
    pub concurrency: u16,
    /// Watch one namespace only (all when `None`).
    pub namespace: Option<String>,
    /// Coalesces triggers within this window.
    pub debounce: Duration,
}

//! The TrustGrant controller: the issuer Agent signs the grant and publishes
//! it to its repositories; deleting the TrustGrant publishes the revocation
//! before the finalizer is removed.
//!
//! Per reconcile, in this order (the mocked-API tests pin it down):
//! 0. the finalizer `caravan.dev/revoke` is added first (JSON patch);
//! 1. validate the spec (no API calls): `spec.issuer` is an object name and
//!    still the Agent recorded in `status.issuer` ([`plan::check_holder`]
//!    says why an edit is refused rather than followed);
//! 2. `GET` the issuer Agent; refuse a grant to the issuer itself;
//! 3. `GET` its identity Secret (admin token), `LIST` its pods (admin address);
//! 4. the first time, `status.issuer` is written (the holder, before the agent
//!    signs anything); then `PUT /v1/declared/grants/{uid}` on the issuer's
//!    agent: it signs once per key and spec (a retry returns the same grant;
//!    a changed subject, depth, scope or expiry revokes the old grant and
//!    signs a new one) and publishes;
//! 5. status (only when changed) and one Event per transition.
//!
//! On delete: `DELETE /v1/declared/grants/{uid}` on the holder (it signs and
//! publishes the revocation; repeating it is harmless) until the answer says
//! a repository stored the revocation; then the finalizer goes. An issuer
//! Agent that is gone cannot sign anything: the finalizer is released with a
//! Warning Event, and the grant lapses at its expiry.

pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::agent_api::CallError;
use crate::agentref::{self, Lookup};
use crate::conditions;
use crate::crd::{Agent, TrustGrant, TrustGrantStatus};
use crate::declared::{Context, Error, RunOptions};
use plan::{GrantInputError, Observation};

/// Finalizer on every TrustGrant: the revocation must be published first.
pub const FINALIZER: &str = "caravan.dev/revoke";
/// Requeue of a published grant (repairs a lost grant on the agent side).
pub const READY_REQUEUE: Duration = Duration::from_secs(120);
/// Requeue while waiting for the issuer or a repository.
pub const WAIT_REQUEUE: Duration = Duration::from_secs(5);
/// Requeue after bad input (edits and Agent changes trigger sooner).
pub const BAD_INPUT_REQUEUE: Duration = Duration::from_secs(30);

fn key(g: &TrustGrant) -> String {
    format!(
        "trustgrant/{}/{}",
        g.namespace().unwrap_or_default(),
        g.name_any()
    )
}

fn now_secs(ctx: &Context) -> u64 {
    u64::try_from((ctx.clock)().as_second()).unwrap_or(0)
}

/// Reconciles one TrustGrant; records metrics.
pub async fn reconcile(g: Arc<TrustGrant>, ctx: Arc<Context>) -> Result<Action, Error> {
    let k = key(&g);
    ctx.measured("trustgrant", &k, reconcile_grant(g, &ctx))
        .await
}

/// Retries a failed reconcile with per-object exponential backoff.
pub fn error_policy(g: Arc<TrustGrant>, err: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.retry_delay("trustgrant", key(&g), err);
    tracing::warn!(trustgrant = %g.name_any(), namespace = g.namespace().unwrap_or_default(),
        error = %err, retry_in = ?delay, "trust grant reconcile failed");
    Action::requeue(delay)
}

/// The finalizer wrapper around [`apply`] and [`cleanup`].
pub async fn reconcile_grant(g: Arc<TrustGrant>, ctx: &Context) -> Result<Action, Error> {
    let ns = g
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<TrustGrant> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, g, |ev| async move {
        match ev {
            FinalizerEvent::Apply(g) => apply(&g, ctx).await,
            FinalizerEvent::Cleanup(g) => cleanup(&g, ctx).await,
        }
    })
    .await
    .map_err(Error::from)
}

/// Steps 1–5 of the module docs.
pub async fn apply(g: &TrustGrant, ctx: &Context) -> Result<Action, Error> {
    let ns = g
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let uid = g.uid().ok_or(Error::MissingField("metadata.uid"))?;

    // 1. Validate (pure): also the issuer's name, before it goes into any
    // API path, and that it is still the issuer holding the grant.
    let decl = match plan::declared(&g.spec, now_secs(ctx)).and_then(|d| {
        plan::check_holder(g)?;
        Ok(d)
    }) {
        Ok(d) => d,
        Err(e) => return bad_input(g, ctx, &e).await,
    };

    // 2. The issuer.
    let Some(issuer) = agentref::agent(&ctx.client, &ns, &g.spec.issuer).await? else {
        let e = GrantInputError::IssuerNotFound(g.spec.issuer.clone());
        return bad_input(g, ctx, &e).await;
    };
    if let Some(id) = issuer.status.as_ref().and_then(|s| s.agent_id.as_deref())
        && let Err(e) =
            plan::check_not_self(&decl.subject, id).and_then(|()| plan::check_signer(g, id))
    {
        return bad_input(g, ctx, &e).await;
    }

    // 3. Its admin API.
    let endpoint = match agentref::endpoint(&ctx.client, &issuer).await? {
        Lookup::Ready { endpoint, .. } => endpoint,
        Lookup::Sleeping(_) if plan::settled(g) => {
            // The issuer is scaled to zero and the grant is signed and
            // published: nothing to do, the status stays.
            return Ok(Action::requeue(READY_REQUEUE));
        }
        Lookup::NotReady(m) | Lookup::Sleeping(m) => {
            update_status(g, ctx, &Observation::IssuerNotReady(&m)).await?;
            return Ok(Action::requeue(WAIT_REQUEUE));
        }
        Lookup::Missing => {
            let e = GrantInputError::IssuerNotFound(g.spec.issuer.clone());
            return bad_input(g, ctx, &e).await;
        }
    };

    // 4. Sign (once) and publish; the issuer is recorded first.
    let recorded;
    let g = if g.status.as_ref().and_then(|s| s.issuer.as_ref()).is_none() {
        recorded = record_holder(g, ctx).await?;
        &recorded
    } else {
        g
    };
    let answer = ctx.agents.put_grant(&endpoint, &uid, &decl).await;
    ctx.metrics
        .agent_calls
        .with_label_values(&["put_grant", label(&answer)])
        .inc();
    let (obs, requeue) = match &answer {
        Ok(r) if r.published => (Observation::Reported(r), READY_REQUEUE),
        Ok(r) => (Observation::Reported(r), WAIT_REQUEUE),
        Err(CallError::Refused { message, .. }) => {
            (Observation::AgentRefused(message), BAD_INPUT_REQUEUE)
        }
        Err(CallError::Unreachable(m)) | Err(CallError::Agent(m)) => (
            Observation::AgentUnreachable(m),
            ctx.unreachable_requeue(&key(g)),
        ),
    };
    if !matches!(answer, Err(CallError::Unreachable(_) | CallError::Agent(_))) {
        ctx.agent_answered(&key(g));
    }

    // 5. Status.
    update_status(g, ctx, &obs).await?;
    Ok(Action::requeue(requeue))
}

fn label<T>(r: &Result<T, CallError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(CallError::Refused { .. }) => "refused",
        Err(CallError::Unreachable(_)) => "unreachable",
        Err(CallError::Agent(_)) => "error",
    }
}

async fn bad_input(g: &TrustGrant, ctx: &Context, e: &GrantInputError) -> Result<Action, Error> {
    ctx.metrics
        .errors
        .with_label_values(&["trustgrant", e.reason()])
        .inc();
    tracing::info!(trustgrant = %g.name_any(), namespace = g.namespace().unwrap_or_default(),
        reason = e.reason(), "trust grant input needs fixing: {e}");
    update_status(g, ctx, &Observation::BadInput(e)).await?;
    Ok(Action::requeue(BAD_INPUT_REQUEUE))
}

/// Writes `status.issuer` (the Agent about to hold the grant) before the
/// first `PUT`, so a later edit of `spec.issuer` can never make the operator
/// forget which Agent must revoke it. Returns the grant with that status.
async fn record_holder(g: &TrustGrant, ctx: &Context) -> Result<TrustGrant, Error> {
    let mut g = g.clone();
    let mut st = g.status.clone().unwrap_or_default();
    st.issuer = Some(g.spec.issuer.clone());
    ctx.apply_status(&g, &st, "trustgrant").await?;
    g.status = Some(st);
    Ok(g)
}

async fn update_status(
    g: &TrustGrant,
    ctx: &Context,
    obs: &Observation<'_>,
) -> Result<TrustGrantStatus, Error> {
    let new = plan::compute(g.status.as_ref(), g.metadata.generation, obs, (ctx.clock)());
    if g.status.as_ref() == Some(&new) {
        return Ok(new);
    }
    ctx.apply_status(g, &new, "trustgrant").await?;
    let old = g
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    ctx.publish_all(
        &g.object_ref(&()),
        conditions::transitions(old, &new.conditions),
    )
    .await;
    Ok(new)
}

/// Publishes the revocation, then lets the finalizer go.
pub async fn cleanup(g: &TrustGrant, ctx: &Context) -> Result<Action, Error> {
    let ns = g
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let uid = g.uid().ok_or(Error::MissingField("metadata.uid"))?;
    // The Agent that signed it, whatever spec.issuer says now.
    let holder = g.holder();
    if crate::names::check_object_name("spec.issuer", holder).is_err() {
        // Never a valid name, so never asked to sign: nothing to revoke.
        return Ok(Action::await_change());
    }
    let named = agentref::agent(&ctx.client, &ns, holder).await?;
    let issuer = match plan::unrecorded_signer(g) {
        // A grant signed before the holder was recorded (an older
        // operator), whose spec.issuer is not the Agent that signed it:
        // that Agent, found by its id, revokes it.
        Some(id) if agentref::agent_id(named.as_ref()) != Some(id) => {
            agentref::agent_by_id(&ctx.client, &ns, id).await?
        }
        _ => named,
    };
    let issuer = match issuer {
        Some(a) => a,
        None => {
            if g.status.as_ref().is_some_and(|s| s.grant_id.is_some()) {
                ctx.publish(
                    &g.object_ref(&()),
                    true,
                    "IssuerGone",
                    format!(
                        "issuer Agent {holder} is gone and its key with it: the grant cannot be revoked and stays valid until it expires",
                    ),
                )
                .await;
            }
            return Ok(Action::await_change());
        }
    };
    match agentref::endpoint(&ctx.client, &issuer).await? {
        Lookup::Ready { endpoint, .. } => {
            let r = ctx.agents.delete_grant(&endpoint, &uid).await;
            ctx.metrics
                .agent_calls
                .with_label_values(&["delete_grant", label(&r)])
                .inc();
            let r = r.map_err(|e| Error::CleanupPending(e.to_string()))?;
            if !r.published {
                return Err(Error::CleanupPending(
                    "revocation signed but no repository stored it yet".into(),
                ));
            }
            if !r.revoked.is_empty() {
                ctx.publish(
                    &g.object_ref(&()),
                    false,
                    "Revoked",
                    format!("revocation of grant {} published", r.revoked.join(", ")),
                )
                .await;
            }
            Ok(Action::await_change())
        }
        Lookup::Missing => Ok(Action::await_change()),
        Lookup::NotReady(m) | Lookup::Sleeping(m) => Err(Error::CleanupPending(format!(
            "{m}; the revocation is published once the issuer is Ready"
        ))),
    }
}

/// Runs the TrustGrant controller until `shutdown` resolves; grants are also
/// reconciled when their issuer Agent changes.
pub async fn run(
    ctx: Arc<Context>,
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (grants, agents) = match &opts.namespace {
        Some(ns) => (
            Api::<TrustGrant>::namespaced(client.clone(), ns),
            Api::<Agent>::namespaced(client, ns),
        ),
        None => (
            Api::<TrustGrant>::all(client.clone()),
            Api::<Agent>::all(client),
        ),
    };
    let ctrl = Controller::new(grants, watcher::Config::default());
    let store = ctrl.store();
    ctrl.watches(agents, watcher::Config::default(), move |agent: Agent| {
        let ns = agent.namespace();
        let name = agent.name_any();
        store
            .state()
            .into_iter()
            .filter(|g| g.namespace() == ns && (g.holder() == name || g.spec.issuer == name))
            .map(|g| ObjectRef::from_obj(g.as_ref()))
            .collect::<Vec<_>>()
    })
    .with_config(
        controller::Config::default()
            .concurrency(opts.concurrency)
            .debounce(opts.debounce),
    )
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|res| async move {
        match res {
            Ok((obj, _)) => tracing::debug!(trustgrant = %obj.name, "reconciled"),
            Err(e) => tracing::debug!(error = %e, "trust grant reconcile loop"),
        }
    })
    .await;
}

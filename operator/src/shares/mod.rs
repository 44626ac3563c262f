//! The Share controller: dereference → validate → build → apply → status,
//! like the Agent controller, with a finalizer because the agent keeps
//! serving or following a share until it is told to stop.
//!
//! Per reconcile, in this order (the mocked-API tests pin it down):
//! 0. the finalizer `caravan.dev/share` is added first (JSON patch);
//! 1. validate the spec (no API calls): the names that go into API paths
//!    are object names, and `spec.agent` is still the Agent recorded in
//!    `status.agent` (the holder; [`plan::check_holder`] says why an edit is
//!    refused rather than followed);
//! 2. `GET` the Agent named by `spec.agent` (same namespace);
//! 3. subscribe with `ticketSecretRef`: `GET` that Secret; check the ticket
//!    (signature, recipient = the Agent's id) without any call;
//! 4. `GET` the Agent's identity Secret (admin token) and `LIST` its pods
//!    (the ready pod's IP is where the admin API answers);
//! 5. the first time, `status.agent` is written (the holder, before the agent
//!    hears of the share); then `PUT /v1/declared/shares/{name}` on the agent
//!    with the whole spec; the answer is the agent's status of that share;
//! 6. status (server-side apply on `/status`, only when it changed) and one
//!    Event per transition.
//!
//! On delete: `DELETE /v1/declared/shares/{name}` on the holder's agent (it stops
//! serving or following; files in storage stay), then the finalizer goes.
//! An Agent that is gone releases its Shares at once; one that is not Ready
//! holds the finalizer until it is (or is deleted).

pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};

use crate::agent_api::{CallError, DeclaredState, reasons};
use crate::agentref::{self, Lookup};
use crate::conditions;
use crate::crd::{Agent, AgentPhase, Share, ShareStatus};
use crate::declared::{Context, Error, RunOptions};
use plan::{Mode, Observation, ShareInputError, TicketSource};

/// Finalizer on every Share the operator has seen.
pub const FINALIZER: &str = "caravan.dev/share";

/// Requeue while publishing or fetching (live progress in status).
pub const PROGRESS_REQUEUE: Duration = Duration::from_secs(3);
/// Requeue of a Ready share (new versions show up in status this often).
pub const READY_REQUEUE: Duration = Duration::from_secs(20);
/// Requeue while the agent reports a failure (it retries by itself).
pub const DEGRADED_REQUEUE: Duration = Duration::from_secs(15);
/// Requeue while the Agent is not Ready or did not answer.
pub const WAIT_REQUEUE: Duration = Duration::from_secs(5);
/// Requeue after bad input (edits and Agent changes trigger sooner;
/// Secrets are not watched).
pub const BAD_INPUT_REQUEUE: Duration = Duration::from_secs(10);

fn key(share: &Share) -> String {
    format!(
        "share/{}/{}",
        share.namespace().unwrap_or_default(),
        share.name_any()
    )
}

/// Reconciles one Share; records metrics around [`reconcile_share`].
pub async fn reconcile(share: Arc<Share>, ctx: Arc<Context>) -> Result<Action, Error> {
    let k = key(&share);
    ctx.measured("share", &k, reconcile_share(share, &ctx))
        .await
}

/// Retries a failed reconcile with per-object exponential backoff.
pub fn error_policy(share: Arc<Share>, err: &Error, ctx: Arc<Context>) -> Action {
    let delay = ctx.retry_delay("share", key(&share), err);
    tracing::warn!(share = %share.name_any(), namespace = share.namespace().unwrap_or_default(),
        error = %err, retry_in = ?delay, "share reconcile failed");
    Action::requeue(delay)
}

/// The finalizer wrapper around [`apply`] and [`cleanup`].
pub async fn reconcile_share(share: Arc<Share>, ctx: &Context) -> Result<Action, Error> {
    let ns = share
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Share> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, share, |ev| async move {
        match ev {
            FinalizerEvent::Apply(s) => apply(&s, ctx).await,
            FinalizerEvent::Cleanup(s) => cleanup(&s, ctx).await,
        }
    })
    .await
    .map_err(Error::from)
}

/// Steps 1–6 of the module docs.
pub async fn apply(share: &Share, ctx: &Context) -> Result<Action, Error> {
    let ns = share
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = share.name_any();
    let generation = share.metadata.generation;

    // 1. Validate (pure): also the names that go into API paths, and that
    // spec.agent is still the Agent holding the share.
    let mode = match plan::check_spec(&share.spec).and_then(|m| {
        plan::check_holder(share)?;
        Ok(m)
    }) {
        Ok(m) => m,
        Err(e) => return bad_input(share, ctx, None, &e).await,
    };

    // 2. The Agent.
    let Some(agent) = agentref::agent(&ctx.client, &ns, &share.spec.agent).await? else {
        let e = ShareInputError::AgentNotFound(share.spec.agent.clone());
        return bad_input(share, ctx, Some(mode), &e).await;
    };
    let my_id = agent.status.as_ref().and_then(|s| s.agent_id.clone());
    if let Some(id) = &my_id
        && let Err(e) = plan::check_publisher(share, id)
    {
        return bad_input(share, ctx, Some(mode), &e).await;
    }

    // 3. The ticket, when subscribing with one.
    let mut ticket = None;
    if let Some(sub) = &share.spec.subscribe {
        let text = match plan::ticket_source(sub) {
            Ok(TicketSource::Inline(t)) => Some(t),
            Ok(TicketSource::Secret { name: sn, key: sk }) => {
                match read_ticket_secret(ctx, &ns, &sn, &sk).await? {
                    Ok(t) => Some(t),
                    Err(e) => return bad_input(share, ctx, Some(mode), &e).await,
                }
            }
            Ok(TicketSource::None) => None,
            Err(e) => return bad_input(share, ctx, Some(mode), &e).await,
        };
        if let Some(t) = &text
            && let Err(e) = plan::check_ticket(t, my_id.as_deref())
        {
            return bad_input(share, ctx, Some(mode), &e).await;
        }
        ticket = text.map(|t| t.trim().to_string());
    }

    // 4. Where the agent's admin API answers.
    let endpoint = match agentref::endpoint(&ctx.client, &agent).await? {
        Lookup::Ready { endpoint, .. } => endpoint,
        Lookup::Sleeping(_) if plan::settled(share) => {
            // Scaled to zero with nothing new to declare: the status stays
            // as it was (a published share stays Ready while its publisher
            // sleeps); a change of the Share wakes the Agent.
            return Ok(Action::requeue(READY_REQUEUE));
        }
        Lookup::NotReady(m) | Lookup::Sleeping(m) => {
            let obs = Observation::AgentNotReady(&m);
            update_status(share, ctx, Some(mode), &obs).await?;
            return Ok(Action::requeue(WAIT_REQUEUE));
        }
        Lookup::Missing => {
            let e = ShareInputError::AgentNotFound(share.spec.agent.clone());
            return bad_input(share, ctx, Some(mode), &e).await;
        }
    };

    // 5. Declare it on the agent.
    let decl = match plan::declared(&share.spec, ticket, generation.unwrap_or(0)) {
        Ok(d) => d,
        Err(e) => return bad_input(share, ctx, Some(mode), &e).await,
    };
    let recorded;
    let share = if share
        .status
        .as_ref()
        .and_then(|s| s.agent.as_ref())
        .is_none()
    {
        recorded = record_holder(share, ctx).await?;
        &recorded
    } else {
        share
    };
    let answer = ctx.agents.put_share(&endpoint, &name, &decl).await;
    ctx.metrics
        .agent_calls
        .with_label_values(&["put_share", call_label(&answer)])
        .inc();

    // 6. Status. A subscription that failed only because its publisher,
    // an Agent of this cluster, sleeps (scale to zero) is not a failure.
    let asleep = match &answer {
        Ok(r)
            if mode == Mode::Subscribe
                && r.state == DeclaredState::Failed
                && r.version > 0
                && r.reason.as_deref() == Some(reasons::PUBLISHER_UNREACHABLE) =>
        {
            match r.publisher.as_deref() {
                Some(p) => sleeping_publisher(ctx, &ns, p).await?,
                None => None,
            }
        }
        _ => None,
    };
    let (obs, requeue) = match &answer {
        Ok(r) if asleep.is_some() => (
            Observation::PublisherAsleep(r, asleep.as_deref().unwrap_or_default()),
            READY_REQUEUE,
        ),
        Ok(r) => (
            Observation::Reported(r),
            match r.state {
                crate::agent_api::DeclaredState::Ready => READY_REQUEUE,
                crate::agent_api::DeclaredState::Failed => DEGRADED_REQUEUE,
                _ => PROGRESS_REQUEUE,
            },
        ),
        Err(CallError::Refused { message, .. }) => {
            (Observation::AgentRefused(message), DEGRADED_REQUEUE)
        }
        Err(CallError::Unreachable(m)) | Err(CallError::Agent(m)) => (
            Observation::AgentUnreachable(m),
            ctx.unreachable_requeue(&key(share)),
        ),
    };
    if !matches!(answer, Err(CallError::Unreachable(_) | CallError::Agent(_))) {
        ctx.agent_answered(&key(share));
    }
    let before = share.status.as_ref().and_then(|s| s.version);
    let new = update_status(share, ctx, Some(mode), &obs).await?;
    if let Some(v) = new.version
        && before.is_some_and(|b| b != v)
    {
        let verb = if mode == Mode::Publish {
            "published"
        } else {
            "fetched"
        };
        ctx.publish(
            &share.object_ref(&()),
            false,
            "NewVersion",
            format!("version {v} {verb}"),
        )
        .await;
    }
    Ok(Action::requeue(requeue))
}

/// How to name the Agent of this cluster with agent id `id`, when it is
/// asleep (scaled to zero): `Agent NAME` when it is in namespace `ns` (the
/// subscriber's own), else "an Agent of another tenant" (another tenant's
/// namespace and names are not the subscriber's business). One `LIST` of
/// Agents, made only for a subscription that could not reach its publisher.
async fn sleeping_publisher(ctx: &Context, ns: &str, id: &str) -> Result<Option<String>, Error> {
    let agents = Api::<Agent>::all(ctx.client.clone())
        .list(&Default::default())
        .await?;
    Ok(agents
        .items
        .iter()
        .find(|a| {
            a.status.as_ref().is_some_and(|s| {
                s.agent_id.as_deref() == Some(id) && s.phase == Some(AgentPhase::Sleeping)
            })
        })
        .map(|a| {
            if a.namespace().as_deref() == Some(ns) {
                format!("Agent {}", a.name_any())
            } else {
                "an Agent of another tenant of this cluster".to_string()
            }
        }))
}

fn call_label<T>(r: &Result<T, CallError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(CallError::Refused { .. }) => "refused",
        Err(CallError::Unreachable(_)) => "unreachable",
        Err(CallError::Agent(_)) => "error",
    }
}

/// Reads the ticket from a Secret key: `Ok(Err(..))` is bad input.
async fn read_ticket_secret(
    ctx: &Context,
    ns: &str,
    name: &str,
    key: &str,
) -> Result<Result<String, ShareInputError>, Error> {
    let Some(s) = Api::<Secret>::namespaced(ctx.client.clone(), ns)
        .get_opt(name)
        .await?
    else {
        return Ok(Err(ShareInputError::SecretNotFound(format!(
            "ticket Secret {ns}/{name} not found; create it or fix spec.subscribe.ticketSecretRef"
        ))));
    };
    let Some(bytes) = s.data.as_ref().and_then(|d| d.get(key)) else {
        return Ok(Err(ShareInputError::SecretNotFound(format!(
            "ticket Secret {ns}/{name} has no key {key:?}"
        ))));
    };
    Ok(String::from_utf8(bytes.0.clone()).map_err(|_| {
        ShareInputError::TicketInvalid(format!("Secret {name} key {key} is not text"))
    }))
}

async fn bad_input(
    share: &Share,
    ctx: &Context,
    mode: Option<Mode>,
    e: &ShareInputError,
) -> Result<Action, Error> {
    ctx.metrics
        .errors
        .with_label_values(&["share", e.reason()])
        .inc();
    tracing::info!(share = %share.name_any(), namespace = share.namespace().unwrap_or_default(),
        reason = e.reason(), "share input needs fixing: {e}");
    update_status(share, ctx, mode, &Observation::BadInput(e)).await?;
    Ok(Action::requeue(BAD_INPUT_REQUEUE))
}

/// Writes `status.agent` (the Agent about to hold the share) before the
/// first `PUT`, so a later edit of `spec.agent` can never make the operator
/// forget which Agent must stop it. Returns the Share with that status.
async fn record_holder(share: &Share, ctx: &Context) -> Result<Share, Error> {
    let mut share = share.clone();
    let mut st = share.status.clone().unwrap_or_default();
    st.agent = Some(share.spec.agent.clone());
    ctx.apply_status(&share, &st, "share").await?;
    share.status = Some(st);
    Ok(share)
}

/// Computes the status, patches it only when it changed, publishes Events.
async fn update_status(
    share: &Share,
    ctx: &Context,
    mode: Option<Mode>,
    obs: &Observation<'_>,
) -> Result<ShareStatus, Error> {
    let new = plan::compute(
        share.status.as_ref(),
        share.metadata.generation,
        mode,
        obs,
        (ctx.clock)(),
    );
    if share.status.as_ref() == Some(&new) {
        return Ok(new);
    }
    ctx.apply_status(share, &new, "share").await?;
    let old = share
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    ctx.publish_all(
        &share.object_ref(&()),
        conditions::transitions(old, &new.conditions),
    )
    .await;
    Ok(new)
}

/// The agent stops serving or following the share; then the finalizer goes.
pub async fn cleanup(share: &Share, ctx: &Context) -> Result<Action, Error> {
    let ns = share
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = share.name_any();
    // The Agent that holds the share, whatever spec.agent says now.
    let holder = share.holder();
    if crate::names::check_object_name("spec.agent", holder).is_err() {
        // Never a valid name, so never declared anywhere: nothing to stop.
        return Ok(Action::await_change());
    }
    let named = agentref::agent(&ctx.client, &ns, holder).await?;
    let agent = match plan::unrecorded_publisher(share) {
        // Published before the holder was recorded (an older operator),
        // and spec.agent is not the Agent that publishes it: that Agent,
        // found by its id, stops it.
        Some(id) if agentref::agent_id(named.as_ref()) != Some(id) => {
            agentref::agent_by_id(&ctx.client, &ns, id).await?
        }
        _ => named,
    };
    let Some(agent) = agent else {
        tracing::info!(share = %name, namespace = %ns, "Agent gone; nothing to stop");
        return Ok(Action::await_change());
    };
    match agentref::endpoint(&ctx.client, &agent).await? {
        Lookup::Ready { endpoint, .. } => {
            let r = ctx.agents.delete_share(&endpoint, &name).await;
            ctx.metrics
                .agent_calls
                .with_label_values(&["delete_share", call_label(&r)])
                .inc();
            r.map_err(|e| Error::CleanupPending(e.to_string()))?;
            ctx.publish(
                &share.object_ref(&()),
                false,
                "Stopped",
                format!(
                    "Agent {} stopped {} the share",
                    agent.name_any(),
                    if share.spec.publish.is_some() {
                        "serving"
                    } else {
                        "following"
                    }
                ),
            )
            .await;
            Ok(Action::await_change())
        }
        Lookup::Missing => Ok(Action::await_change()),
        // Never declared on any Agent (a declaration records its Agent in
        // the status, and none is recorded): nothing to stop, so the
        // deletion does not wait for an Agent that may never be Ready.
        Lookup::NotReady(_) | Lookup::Sleeping(_) if !plan::ever_declared(share) => {
            tracing::info!(share = %name, namespace = %ns, "never declared; nothing to stop");
            Ok(Action::await_change())
        }
        Lookup::NotReady(m) | Lookup::Sleeping(m) => Err(Error::CleanupPending(format!(
            "{m}; the share is released once the Agent is Ready (or deleted)"
        ))),
    }
}

/// Runs the Share controller until `shutdown` resolves. Shares are also
/// reconciled when their Agent changes (becomes Ready, gets an id, goes).
pub async fn run(
    ctx: Arc<Context>,
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (shares, agents) = match &opts.namespace {
        Some(ns) => (
            Api::<Share>::namespaced(client.clone(), ns),
            Api::<Agent>::namespaced(client, ns),
        ),
        None => (Api::<Share>::all(client.clone()), Api::<Agent>::all(client)),
    };
    let ctrl = Controller::new(shares, watcher::Config::default());
    let store = ctrl.store();
    ctrl.watches(agents, watcher::Config::default(), move |agent: Agent| {
        let ns = agent.namespace();
        let name = agent.name_any();
        store
            .state()
            .into_iter()
            .filter(|s| s.namespace() == ns && (s.holder() == name || s.spec.agent == name))
            .map(|s| ObjectRef::from_obj(s.as_ref()))
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
            Ok((obj, _)) => tracing::debug!(share = %obj.name, "reconciled"),
            Err(e) => tracing::debug!(error = %e, "share reconcile loop"),
        }
    })
    .await;
}

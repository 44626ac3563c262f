//! The Agent controller: dereference → validate → build → apply → status,
//! in the style of kube-rs' controller-rs and the Stackable operators.
//!
//! Per reconcile, in this order (the mocked-API tests pin it down):
//! 1. validate the spec (no API calls); a bad spec is reported and nothing
//!    is touched, so a running agent keeps its last good configuration;
//! 2. `GET` the credentials Secret (existence and key names only);
//! 3. `GET` the identity Secret, or `POST` a new one (never `PUT`/apply:
//!    a create that loses a race gets 409 and re-reads, so a key is never
//!    replaced);
//! 4. server-side apply the Service (its ClusterIP joins the advertised
//!    addresses), the ConfigMap, Deployment and NetworkPolicy;
//! 5. compute status from the applied Deployment and patch it only if it
//!    changed, publishing an Event per transition.
//!
//! Secrets are not watched (that would need cluster-wide list/watch on every
//! tenant's Secrets): an Agent waiting for its credentials Secret is
//! re-checked every [`SECRET_RECHECK`].

use caravan_agent::daemon::api::{STARTING, WAITING_FOR_STORAGE};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use caravan_agent::identity::SecretKey;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::agent_api::{AgentApi, AgentEndpoint};
use crate::agentref;
use crate::children::{self, BuildInput};
use crate::config::{FIELD_MANAGER, OperatorConfig, paths};
use crate::crd::{Agent, AgentStatus, ScaleToZeroSpec, Share, TrustGrant};
use crate::metrics::Metrics;
use crate::names::{self, AGENT_LABEL, ChildNames};
use crate::sleep::{self, Decision};
use crate::status::{self, Observation};
use crate::validate::{self, InputError};

/// How often an Agent waiting for its credentials Secret looks again.
pub const SECRET_RECHECK: Duration = Duration::from_secs(10);
/// Periodic resync of a healthy Agent (repairs drift the watches missed).
pub const RESYNC: Duration = Duration::from_secs(300);
/// Resync while the pod rolls out or another Agent's identity is collected.
pub const SHORT_RESYNC: Duration = Duration::from_secs(5);
/// For this long after its Deployment last made progress, an Agent rolling
/// out is looked at every [`SHORT_RESYNC`]: a pod that crashes (a misspelt
/// storage option) or waits for storage that does not answer does so
/// within seconds of starting, and is reported then, not up to a minute
/// later. After it, every [`ROLLOUT_RESYNC`], so many Agents rolling out at
/// once (an operator upgrade) are not each polled every few seconds until
/// their progress deadline.
pub const ROLLOUT_WATCH: Duration = Duration::from_secs(120);
/// Resync of an Agent rolling out, crashing or waiting for its storage.
pub const ROLLOUT_RESYNC: Duration = Duration::from_secs(60);

/// What a reconcile can fail with (transient: retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or could not be reached.
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An object from the API lacks a field the API always sets.
    #[error("object has no {0}")]
    MissingField(&'static str),
    /// The operating system's random source failed.
    #[error("cannot generate an identity: {0}")]
    Identity(String),
    /// The agent config could not be rendered.
    #[error("cannot render agent.toml: {0}")]
    Render(String),
}

impl Error {
    /// Short label for the errors metric.
    pub fn metric_reason(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(s)) if !s.reason.is_empty() => s.reason.clone(),
            Error::Kube(kube::Error::Api(s)) => format!("Http{}", s.code),
            Error::Kube(_) => "ApiUnreachable".into(),
            Error::MissingField(_) => "MissingField".into(),
            Error::Identity(_) => "IdentityGeneration".into(),
            Error::Render(_) => "RenderConfig".into(),
        }
    }
}

/// Shared state of all reconciles.
pub struct Context {
    /// Kubernetes client.
    pub client: Client,
    /// Operator-wide settings.
    pub cfg: OperatorConfig,
    /// Publishes Events (events.k8s.io/v1).
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Time source for lastTransitionTime (fixed in tests).
    pub clock: fn() -> Timestamp,
    /// The agents' admin API, asked for activity (scale to zero); without
    /// it an agent is never put to sleep.
    pub agents: Option<Arc<dyn AgentApi>>,
    /// The one namespace watched (all when `None`): where Shares that may
    /// need a sleeping publisher are looked for.
    pub watch_namespace: Option<String>,
    /// Consecutive failures per Agent, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<Agent>, u32>>,
}

impl Context {
    /// A context with the real clock.
    pub fn new(client: Client, cfg: OperatorConfig, recorder: Recorder, metrics: Metrics) -> Self {
        Self {
            client,
            cfg,
            recorder,
            metrics,
            clock: Timestamp::now,
            agents: None,
            watch_namespace: None,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Enables scale to zero: the agents' admin API for their activity, and
    /// the namespace watched (`None`: all).
    pub fn with_agent_api(mut self, agents: Arc<dyn AgentApi>, namespace: Option<String>) -> Self {
        self.agents = Some(agents);
        self.watch_namespace = namespace;
        self
    }

    fn record_failure(&self, key: ObjectRef<Agent>) -> u32 {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn reset_failures(&self, key: &ObjectRef<Agent>) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// Exponential backoff after `failures` consecutive errors: 1s, 2s, 4s…
/// capped at 5 minutes, so a broken API server is not hammered.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(9);
    Duration::from_secs((1u64 << exp).min(300))
}

/// Reconciles one Agent; records metrics around [`reconcile_agent`].
pub async fn reconcile(agent: Arc<Agent>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let result = reconcile_agent(&agent, &ctx).await;
    ctx.metrics
        .duration
        .with_label_values(&["agent"])
        .observe(start.elapsed().as_secs_f64());
    let label = match &result {
        Ok(Outcome::Healthy(_)) => "ok",
        Ok(Outcome::BadInput(_)) => "input_error",
        Err(_) => "error",
    };
    ctx.metrics
        .reconciles
        .with_label_values(&["agent", label])
        .inc();
    if result.is_ok() {
        ctx.reset_failures(&ObjectRef::from_obj(agent.as_ref()));
    }
    result.map(Outcome::action)
}

/// How a reconcile ended, before it becomes an [`Action`].
#[derive(Debug)]
pub enum Outcome {
    /// Everything applied; check again after this long.
    Healthy(Duration),
    /// The input is wrong and was reported; check again after this long.
    BadInput(Duration),
}

impl Outcome {
    fn action(self) -> Action {
        match self {
            Outcome::Healthy(d) | Outcome::BadInput(d) => Action::requeue(d),
        }
    }
}

/// Retries a failed reconcile with per-Agent exponential backoff.
pub fn error_policy(agent: Arc<Agent>, err: &Error, ctx: Arc<Context>) -> Action {
    let n = ctx.record_failure(ObjectRef::from_obj(agent.as_ref()));
    ctx.metrics
        .errors
        .with_label_values(&["agent", &err.metric_reason()])
        .inc();
    let delay = backoff(n);
    tracing::warn!(
        agent = %agent.name_any(),
        namespace = agent.namespace().unwrap_or_default(),
        error = %err,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// The reconcile proper.
pub async fn reconcile_agent(agent: &Agent, ctx: &Context) -> Result<Outcome, Error> {
    let ns = agent
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = agent.name_any();
    if agent.metadata.deletion_timestamp.is_some() {
        // Children carry owner references; the garbage collector removes them.
        return Ok(Outcome::Healthy(RESYNC));
    }
    let names = ChildNames::for_agent(&name);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);

    // 1. Validate and render the agent config (pure).
    let config = match validate::agent_config(&name, &ns, &agent.spec, &ctx.cfg) {
        Ok(c) => c,
        Err(e) => return report_input(agent, ctx, &e, RESYNC).await,
    };
    let config_toml = config.to_toml().map_err(|e| Error::Render(e.to_string()))?;

    // 2. The credentials Secret: present, and its keys make sense.
    let mut credentials_version = None;
    if let Some(sr) = &agent.spec.storage.secret_ref {
        match secrets.get_opt(&sr.name).await? {
            None => {
                let e = InputError::SecretNotFound {
                    namespace: ns.clone(),
                    name: sr.name.clone(),
                };
                return report_input(agent, ctx, &e, SECRET_RECHECK).await;
            }
            Some(s) => {
                let keys: BTreeSet<String> = s
                    .data
                    .iter()
                    .flat_map(|d| d.keys())
                    .chain(s.string_data.iter().flat_map(|d| d.keys()))
                    .cloned()
                    .collect();
                if let Err(e) =
                    validate::check_credentials(&agent.spec.storage.options, &sr.name, &keys)
                        .and_then(|()| {
                            validate::check_secret_location_keys(
                                &agent.spec.storage.scheme,
                                &sr.name,
                                &keys,
                            )
                        })
                        .and_then(|()| {
                            validate::check_node_credentials(
                                &agent.spec.storage.scheme,
                                &keys,
                                &format!("Secret {}", sr.name),
                                &ctx.cfg,
                            )
                        })
                {
                    return report_input(agent, ctx, &e, SECRET_RECHECK).await;
                }
                credentials_version = s.metadata.resource_version.clone();
            }
        }
    }

    let input = BuildInput {
        agent,
        namespace: &ns,
        config_toml: &config_toml,
        credentials_version: credentials_version.as_deref(),
        cfg: &ctx.cfg,
    };

    // 3. The identity: read it, or create it exactly once.
    let mut admin_token = None;
    let agent_id = match secrets.get_opt(&names.identity).await? {
        Some(s) => {
            admin_token = agentref::admin_token(&s);
            if let Some(owner) = foreign_owner(agent, &s) {
                tracing::info!(agent = %name, namespace = %ns, %owner,
                    "identity Secret still belongs to a deleted Agent of the same name; waiting for garbage collection");
                return Ok(Outcome::Healthy(SHORT_RESYNC));
            }
            match identity_of(&s) {
                Ok(id) => {
                    // A kept identity (`spec.keepIdentity`) taken up by a
                    // new Agent of its name: said once, when this Agent
                    // first gets an id, so nobody is surprised by it.
                    let made_for = s
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(children::KEPT_FOR_UID));
                    let fresh = agent.status.as_ref().is_none_or(|st| st.agent_id.is_none());
                    if fresh
                        && s.metadata
                            .owner_references
                            .as_ref()
                            .is_none_or(Vec::is_empty)
                        && made_for.is_some_and(|uid| Some(uid) != agent.metadata.uid.as_ref())
                    {
                        tracing::info!(agent = %name, namespace = %ns, agent_id = %id, "took up a kept identity");
                        publish(
                            ctx,
                            agent,
                            false,
                            "IdentityReused",
                            format!(
                                "took up the identity {id} kept from an earlier Agent of this name (Secret {}); delete that Secret to start afresh",
                                names.identity
                            ),
                        )
                        .await;
                    }
                    id
                }
                Err(reason) => {
                    let obs = Observation::IdentityCorrupt {
                        secret: &names.identity,
                        reason,
                    };
                    return report(agent, ctx, None, &obs, RESYNC).await;
                }
            }
        }
        None if agent.status.as_ref().is_some_and(|s| s.agent_id.is_some()) => {
            let obs = Observation::IdentityLost {
                secret: &names.identity,
            };
            return report(agent, ctx, None, &obs, RESYNC).await;
        }
        None => create_identity(agent, ctx, &secrets, &input).await?,
    };

    // 3b. Scale to zero: should the pod run? (Only with spec.scaleToZero,
    // so Agents without it make exactly the calls they always made.)
    let sleep = match &agent.spec.scale_to_zero {
        Some(stz) => {
            Some(plan_sleep(agent, ctx, &ns, &name, &agent_id, admin_token.clone(), stz).await?)
        }
        None => None,
    };

    // 4. Apply the children: the Service first, so the agent can advertise
    // its ClusterIP beside the DNS name (clusters without DNS, like the
    // local one, dial the IP); then the config, so a new pod starts with it.
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let client = ctx.client.clone();
    let svc = match Api::<Service>::namespaced(client.clone(), &ns)
        .patch(
            &names.workload,
            &pp,
            &Patch::Apply(&children::service(&input)),
        )
        .await
    {
        Ok(s) => s,
        Err(e) => return child_refused(agent, ctx, "Service", &names.workload, e).await,
    };
    let addresses =
        children::advertise_addresses(&svc, &names.endpoint(&ns), &agent.spec.exposure.advertise);
    let mut config = config;
    config.advertise = addresses.clone();
    let config_toml = config.to_toml().map_err(|e| Error::Render(e.to_string()))?;
    let input = BuildInput {
        config_toml: &config_toml,
        ..input
    };
    if let Err(e) = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .patch(
            &names.config,
            &pp,
            &Patch::Apply(&children::config_map(&input)),
        )
        .await
    {
        return child_refused(agent, ctx, "ConfigMap", &names.config, e).await;
    }
    let dep = match Api::<Deployment>::namespaced(client.clone(), &ns)
        .patch(
            &names.workload,
            &pp,
            &Patch::Apply(&children::scaled_deployment(
                &input,
                sleep.as_ref().map_or(1, Decision::replicas),
            )),
        )
        .await
    {
        Ok(d) => d,
        Err(e) => return child_refused(agent, ctx, "Deployment", &names.workload, e).await,
    };
    if let Err(e) = Api::<NetworkPolicy>::namespaced(client, &ns)
        .patch(
            &names.workload,
            &pp,
            &Patch::Apply(&children::network_policy(&input)),
        )
        .await
    {
        return child_refused(agent, ctx, "NetworkPolicy", &names.workload, e).await;
    }

    // 5. Status. While the rollout waits, the newest pod says whether it
    // is only slow or will not come up (a crash loop, an image that
    // cannot be pulled): then the Agent is Degraded with the reason. A pod
    // that runs but is not ready is asked why (its admin API answers while
    // the agent waits for its storage, with the storage's last error).
    let (trouble, storage) = match (&sleep, status::rollout(&dep)) {
        (Some(d), _) if !d.awake => (None, None),
        (_, status::Rollout::InProgress(_)) => {
            pod_state(ctx, &ns, &name, admin_token.as_deref()).await
        }
        _ => (None, None),
    };
    let obs = match (&sleep, &trouble, &storage) {
        (Some(d), _, _) if !d.awake => Observation::Sleeping(&d.message),
        (_, Some(why), _) => Observation::Crashing(why),
        (_, None, Some(why)) => Observation::StorageUnreachable(why),
        _ => Observation::Applied(&dep),
    };
    let young = || status::since_progress(&dep, (ctx.clock)()).is_none_or(|d| d < ROLLOUT_WATCH);
    let mut resync = match status::rollout(&dep) {
        status::Rollout::Ready => RESYNC,
        // The watches see the Deployment, not its pods: a pod that crashes
        // or waits for its storage is looked for, soon after it starts.
        status::Rollout::InProgress(_) if trouble.is_none() && storage.is_none() && young() => {
            SHORT_RESYNC
        }
        _ => ROLLOUT_RESYNC,
    };
    if let Some(d) = &sleep {
        // Asleep, the (empty) rollout says nothing: wake when work is due.
        resync = if d.awake {
            resync.min(d.requeue)
        } else {
            d.requeue
        };
    }
    let mut new = status::compute(
        agent.status.as_ref(),
        agent.metadata.generation,
        Some(agent_id),
        Some(names.endpoint(&ns)),
        &obs,
        (ctx.clock)(),
    );
    new.addresses = addresses;
    if let Some(d) = &sleep {
        sleep::apply(
            &mut new,
            agent.status.as_ref(),
            d,
            agent.metadata.generation,
            (ctx.clock)(),
        );
    }
    update_status(agent, ctx, new).await?;
    Ok(Outcome::Healthy(resync))
}

/// [`status::pod_trouble`] of the Agent's pods (a label-selected `LIST`),
/// and else, when the newest pod runs but is not ready, what its agent
/// waits for if that is its storage ([`storage_wait`]). Neither when the
/// pods cannot be listed (the status then says "rolling out", as before,
/// and the next reconcile looks again).
async fn pod_state(
    ctx: &Context,
    ns: &str,
    name: &str,
    token: Option<&str>,
) -> (Option<String>, Option<String>) {
    let lp = ListParams::default().labels(&format!("{AGENT_LABEL}={name}"));
    let pods = match Api::<Pod>::namespaced(ctx.client.clone(), ns)
        .list(&lp)
        .await
    {
        Ok(pods) => pods.items,
        Err(e) => {
            tracing::debug!(%ns, %name, error = %e, "cannot list the agent's pods");
            return (None, None);
        }
    };
    if let Some(t) = status::pod_trouble(&pods) {
        return (Some(t), None);
    }
    let (Some(ip), Some(token), Some(api)) =
        (agentref::waiting_pod_ip(&pods), token, ctx.agents.as_ref())
    else {
        return (None, None);
    };
    let ep = AgentEndpoint {
        base: agentref::admin_base(&ip),
        token: token.to_string(),
    };
    let answer = api.activity(&ep).await;
    ctx.metrics
        .agent_calls
        .with_label_values(&["activity", if answer.is_ok() { "ok" } else { "error" }])
        .inc();
    (None, storage_wait(answer.err()))
}

/// What a starting agent said it waits for, when that is storage that does
/// not answer (the agent's admin API says so with 503 until its storage
/// answers, then exits after 10 minutes); `None` for any other answer
/// (starting normally, loading its state, not reached at all).
pub fn storage_wait(err: Option<crate::agent_api::CallError>) -> Option<String> {
    match err {
        Some(crate::agent_api::CallError::Unreachable(m)) if m.contains(WAITING_FOR_STORAGE) => {
            let m = m
                .strip_prefix(STARTING)
                .and_then(|m| m.strip_prefix(": "))
                .unwrap_or(&m);
            Some(format!("the agent is {m}"))
        }
        _ => None,
    }
}

/// Gathers the inputs of the scale-to-zero decision: `LIST` Shares (the
/// watched namespaces: subscribers anywhere may need this publisher),
/// `LIST` TrustGrants of the namespace, and, while the agent is awake and
/// nothing in the cluster already needs it, `LIST` its pods and `GET
/// /v1/activity` from the ready one.
async fn plan_sleep(
    agent: &Agent,
    ctx: &Context,
    ns: &str,
    name: &str,
    agent_id: &str,
    token: Option<String>,
    stz: &ScaleToZeroSpec,
) -> Result<Decision, Error> {
    let idle_after = sleep::idle_after(stz).unwrap_or(Duration::from_secs(900));
    let client = ctx.client.clone();
    let shares = match &ctx.watch_namespace {
        Some(w) => Api::<Share>::namespaced(client.clone(), w),
        None => Api::<Share>::all(client.clone()),
    }
    .list(&Default::default())
    .await?
    .items;
    let grants = Api::<TrustGrant>::namespaced(client.clone(), ns)
        .list(&Default::default())
        .await?
        .items;
    let work = sleep::cluster_work(ns, name, Some(agent_id), &shares, &grants);
    let mut report = None;
    if work.is_none()
        && !sleep::sleeping(agent.status.as_ref())
        && let (Some(token), Some(api)) = (token, ctx.agents.as_ref())
        && let Some(ip) = agentref::ready_pod_ip(&client, ns, name).await?
    {
        let ep = AgentEndpoint {
            base: agentref::admin_base(&ip),
            token,
        };
        let answer = api.activity(&ep).await;
        ctx.metrics
            .agent_calls
            .with_label_values(&["activity", if answer.is_ok() { "ok" } else { "error" }])
            .inc();
        match answer {
            Ok(r) => report = Some(r),
            Err(e) => tracing::info!(agent = %name, namespace = %ns, error = %e,
                "no activity report; the agent stays awake"),
        }
    }
    Ok(sleep::decide(&sleep::Inputs {
        now: (ctx.clock)(),
        idle_after,
        previous: agent.status.as_ref(),
        work: work.as_ref(),
        report: report.as_ref(),
    }))
}

/// The uid of a *different* Agent that controls `secret`, if any.
fn foreign_owner(agent: &Agent, secret: &Secret) -> Option<String> {
    let mine = agent.metadata.uid.as_deref()?;
    secret
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "Agent")
        .filter(|o| o.uid != mine)
        .map(|o| o.uid.clone())
}

/// The agent id stored in an identity Secret (the key itself is dropped
/// right away and never logged).
pub fn identity_of(secret: &Secret) -> Result<String, String> {
    let raw = secret
        .data
        .as_ref()
        .and_then(|d| d.get(paths::IDENTITY_KEY))
        .ok_or_else(|| format!("key {} is missing", paths::IDENTITY_KEY))?;
    let text = std::str::from_utf8(&raw.0).map_err(|_| "key is not UTF-8".to_string())?;
    let key = SecretKey::from_text(text).map_err(|e| e.to_string())?;
    Ok(key.agent_id().to_string())
}

/// 32 random bytes, hex: the agent's admin API bearer token.
pub fn admin_token() -> Result<String, Error> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| Error::Identity(e.to_string()))?;
    Ok(data_encoding::HEXLOWER.encode(&b))
}

async fn create_identity(
    agent: &Agent,
    ctx: &Context,
    secrets: &Api<Secret>,
    input: &BuildInput<'_>,
) -> Result<String, Error> {
    let key = SecretKey::generate().map_err(|e| Error::Identity(e.to_string()))?;
    let token = admin_token()?;
    let secret = children::identity_secret(input, &key.to_text(), &token);
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match secrets.create(&pp, &secret).await {
        Ok(_) => {
            let id = key.agent_id().to_string();
            tracing::info!(agent = %agent.name_any(), agent_id = %id, "created identity");
            publish(
                ctx,
                agent,
                false,
                "IdentityCreated",
                format!("generated agent identity {id}"),
            )
            .await;
            Ok(id)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            // Someone (a previous leader) created it first: theirs stands.
            let existing = secrets
                .get(&ChildNames::for_agent(&agent.name_any()).identity)
                .await?;
            identity_of(&existing).map_err(Error::Identity)
        }
        Err(e) => Err(e.into()),
    }
}

/// The input error for a child the API server refused as invalid (`422
/// Invalid`, or `400 BadRequest`): what the operator built from the spec
/// does not validate, so the spec is at fault (a field `podspec` does not
/// check yet). Any other error is transient.
pub fn refused_child(kind: &str, name: &str, e: &kube::Error) -> Option<InputError> {
    match e {
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => {
            Some(InputError::InvalidSpec(format!(
                "the API server refused the {kind} {name} built from this spec: {}",
                crate::agent_api::bounded(&s.message)
            )))
        }
        _ => None,
    }
}

/// Reports a refused child like bad input (`InvalidSpec`, Ready false, a
/// Warning Event, the next look after [`RESYNC`] or an edit); any other
/// error goes to the backoff.
async fn child_refused(
    agent: &Agent,
    ctx: &Context,
    kind: &str,
    name: &str,
    e: kube::Error,
) -> Result<Outcome, Error> {
    match refused_child(kind, name, &e) {
        Some(input) => report_input(agent, ctx, &input, RESYNC).await,
        None => Err(e.into()),
    }
}

async fn report_input(
    agent: &Agent,
    ctx: &Context,
    err: &InputError,
    requeue: Duration,
) -> Result<Outcome, Error> {
    ctx.metrics
        .errors
        .with_label_values(&["agent", err.reason()])
        .inc();
    tracing::info!(agent = %agent.name_any(), namespace = agent.namespace().unwrap_or_default(),
        reason = err.reason(), "agent input needs fixing: {err}");
    let obs = Observation::BadInput(err);
    report(agent, ctx, None, &obs, requeue).await?;
    Ok(Outcome::BadInput(requeue))
}

async fn report(
    agent: &Agent,
    ctx: &Context,
    agent_id: Option<String>,
    obs: &Observation<'_>,
    requeue: Duration,
) -> Result<Outcome, Error> {
    let new = status::compute(
        agent.status.as_ref(),
        agent.metadata.generation,
        agent_id,
        None,
        obs,
        (ctx.clock)(),
    );
    update_status(agent, ctx, new).await?;
    Ok(Outcome::BadInput(requeue))
}

/// Patches status only when it differs from what is stored, then publishes
/// one Event per transition.
async fn update_status(agent: &Agent, ctx: &Context, new: AgentStatus) -> Result<(), Error> {
    if agent.status.as_ref() == Some(&new) {
        return Ok(());
    }
    let ns = agent
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let api: Api<Agent> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "apiVersion": Agent::api_version(&()),
        "kind": Agent::kind(&()),
        "status": new,
    });
    api.patch_status(
        &agent.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    ctx.metrics
        .status_patches
        .with_label_values(&["agent"])
        .inc();
    for t in status::transitions(agent.status.as_ref(), &new) {
        publish(ctx, agent, t.warning, &t.reason, t.note).await;
    }
    Ok(())
}

/// Publishes an Event; a failure is logged, never fails the reconcile.
async fn publish(ctx: &Context, agent: &Agent, warning: bool, reason: &str, note: String) {
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
    if let Err(e) = ctx.recorder.publish(&ev, &agent.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "cannot publish event");
    }
}

/// The Agents with `spec.scaleToZero` a Share concerns: its own Agent, and
/// the publisher it subscribes to when that is an Agent of this cluster.
pub fn sleepers_for_share(agents: &[Arc<Agent>], s: &Share) -> Vec<ObjectRef<Agent>> {
    let ns = s.namespace();
    let publisher = sleep::subscription(&s.spec, s).and_then(|(p, _)| p);
    agents
        .iter()
        .filter(|a| a.spec.scale_to_zero.is_some())
        .filter(|a| {
            (a.namespace() == ns && a.name_any() == s.holder())
                || publisher.is_some()
                    && a.status.as_ref().and_then(|st| st.agent_id.as_ref()) == publisher.as_ref()
        })
        .map(|a| ObjectRef::from_obj(a.as_ref()))
        .collect()
}

/// Settings of the controller loop.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// At most this many Agents reconcile at once.
    pub concurrency: u16,
    /// Watch one namespace only (all when `None`).
    pub namespace: Option<String>,
    /// Coalesces triggers for one Agent within this window: applying four
    /// children fires four owned-object events, which need one reconcile.
    pub debounce: Duration,
}

/// Runs the Agent controller until `shutdown` resolves; in-flight reconciles
/// finish first.
pub async fn run(
    ctx: Arc<Context>,
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let (agents, deps, cms, svcs, nps) = match &opts.namespace {
        Some(ns) => (
            Api::<Agent>::namespaced(client.clone(), ns),
            Api::<Deployment>::namespaced(client.clone(), ns),
            Api::<ConfigMap>::namespaced(client.clone(), ns),
            Api::<Service>::namespaced(client.clone(), ns),
            Api::<NetworkPolicy>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::<Agent>::all(client.clone()),
            Api::<Deployment>::all(client.clone()),
            Api::<ConfigMap>::all(client.clone()),
            Api::<Service>::all(client.clone()),
            Api::<NetworkPolicy>::all(client.clone()),
        ),
    };
    let (shares, grants) = match &opts.namespace {
        Some(ns) => (
            Api::<Share>::namespaced(client.clone(), ns),
            Api::<TrustGrant>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::<Share>::all(client.clone()),
            Api::<TrustGrant>::all(client.clone()),
        ),
    };
    let owned = watcher::Config::default().labels(&names::managed_selector());
    let ctrl = Controller::new(agents, watcher::Config::default());
    let (by_share, by_grant, all) = (ctrl.store(), ctrl.store(), ctrl.store());
    // The `agents{phase}` gauge, recounted from the cache (deleted Agents
    // drop out by themselves).
    let metrics = ctx.metrics.clone();
    let counter = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(15));
        loop {
            tick.tick().await;
            let state = all.state();
            metrics.count_agents(state.iter().map(|a| a.as_ref()));
        }
    });
    ctrl.owns(deps, owned.clone())
        .owns(cms, owned.clone())
        .owns(svcs, owned.clone())
        .owns(nps, owned)
        // Scale to zero: a Share or TrustGrant change wakes the Agents it
        // concerns (only those with spec.scaleToZero are triggered).
        .watches(shares, watcher::Config::default(), move |s: Share| {
            sleepers_for_share(&by_share.state(), &s)
        })
        .watches(grants, watcher::Config::default(), move |g: TrustGrant| {
            let ns = g.namespace();
            by_grant
                .state()
                .into_iter()
                .filter(|a| {
                    a.spec.scale_to_zero.is_some()
                        && a.namespace() == ns
                        && a.name_any() == g.holder()
                })
                .map(|a| ObjectRef::from_obj(a.as_ref()))
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
                Ok((obj, _)) => tracing::debug!(agent = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile loop"),
            }
        })
        .await;
    counter.abort();
}

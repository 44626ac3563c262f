//! Pure computation of an Agent's status from what the reconciler observed,
//! and of the Events that mark transitions. Kept free of I/O so every
//! combination is a unit test.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

pub use crate::conditions::{DEGRADED, PROGRESSING, READY, Transition};
use crate::crd::{AgentPhase, AgentStatus};
use crate::validate::InputError;

/// What the reconciler found, reduced to what status depends on.
#[derive(Clone, Debug)]
pub enum Observation<'a> {
    /// The input is wrong; nothing was applied this time.
    BadInput(&'a InputError),
    /// The identity Secret vanished after the agent had an id: the key is
    /// gone and is not silently replaced (the id is what peers trust).
    IdentityLost { secret: &'a str },
    /// The identity Secret exists but does not hold a readable key.
    IdentityCorrupt { secret: &'a str, reason: String },
    /// Children applied; this is the Deployment the API server returned.
    Applied(&'a Deployment),
    /// Children applied with zero replicas (`spec.scaleToZero`): the agent
    /// sleeps; the text says why.
    Sleeping(&'a str),
    /// Children applied, but the agent's container keeps exiting or cannot
    /// start; the text says why ([`pod_trouble`]).
    Crashing(&'a str),
    /// Children applied; the agent runs but waits for storage that does
    /// not answer (its own words, with the storage's last error). It keeps
    /// trying for 10 minutes, then exits (and [`Observation::Crashing`]).
    StorageUnreachable(&'a str),
}

/// Rollout state of the agent Deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rollout {
    /// The current pod template is running and ready.
    Ready,
    /// Still rolling out (or waiting for the pod to become ready).
    InProgress(String),
    /// The Deployment gave up (progress deadline, quota, …).
    Failed { reason: String, message: String },
}

/// Reads a Deployment's status the way `kubectl rollout status` does.
pub fn rollout(dep: &Deployment) -> Rollout {
    let generation = dep.metadata.generation.unwrap_or(0);
    let Some(st) = dep.status.as_ref() else {
        return Rollout::InProgress("waiting for the Deployment controller".into());
    };
    for c in st.conditions.iter().flatten() {
        if c.type_ == "Progressing" && c.status == "False" {
            return Rollout::Failed {
                reason: "RolloutFailed".into(),
                message: format!(
                    "Deployment {}: {}",
                    c.reason.as_deref().unwrap_or("not progressing"),
                    c.message.as_deref().unwrap_or("")
                ),
            };
        }
        if c.type_ == "ReplicaFailure" && c.status == "True" {
            return Rollout::Failed {
                reason: "ReplicaFailure".into(),
                message: c
                    .message
                    .clone()
                    .unwrap_or_else(|| "pod could not be created".into()),
            };
        }
    }
    if st.observed_generation.unwrap_or(0) < generation {
        return Rollout::InProgress("waiting for the Deployment controller".into());
    }
    let want = dep.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let updated = st.updated_replicas.unwrap_or(0);
    let total = st.replicas.unwrap_or(0);
    let available = st.available_replicas.unwrap_or(0);
    let ready = st.ready_replicas.unwrap_or(0);
    if updated < want {
        return Rollout::InProgress(format!("{updated} of {want} agent pods updated"));
    }
    if total > updated {
        return Rollout::InProgress("old agent pod terminating".into());
    }
    if available < want || ready < want {
        return Rollout::InProgress("waiting for the agent pod to become ready".into());
    }
    Rollout::Ready
}

/// How long ago the Deployment last made progress (the update time of its
/// `Progressing` condition); `None` when it does not say yet (it was just
/// made, or its controller has not looked at it).
pub fn since_progress(dep: &Deployment, now: Timestamp) -> Option<Duration> {
    let c = dep
        .status
        .as_ref()?
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing")?;
    let at = c.last_update_time.as_ref()?.0;
    Some(Duration::from_secs(
        now.as_second().saturating_sub(at.as_second()).max(0) as u64,
    ))
}

/// Waiting reasons of a container that will not start without a change.
const CANNOT_START: &[&str] = &[
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// Longest excerpt of a container's last words put in a condition.
const TROUBLE_MAX: usize = 512;

/// Why the agent's pods do not come up, from their container statuses,
/// newest pod first: a container that keeps exiting (how often, its exit
/// code, and the last line it wrote: the pod's termination message falls
/// back to its log, whose last line is the agent's `error: …`, say a
/// misspelt storage option), or one that cannot start (image not pulled,
/// config not mountable). Only the newest pod counts (in a rollout the
/// old one's past is not what the agent does now). `None` while
/// containers start or run normally: a slow start is not trouble.
pub fn pod_trouble(pods: &[Pod]) -> Option<String> {
    let s = newest_pod(pods)?.status.as_ref()?;
    // A pod that cannot be scheduled for a volume claim that does not exist
    // (`spec.storage.dataVolume.claimName`) waits for ever: said, where the
    // Agent only showed "waiting for the agent pod to become ready". Other
    // unschedulable pods (room on the nodes) may be helped by an autoscaler.
    if let Some(c) = s.conditions.iter().flatten().find(|c| {
        c.type_ == "PodScheduled"
            && c.status == "False"
            && c.message
                .as_deref()
                .is_some_and(|m| m.contains("persistentvolumeclaim"))
    }) {
        return Some(format!(
            "the agent pod cannot be scheduled: {}",
            excerpt(c.message.as_deref().unwrap_or(""))
        ));
    }
    s.init_container_statuses
        .iter()
        .flatten()
        .chain(s.container_statuses.iter().flatten())
        .find_map(container_trouble)
}

/// The newest of the Agent's pods not being deleted: in a rollout, the one
/// that says what the agent does now.
pub fn newest_pod(pods: &[Pod]) -> Option<&Pod> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .max_by_key(|p| p.metadata.creation_timestamp.clone())
}

fn container_trouble(c: &ContainerStatus) -> Option<String> {
    let state = c.state.as_ref();
    if let Some(w) = state.and_then(|s| s.waiting.as_ref())
        && let Some(reason) = w.reason.as_deref().filter(|r| CANNOT_START.contains(r))
    {
        return Some(format!(
            "container {} cannot start: {reason}: {}",
            c.name,
            excerpt(w.message.as_deref().unwrap_or(""))
        ));
    }
    let running_ready = state.is_some_and(|s| s.running.is_some()) && c.ready;
    let last = c.last_state.as_ref().and_then(|s| s.terminated.as_ref())?;
    if c.restart_count == 0 || running_ready || last.exit_code == 0 {
        return None;
    }
    let times = match c.restart_count {
        1 => "once".to_string(),
        n => format!("{n} times"),
    };
    let reason = last.reason.as_deref().unwrap_or("Error");
    let hint = if reason == "OOMKilled" {
        ": out of memory; raise spec.resources.limits.memory".to_string()
    } else {
        match last
            .message
            .as_deref()
            .map(excerpt)
            .filter(|m| !m.is_empty())
        {
            Some(m) => format!(": {m}"),
            None => String::new(),
        }
    };
    Some(format!(
        "container {} exited {times}, last with code {} ({reason}){hint}",
        c.name, last.exit_code
    ))
}

/// The last non-empty line of a container's message, without the
/// agent's `error: ` prefix, at most [`TROUBLE_MAX`] bytes.
fn excerpt(message: &str) -> String {
    let line = message
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let line = line.strip_prefix("error: ").unwrap_or(line);
    let mut end = line.len().min(TROUBLE_MAX);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    let more = if end < line.len() { "…" } else { "" };
    format!("{}{more}", &line[..end])
}

fn cond(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Timestamp,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time: Time(*now),
    }
}

/// The whole desired status. `previous` supplies lastTransitionTime for
/// conditions whose status did not change, so a no-op reconcile computes a
/// status equal to the stored one and no patch is sent.
pub fn compute(
    previous: Option<&AgentStatus>,
    generation: Option<i64>,
    agent_id: Option<String>,
    endpoint: Option<String>,
    obs: &Observation<'_>,
    now: Timestamp,
) -> AgentStatus {
    let g = generation;
    let (ready, progressing, degraded) = match obs {
        Observation::BadInput(err) => (
            cond(READY, false, err.reason(), err.to_string(), g, &now),
            cond(
                PROGRESSING,
                false,
                err.reason(),
                "waiting for the input to be fixed".into(),
                g,
                &now,
            ),
            cond(DEGRADED, true, err.reason(), err.to_string(), g, &now),
        ),
        Observation::IdentityLost { secret } => {
            let msg = format!(
                "identity Secret {secret} was deleted; the agent's key is gone and is not \
                 regenerated. Delete and recreate the Agent to get a new agent id"
            );
            (
                cond(READY, false, "IdentityLost", msg.clone(), g, &now),
                cond(PROGRESSING, false, "IdentityLost", msg.clone(), g, &now),
                cond(DEGRADED, true, "IdentityLost", msg, g, &now),
            )
        }
        Observation::IdentityCorrupt { secret, reason } => {
            let msg = format!("identity Secret {secret} does not hold a valid key: {reason}");
            (
                cond(READY, false, "IdentityCorrupt", msg.clone(), g, &now),
                cond(PROGRESSING, false, "IdentityCorrupt", msg.clone(), g, &now),
                cond(DEGRADED, true, "IdentityCorrupt", msg, g, &now),
            )
        }
        Observation::Applied(dep) => match rollout(dep) {
            Rollout::Ready => (
                cond(
                    READY,
                    true,
                    "AgentReady",
                    "the agent pod is running and ready".into(),
                    g,
                    &now,
                ),
                cond(
                    PROGRESSING,
                    false,
                    "RolloutComplete",
                    "the agent runs the current spec".into(),
                    g,
                    &now,
                ),
                cond(
                    DEGRADED,
                    false,
                    "AsExpected",
                    "no problems found".into(),
                    g,
                    &now,
                ),
            ),
            Rollout::InProgress(msg) => (
                cond(READY, false, "RollingOut", msg.clone(), g, &now),
                cond(PROGRESSING, true, "RollingOut", msg, g, &now),
                cond(
                    DEGRADED,
                    false,
                    "AsExpected",
                    "no problems found".into(),
                    g,
                    &now,
                ),
            ),
            Rollout::Failed { reason, message } => (
                cond(READY, false, &reason, message.clone(), g, &now),
                cond(PROGRESSING, false, &reason, message.clone(), g, &now),
                cond(DEGRADED, true, &reason, message, g, &now),
            ),
        },
        Observation::Crashing(why) => (
            cond(READY, false, "AgentCrashing", why.to_string(), g, &now),
            cond(
                PROGRESSING,
                false,
                "AgentCrashing",
                "the pod is restarted by the kubelet; fix the cause (see Degraded)".into(),
                g,
                &now,
            ),
            cond(DEGRADED, true, "AgentCrashing", why.to_string(), g, &now),
        ),
        Observation::StorageUnreachable(why) => (
            cond(READY, false, "StorageUnreachable", why.to_string(), g, &now),
            cond(
                PROGRESSING,
                true,
                "StorageUnreachable",
                "the agent retries its storage; fix the endpoint or the network (see Degraded)"
                    .into(),
                g,
                &now,
            ),
            cond(
                DEGRADED,
                true,
                "StorageUnreachable",
                why.to_string(),
                g,
                &now,
            ),
        ),
        Observation::Sleeping(why) => (
            cond(
                READY,
                false,
                "Sleeping",
                format!("scaled to zero: {why}"),
                g,
                &now,
            ),
            cond(
                PROGRESSING,
                false,
                "Sleeping",
                "no pod runs until there is work".into(),
                g,
                &now,
            ),
            cond(
                DEGRADED,
                false,
                "AsExpected",
                "no problems found".into(),
                g,
                &now,
            ),
        ),
    };
    let phase = if matches!(obs, Observation::Sleeping(_)) {
        AgentPhase::Sleeping
    } else if degraded.status == "True" {
        AgentPhase::Degraded
    } else if ready.status == "True" {
        AgentPhase::Ready
    } else {
        AgentPhase::Pending
    };
    let mut conditions = vec![ready, progressing, degraded];
    for c in &mut conditions {
        if let Some(old) = previous.and_then(|p| p.conditions.iter().find(|o| o.type_ == c.type_))
            && old.status == c.status
        {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
    // Keep what we knew when this observation could not tell (bad input).
    let agent_id = agent_id.or_else(|| previous.and_then(|p| p.agent_id.clone()));
    let endpoint = endpoint.or_else(|| previous.and_then(|p| p.endpoint.clone()));
    AgentStatus {
        agent_id,
        endpoint,
        addresses: previous.map(|p| p.addresses.clone()).unwrap_or_default(),
        phase: Some(phase),
        wake_at: None,
        conditions,
        observed_generation: g,
    }
}

fn find<'a>(s: Option<&'a AgentStatus>, t: &str) -> Option<&'a Condition> {
    s.and_then(|s| s.conditions.iter().find(|c| c.type_ == t))
}

/// The Events that the move from `old` to `new` deserves: one per real
/// transition, none for a reconcile that changed nothing.
pub fn transitions(old: Option<&AgentStatus>, new: &AgentStatus) -> Vec<Transition> {
    let mut out = Vec::new();
    let (od, nd) = (find(old, DEGRADED), find(Some(new), DEGRADED));
    if let Some(nd) = nd {
        let was_degraded = od.is_some_and(|o| o.status == "True");
        if nd.status == "True" && (!was_degraded || od.is_some_and(|o| o.reason != nd.reason)) {
            out.push(Transition {
                warning: true,
                reason: nd.reason.clone(),
                note: nd.message.clone(),
            });
        } else if nd.status == "False" && was_degraded {
            out.push(Transition {
                warning: false,
                reason: "Recovered".into(),
                note: "the problem is fixed; reconciling the agent again".into(),
            });
        }
    }
    let (op, np) = (find(old, PROGRESSING), find(Some(new), PROGRESSING));
    if np.is_some_and(|n| n.status == "True") && op.is_none_or(|o| o.status != "True") {
        out.push(Transition {
            warning: false,
            reason: "RollingOut".into(),
            note: format!(
                "rolling out generation {}",
                new.observed_generation.unwrap_or_default()
            ),
        });
    }
    let (oa, na) = (
        find(old, crate::conditions::AWAKE),
        find(Some(new), crate::conditions::AWAKE),
    );
    if let Some(na) = na
        && oa.is_none_or(|o| o.status != na.status)
        && (na.status == "False" || oa.is_some())
    {
        out.push(Transition {
            warning: false,
            reason: if na.status == "False" {
                "Sleeping"
            } else {
                "WokenUp"
            }
            .into(),
            note: format!("{}: {}", na.reason, na.message),
        });
    }
    let (or, nr) = (find(old, READY), find(Some(new), READY));
    if nr.is_some_and(|n| n.status == "True") && or.is_none_or(|o| o.status != "True") {
        out.push(Transition {
            warning: false,
            reason: "AgentReady".into(),
            note: format!(
                "agent {} is ready at {}",
                new.agent_id.as_deref().unwrap_or("?"),
                new.endpoint.as_deref().unwrap_or("?")
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn dep(generation: i64, observed: i64, updated: i32, ready: i32) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(1),
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(observed),
                replicas: Some(1),
                updated_replicas: Some(updated),
                ready_replicas: Some(ready),
                available_replicas: Some(ready),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn progress_is_dated_by_the_progressing_condition() {
        let mut d = dep(1, 1, 0, 0);
        assert_eq!(since_progress(&d, t(100)), None, "not said yet");
        d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "True".into(),
            last_update_time: Some(Time(t(40))),
            ..Default::default()
        }]);
        assert_eq!(since_progress(&d, t(100)), Some(Duration::from_secs(60)));
        assert_eq!(
            since_progress(&d, t(10)),
            Some(Duration::ZERO),
            "a clock behind the API server's"
        );
    }

    fn get<'a>(s: &'a AgentStatus, ty: &str) -> &'a Condition {
        s.conditions.iter().find(|c| c.type_ == ty).unwrap()
    }

    #[test]
    fn rollout_reads_deployment_status() {
        assert_eq!(rollout(&dep(2, 2, 1, 1)), Rollout::Ready);
        assert!(matches!(rollout(&dep(2, 1, 1, 1)), Rollout::InProgress(_)));
        assert!(matches!(rollout(&dep(2, 2, 0, 0)), Rollout::InProgress(_)));
        assert!(matches!(rollout(&dep(2, 2, 1, 0)), Rollout::InProgress(_)));
        let mut d = dep(1, 1, 0, 0);
        d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
            type_: "Progressing".into(),
            status: "False".into(),
            reason: Some("ProgressDeadlineExceeded".into()),
            ..Default::default()
        }]);
        assert!(matches!(rollout(&d), Rollout::Failed { .. }));
        assert!(matches!(
            rollout(&Deployment::default()),
            Rollout::InProgress(_)
        ));
    }

    #[test]
    fn ready_deployment_makes_a_ready_agent() {
        let d = dep(1, 1, 1, 1);
        let s = compute(
            None,
            Some(3),
            Some("cv1-x".into()),
            Some("e:7400".into()),
            &Observation::Applied(&d),
            t(0),
        );
        assert_eq!(s.phase, Some(AgentPhase::Ready));
        assert_eq!(get(&s, READY).status, "True");
        assert_eq!(get(&s, PROGRESSING).status, "False");
        assert_eq!(get(&s, DEGRADED).status, "False");
        assert!(
            s.conditions
                .iter()
                .all(|c| c.observed_generation == Some(3))
        );
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.agent_id.as_deref(), Some("cv1-x"));
    }

    #[test]
    fn rolling_out_is_pending_and_progressing() {
        let d = dep(2, 2, 0, 0);
        let s = compute(None, Some(2), None, None, &Observation::Applied(&d), t(0));
        assert_eq!(s.phase, Some(AgentPhase::Pending));
        assert_eq!(get(&s, PROGRESSING).status, "True");
        assert_eq!(get(&s, READY).status, "False");
    }

    #[test]
    fn bad_input_is_degraded_with_its_reason_and_keeps_the_agent_id() {
        let prev = compute(
            None,
            Some(1),
            Some("cv1-x".into()),
            Some("e".into()),
            &Observation::Applied(&dep(1, 1, 1, 1)),
            t(0),
        );
        let err = InputError::UnknownStorageScheme("unknown storage scheme \"ftp\"".into());
        let s = compute(
            Some(&prev),
            Some(2),
            None,
            None,
            &Observation::BadInput(&err),
            t(10),
        );
        assert_eq!(s.phase, Some(AgentPhase::Degraded));
        let d = get(&s, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "UnknownStorageScheme")
        );
        assert!(d.message.contains("ftp"));
        assert_eq!(get(&s, READY).reason, "UnknownStorageScheme");
        assert_eq!(s.agent_id.as_deref(), Some("cv1-x"));
        assert_eq!(s.endpoint.as_deref(), Some("e"));
    }

    fn pod(created: i64, c: ContainerStatus) -> Pod {
        use k8s_openapi::api::core::v1::PodStatus;
        Pod {
            metadata: ObjectMeta {
                creation_timestamp: Some(Time(t(created))),
                ..Default::default()
            },
            status: Some(PodStatus {
                container_statuses: Some(vec![c]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn crashed(restarts: i32, code: i32, reason: &str, message: &str) -> ContainerStatus {
        use k8s_openapi::api::core::v1::{
            ContainerState, ContainerStateTerminated, ContainerStateWaiting,
        };
        ContainerStatus {
            name: "agent".into(),
            restart_count: restarts,
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("CrashLoopBackOff".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            last_state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: code,
                    reason: Some(reason.into()),
                    message: Some(message.into()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A container that keeps exiting is named with its exit code and
    /// the last line it wrote (the agent's `error: …`); one that cannot
    /// start with the kubelet's reason; a running one, or a first start,
    /// is no trouble. The newest pod speaks.
    #[test]
    fn pod_trouble_says_why_the_agent_does_not_come_up() {
        let log = "2026-12-06T18:00:00Z INFO starting\nerror: s3 storage has no option named `endpiont`\n";
        let m = pod_trouble(&[pod(0, crashed(3, 3, "Error", log))]).unwrap();
        assert_eq!(
            m,
            "container agent exited 3 times, last with code 3 (Error): s3 storage has no option named `endpiont`"
        );
        let m = pod_trouble(&[pod(0, crashed(1, 137, "OOMKilled", ""))]).unwrap();
        assert!(
            m.contains("once") && m.contains("spec.resources.limits.memory"),
            "{m}"
        );
        let long = "é".repeat(1000);
        let m = pod_trouble(&[pod(0, crashed(2, 1, "Error", &long))]).unwrap();
        assert!(
            m.ends_with('…') && m.len() < TROUBLE_MAX + 100,
            "{}",
            m.len()
        );

        let mut pull = ContainerStatus {
            name: "agent".into(),
            ..Default::default()
        };
        pull.state = Some(k8s_openapi::api::core::v1::ContainerState {
            waiting: Some(k8s_openapi::api::core::v1::ContainerStateWaiting {
                reason: Some("ImagePullBackOff".into()),
                message: Some("Back-off pulling image \"caravan/agent:nope\"".into()),
            }),
            ..Default::default()
        });
        let m = pod_trouble(&[pod(0, pull.clone())]).unwrap();
        assert!(
            m.contains("cannot start: ImagePullBackOff") && m.contains("agent:nope"),
            "{m}"
        );

        // Starting for the first time, or running ready after a restart.
        let mut starting = pull.clone();
        starting
            .state
            .as_mut()
            .unwrap()
            .waiting
            .as_mut()
            .unwrap()
            .reason = Some("ContainerCreating".into());
        assert_eq!(pod_trouble(&[pod(0, starting.clone())]), None);
        // A claim that does not exist: the pod is never scheduled.
        let mut unscheduled = pod(0, starting.clone());
        unscheduled.status.as_mut().unwrap().conditions =
            Some(vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some(
                    "0/1 nodes are available: 1 persistentvolumeclaim \"nope\" not found.".into(),
                ),
                ..Default::default()
            }]);
        let m = pod_trouble(&[unscheduled]).unwrap();
        assert!(
            m.contains("cannot be scheduled") && m.contains("\"nope\" not found"),
            "{m}"
        );
        let mut recovered = crashed(1, 1, "Error", "error: gone");
        recovered.state = Some(k8s_openapi::api::core::v1::ContainerState {
            running: Some(Default::default()),
            ..Default::default()
        });
        recovered.ready = true;
        assert_eq!(pod_trouble(&[pod(0, recovered)]), None);
        // The new pod of a rollout is starting; the old one's crashes are
        // not what the agent does now.
        let old = pod(0, crashed(5, 1, "Error", "error: old"));
        assert_eq!(pod_trouble(&[old.clone(), pod(10, starting)]), None);
        // Crashing is Degraded with the reason, not Ready.
        let st = compute(None, Some(1), None, None, &Observation::Crashing(&m), t(0));
        assert_eq!(st.phase, Some(AgentPhase::Degraded));
        assert_eq!(get(&st, DEGRADED).reason, "AgentCrashing");
        assert_eq!(get(&st, READY).status, "False");
    }

    /// An agent waiting for storage that does not answer is Degraded with
    /// its own words (the storage's error), still Progressing: it retries.
    /// Before, the Agent said "waiting for the agent pod to become ready"
    /// for the 10 minutes the agent retried.
    #[test]
    fn an_agent_waiting_for_its_storage_says_why() {
        use crate::agent_api::CallError;
        let said = "the agent is starting: waiting for its storage, not reachable yet \
                    (attempt 4, for up to 10 min): connection refused";
        let why =
            crate::controller::storage_wait(Some(CallError::Unreachable(said.into()))).unwrap();
        assert!(why.starts_with("the agent is waiting for its storage, not reachable yet"));
        assert!(why.ends_with("connection refused"), "{why}");
        for other in [
            Some(CallError::Unreachable(
                "the agent is starting: loading its state from the storage".into(),
            )),
            Some(CallError::Agent("HTTP 500: boom".into())),
            None,
        ] {
            assert_eq!(crate::controller::storage_wait(other), None);
        }
        let st = compute(
            None,
            Some(1),
            None,
            None,
            &Observation::StorageUnreachable(&why),
            t(0),
        );
        assert_eq!(st.phase, Some(AgentPhase::Degraded));
        assert_eq!(get(&st, DEGRADED).reason, "StorageUnreachable");
        assert!(get(&st, DEGRADED).message.contains("connection refused"));
        assert_eq!(get(&st, PROGRESSING).status, "True");
        assert_eq!(get(&st, READY).status, "False");
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let d = dep(1, 1, 1, 1);
        let first = compute(
            None,
            Some(1),
            Some("a".into()),
            None,
            &Observation::Applied(&d),
            t(0),
        );
        let again = compute(
            Some(&first),
            Some(1),
            Some("a".into()),
            None,
            &Observation::Applied(&d),
            t(60),
        );
        assert_eq!(
            first, again,
            "a no-op reconcile must compute an identical status"
        );
        let rolled = compute(
            Some(&first),
            Some(2),
            Some("a".into()),
            None,
            &Observation::Applied(&dep(2, 2, 0, 0)),
            t(90),
        );
        assert_eq!(get(&rolled, READY).last_transition_time, Time(t(90)));
        assert_eq!(get(&rolled, DEGRADED).last_transition_time, Time(t(0)));
    }

    #[test]
    fn transitions_emit_one_event_each() {
        let d_ready = dep(1, 1, 1, 1);
        let d_roll = dep(1, 1, 0, 0);
        let err = InputError::SecretNotFound {
            namespace: "n".into(),
            name: "s".into(),
        };
        let pending = compute(
            None,
            Some(1),
            None,
            None,
            &Observation::Applied(&d_roll),
            t(0),
        );
        let ev = transitions(None, &pending);
        assert_eq!(
            ev.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(),
            ["RollingOut"]
        );
        let ready = compute(
            Some(&pending),
            Some(1),
            None,
            None,
            &Observation::Applied(&d_ready),
            t(1),
        );
        let ev = transitions(Some(&pending), &ready);
        assert_eq!(
            ev.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(),
            ["AgentReady"]
        );
        assert!(transitions(Some(&ready), &ready).is_empty());
        let bad = compute(
            Some(&ready),
            Some(2),
            None,
            None,
            &Observation::BadInput(&err),
            t(2),
        );
        let ev = transitions(Some(&ready), &bad);
        assert_eq!(ev.len(), 1);
        assert!(ev[0].warning);
        assert_eq!(ev[0].reason, "SecretNotFound");
        assert!(
            transitions(Some(&bad), &bad).is_empty(),
            "no event spam while still broken"
        );
        let healed = compute(
            Some(&bad),
            Some(2),
            None,
            None,
            &Observation::Applied(&d_ready),
            t(3),
        );
        let reasons: Vec<_> = transitions(Some(&bad), &healed)
            .into_iter()
            .map(|e| e.reason)
            .collect();
        assert_eq!(reasons, ["Recovered", "AgentReady"]);
    }

    #[test]
    fn identity_lost_is_degraded() {
        let s = compute(
            None,
            Some(1),
            None,
            None,
            &Observation::IdentityLost { secret: "x" },
            t(0),
        );
        assert_eq!(get(&s, DEGRADED).reason, "IdentityLost");
        assert_eq!(s.phase, Some(AgentPhase::Degraded));
    }
}

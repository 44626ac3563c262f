//! Dereferencing the Agent a Share or TrustGrant names: the Agent object
//! (same namespace), its identity Secret (the admin token) and its running
//! pod (the admin API address). Three reads, no writes.

use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::agent_api::AgentEndpoint;
use crate::config::paths;
use crate::crd::{Agent, AgentPhase};
use crate::names::{AGENT_LABEL, ChildNames};

/// What the lookup found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// No Agent of that name in the namespace (or it is being deleted).
    Missing,
    /// The Agent exists but cannot take calls yet; the text says why.
    NotReady(String),
    /// The Agent is scaled to zero (`spec.scaleToZero`); the operator wakes
    /// it when a Share or TrustGrant of it needs it.
    Sleeping(String),
    /// The Agent's id and where its admin API answers.
    Ready {
        /// The agent id (`cv1-…`).
        agent_id: String,
        /// Admin API base URL and token.
        endpoint: AgentEndpoint,
    },
}

/// Just the Agent object (step one of the lookup; also enough for bad-input
/// checks that need the agent id).
pub async fn agent(client: &Client, ns: &str, name: &str) -> Result<Option<Agent>, kube::Error> {
    let a = Api::<Agent>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await?;
    Ok(a.filter(|a| a.metadata.deletion_timestamp.is_none()))
}

/// The agent id an Agent reports in its status, once it has one.
pub fn agent_id(a: Option<&Agent>) -> Option<&str> {
    a.and_then(|a| a.status.as_ref())
        .and_then(|s| s.agent_id.as_deref())
}

/// The Agent of namespace `ns` (not being deleted) whose agent id is `id`
/// (one `LIST`): the holder of a Share or TrustGrant declared before its
/// holder was recorded in status.
pub async fn agent_by_id(
    client: &Client,
    ns: &str,
    id: &str,
) -> Result<Option<Agent>, kube::Error> {
    let agents = Api::<Agent>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?;
    Ok(agents
        .items
        .into_iter()
        .filter(|a| a.metadata.deletion_timestamp.is_none())
        .find(|a| agent_id(Some(a)) == Some(id)))
}

/// The rest of the lookup for an Agent already read.
pub async fn endpoint(client: &Client, agent: &Agent) -> Result<Lookup, kube::Error> {
    let ns = agent.namespace().unwrap_or_default();
    let name = agent.name_any();
    let st = agent.status.as_ref();
    let Some(agent_id) = st.and_then(|s| s.agent_id.clone()) else {
        return Ok(Lookup::NotReady(format!(
            "Agent {name} has no identity yet"
        )));
    };
    if st.and_then(|s| s.phase) == Some(AgentPhase::Sleeping) {
        return Ok(Lookup::Sleeping(format!(
            "Agent {name} is asleep (scaled to zero); the operator wakes it for this"
        )));
    }
    if st.and_then(|s| s.phase) != Some(AgentPhase::Ready) {
        return Ok(Lookup::NotReady(format!("Agent {name} is not Ready")));
    }
    let names = ChildNames::for_agent(&name);
    let Some(secret) = Api::<Secret>::namespaced(client.clone(), &ns)
        .get_opt(&names.identity)
        .await?
    else {
        return Ok(Lookup::NotReady(format!(
            "identity Secret {} of Agent {name} is missing",
            names.identity
        )));
    };
    let Some(token) = admin_token(&secret) else {
        return Ok(Lookup::NotReady(format!(
            "identity Secret {} has no {}",
            names.identity,
            paths::ADMIN_TOKEN_KEY
        )));
    };
    match ready_pod_ip(client, &ns, &name).await? {
        Some(ip) => Ok(Lookup::Ready {
            agent_id,
            endpoint: AgentEndpoint {
                base: admin_base(&ip),
                token,
            },
        }),
        None => Ok(Lookup::NotReady(format!(
            "Agent {name} has no ready pod yet"
        ))),
    }
}

/// The IP of the Agent's ready pod (a label-selected `LIST pods`).
pub async fn ready_pod_ip(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<String>, kube::Error> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("{AGENT_LABEL}={name}")))
        .await?;
    Ok(pod_ip(&pods.items))
}

/// The IP of the Agent's newest pod when it runs but is not ready (an
/// agent waiting for its storage answers on its admin port meanwhile).
pub fn waiting_pod_ip(pods: &[Pod]) -> Option<String> {
    let s = crate::status::newest_pod(pods)?.status.as_ref()?;
    let ready = s
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    (s.phase.as_deref() == Some("Running") && !ready)
        .then(|| s.pod_ip.clone())
        .flatten()
        .filter(|ip| !ip.is_empty())
}

/// The admin token stored in an identity Secret.
pub fn admin_token(secret: &Secret) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(paths::ADMIN_TOKEN_KEY))
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// `http://IP:7401`, with brackets for IPv6.
pub fn admin_base(ip: &str) -> String {
    let port = caravan_agent::config::DEFAULT_ADMIN_PORT;
    if ip.contains(':') {
        format!("http://[{ip}]:{port}")
    } else {
        format!("http://{ip}:{port}")
    }
}

/// The IP of a running, ready, not terminating pod (newest first).
pub fn pod_ip(pods: &[Pod]) -> Option<String> {
    let mut ready: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status.as_ref().is_some_and(|s| {
                s.phase.as_deref() == Some("Running")
                    && s.conditions
                        .iter()
                        .flatten()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .collect();
    ready.sort_by_key(|p| std::cmp::Reverse(p.metadata.creation_timestamp.clone()));
    ready
        .first()
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};

    fn pod(phase: &str, ready: bool, ip: &str) -> Pod {
        Pod {
            status: Some(PodStatus {
                phase: Some(phase.into()),
                pod_ip: Some(ip.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn only_a_ready_running_pod_is_dialled() {
        assert_eq!(pod_ip(&[]), None);
        assert_eq!(pod_ip(&[pod("Pending", false, "10.0.0.1")]), None);
        assert_eq!(pod_ip(&[pod("Running", false, "10.0.0.1")]), None);
        assert_eq!(
            pod_ip(&[
                pod("Running", false, "10.0.0.1"),
                pod("Running", true, "10.0.0.2")
            ]),
            Some("10.0.0.2".into())
        );
    }

    /// Only the newest pod is asked why it is not ready, and only while it
    /// runs and is not ready.
    #[test]
    fn only_a_running_pod_not_ready_is_asked_why() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        let at = |p: Pod, secs: i64| {
            let mut p = p;
            p.metadata.creation_timestamp = Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(secs).unwrap(),
            ));
            p
        };
        assert_eq!(waiting_pod_ip(&[]), None);
        assert_eq!(waiting_pod_ip(&[pod("Pending", false, "10.0.0.1")]), None);
        assert_eq!(waiting_pod_ip(&[pod("Running", true, "10.0.0.1")]), None);
        assert_eq!(waiting_pod_ip(&[pod("Running", false, "")]), None);
        assert_eq!(
            waiting_pod_ip(&[pod("Running", false, "10.0.0.1")]),
            Some("10.0.0.1".into())
        );
        let old = at(pod("Running", false, "10.0.0.1"), 10);
        let new = at(pod("Pending", false, "10.0.0.2"), 20);
        assert_eq!(waiting_pod_ip(&[old, new]), None);
    }

    #[test]
    fn ipv6_gets_brackets() {
        assert_eq!(admin_base("10.1.2.3"), "http://10.1.2.3:7401");
        assert_eq!(admin_base("fd00::1"), "http://[fd00::1]:7401");
    }
}

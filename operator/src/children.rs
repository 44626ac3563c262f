//! Pure builders of an Agent's children. No I/O here: the reconciler applies
//! what these return with server-side apply, and the unit tests check every
//! security-relevant field without an API server.

use std::collections::BTreeMap;

use caravan_agent::config::{DEFAULT_ADMIN_PORT, DEFAULT_METRICS_PORT, DEFAULT_PEER_PORT};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvVar, HTTPGetAction, LocalObjectReference, PersistentVolumeClaimVolumeSource,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, Secret,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::config::{METADATA_RANGES, OPERATOR_VERSION, OperatorConfig, paths};
use crate::crd::Agent;
use crate::crd::agent::LogFormat;
use crate::names::{self, ChildNames};

/// UID and GID the agent runs as (the conventional "nonroot" of distroless).
pub const AGENT_UID: i64 = 65532;
/// Annotation on the pod template carrying the config hash, so a config
/// change rolls the pod (a mounted ConfigMap alone would not restart it).
pub const CONFIG_HASH_ANNOTATION: &str = "caravan.dev/config-hash";
/// Annotation carrying the credentials Secret's resourceVersion, so rotating
/// credentials restarts the agent with them.
pub const CREDENTIALS_VERSION_ANNOTATION: &str = "caravan.dev/credentials-version";

/// What the builders need besides the Agent itself.
#[derive(Clone, Debug)]
pub struct BuildInput<'a> {
    /// The Agent (name, namespace, uid and spec are used).
    pub agent: &'a Agent,
    /// Its namespace (checked non-empty by the caller).
    pub namespace: &'a str,
    /// The rendered `agent.toml`.
    pub config_toml: &'a str,
    /// resourceVersion of the credentials Secret, when there is one.
    pub credentials_version: Option<&'a str>,
    /// Operator-wide settings.
    pub cfg: &'a OperatorConfig,
}

impl BuildInput<'_> {
    fn name(&self) -> String {
        self.agent.metadata.name.clone().unwrap_or_default()
    }

    fn names(&self) -> ChildNames {
        ChildNames::for_agent(&self.name())
    }

    /// Metadata of a child object. Its labels add the operator's version to
    /// the pod's labels; the pod template never gets the version, so an
    /// operator upgrade alone restarts no agent.
    fn meta(&self, name: String) -> ObjectMeta {
        let mut labels = names::labels(&self.name());
        labels.insert(
            "app.kubernetes.io/version".into(),
            OPERATOR_VERSION.to_string(),
        );
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_string()),
            labels: Some(labels),
            owner_references: owner_reference(self.agent).map(|o| vec![o]),
            ..Default::default()
        }
    }
}

/// The controller owner reference that makes Kubernetes garbage-collect a
/// child when its Agent is deleted. `None` without a uid (never from the API).
pub fn owner_reference(agent: &Agent) -> Option<OwnerReference> {
    agent.controller_owner_ref(&())
}

/// Annotation of a kept identity Secret (`spec.keepIdentity`): the uid of
/// the Agent that created it, so a later Agent of the name knows it took up
/// an identity it did not make.
pub const KEPT_FOR_UID: &str = "caravan.dev/created-for-agent-uid";

/// The identity Secret, built once when the agent is first seen. Immutable:
/// the key must never change under a running agent's id.
pub fn identity_secret(input: &BuildInput<'_>, identity_text: &str, admin_token: &str) -> Secret {
    let mut metadata = input.meta(input.names().identity);
    // Not garbage-collected with the Agent: taken up by the next Agent of
    // the name (`spec.keepIdentity`).
    if input.agent.spec.keep_identity {
        metadata.owner_references = None;
        metadata.annotations = Some(BTreeMap::from([(
            KEPT_FOR_UID.to_string(),
            input.agent.metadata.uid.clone().unwrap_or_default(),
        )]));
    }
    Secret {
        metadata,
        immutable: Some(true),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                paths::IDENTITY_KEY.to_string(),
                ByteString(identity_text.as_bytes().to_vec()),
            ),
            (
                paths::ADMIN_TOKEN_KEY.to_string(),
                ByteString(admin_token.as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    }
}

/// The ConfigMap with `agent.toml`.
pub fn config_map(input: &BuildInput<'_>) -> ConfigMap {
    ConfigMap {
        metadata: input.meta(input.names().config),
        data: Some(BTreeMap::from([(
            paths::CONFIG_KEY.to_string(),
            input.config_toml.to_string(),
        )])),
        ..Default::default()
    }
}

fn port(name: &str, port: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(port),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

/// `None` for a missing or empty list (so the field stays out of the template).
fn non_empty<T>(v: Option<Vec<T>>) -> Option<Vec<T>> {
    v.filter(|v| !v.is_empty())
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".into(),
        ..Default::default()
    }
}

/// The Deployment with `replicas` pods: 1, or 0 while the agent sleeps
/// (`spec.scaleToZero`). Only `spec.replicas` differs, so waking or
/// sleeping never changes the pod template (and never rolls a pod).
pub fn scaled_deployment(input: &BuildInput<'_>, replicas: i32) -> Deployment {
    let mut d = deployment(input);
    if let Some(spec) = d.spec.as_mut() {
        spec.replicas = Some(replicas);
    }
    d
}

/// The agent Deployment: one replica, `Recreate` so two pods never run with
/// the same identity, locked-down pod and container security contexts.
pub fn deployment(input: &BuildInput<'_>) -> Deployment {
    let spec = &input.agent.spec;
    let names = input.names();
    let selector = names::selector_labels(&input.name());

    let mut annotations = BTreeMap::from([(
        CONFIG_HASH_ANNOTATION.to_string(),
        blake3::hash(input.config_toml.as_bytes()).to_hex()[..16].to_string(),
    )]);
    if let Some(v) = input.credentials_version {
        annotations.insert(CREDENTIALS_VERSION_ANNOTATION.into(), v.to_string());
    }

    let read_only = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..Default::default()
    };
    let mut mounts = vec![
        read_only("identity", paths::IDENTITY_DIR),
        read_only("config", paths::CONFIG_DIR),
        VolumeMount {
            name: "tmp".into(),
            mount_path: "/tmp".into(),
            ..Default::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "identity".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(names.identity.clone()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "config".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: names.config.clone(),
                default_mode: Some(0o444),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource {
                size_limit: Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
                    "64Mi".into(),
                )),
                ..Default::default()
            }),
            ..Default::default()
        },
    ];
    if let Some(sr) = &spec.storage.secret_ref {
        mounts.push(read_only("storage-credentials", paths::CREDENTIALS_DIR));
        volumes.push(Volume {
            name: "storage-credentials".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(sr.name.clone()),
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    if spec.storage.scheme == "fs" {
        mounts.push(VolumeMount {
            name: "data".into(),
            mount_path: paths::DATA_DIR.into(),
            ..Default::default()
        });
        let dv = spec.storage.data_volume.clone().unwrap_or_default();
        volumes.push(match dv.claim_name {
            Some(claim) => Volume {
                name: "data".into(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: claim,
                    read_only: Some(false),
                }),
                ..Default::default()
            },
            None => Volume {
                name: "data".into(),
                empty_dir: Some(EmptyDirVolumeSource {
                    size_limit: dv.size_limit,
                    ..Default::default()
                }),
                ..Default::default()
            },
        });
    }

    let mut command = vec![
        "caravan-agent".into(),
        "run".into(),
        "--config".into(),
        format!("{}/{}", paths::CONFIG_DIR, paths::CONFIG_KEY),
    ];
    // Only a non-default format adds the flag: existing pods keep their
    // template (and keep running) when this setting is introduced.
    let log_format = spec.log_format.unwrap_or(input.cfg.default_log_format);
    if log_format != LogFormat::Text {
        command.extend(["--log-format".into(), log_format.as_str().into()]);
    }
    let scheduling = spec
        .scheduling
        .clone()
        .unwrap_or_default()
        .over(&input.cfg.default_scheduling);
    let image_pull_secrets = non_empty(Some(
        input
            .cfg
            .image_pull_secrets
            .iter()
            .map(|name| LocalObjectReference { name: name.clone() })
            .collect(),
    ));

    let container = Container {
        name: "agent".into(),
        image: Some(input.cfg.agent_image.clone()),
        image_pull_policy: Some(input.cfg.agent_image_pull_policy.clone()),
        command: Some(command),
        env: Some(vec![
            EnvVar {
                name: "RUST_LOG".into(),
                value: Some(spec.log_level.clone()),
                ..Default::default()
            },
            // For agent images built before the agent took jemalloc as its
            // allocator (glibc kept one arena per allocating thread: a 1 GiB
            // transfer's publisher peaked at 135 MiB with the default, 65
            // MiB with 2). jemalloc ignores it; it stays because removing
            // it changes the pod template, which restarts every agent.
            EnvVar {
                name: "MALLOC_ARENA_MAX".into(),
                value: Some("2".into()),
                ..Default::default()
            },
        ]),
        ports: Some(vec![
            port("peer", DEFAULT_PEER_PORT),
            port("admin", DEFAULT_ADMIN_PORT),
            port("metrics", DEFAULT_METRICS_PORT),
        ]),
        readiness_probe: Some(http_probe("/readyz", 5, 3)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(5),
            ..http_probe("/livez", 10, 6)
        }),
        resources: Some(
            spec.resources
                .clone()
                .unwrap_or_else(|| input.cfg.default_resources.clone()),
        ),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            run_as_user: Some(AGENT_UID),
            run_as_group: Some(AGENT_UID),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            seccomp_profile: Some(runtime_default_seccomp()),
            ..Default::default()
        }),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };

    Deployment {
        metadata: input.meta(names.workload.clone()),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            revision_history_limit: Some(3),
            progress_deadline_seconds: Some(600),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(names::labels(&input.name())),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(AGENT_UID),
                        run_as_group: Some(AGENT_UID),
                        fs_group: Some(AGENT_UID),
                        seccomp_profile: Some(runtime_default_seccomp()),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    termination_grace_period_seconds: Some(30),
                    image_pull_secrets,
                    node_selector: scheduling.node_selector.filter(|m| !m.is_empty()),
                    tolerations: non_empty(scheduling.tolerations),
                    affinity: scheduling.affinity.filter(|a| *a != Default::default()),
                    topology_spread_constraints: non_empty(scheduling.topology_spread_constraints),
                    priority_class_name: scheduling.priority_class_name.filter(|p| !p.is_empty()),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Service in front of the peer port (only the peer port: the admin API
/// is never exposed through it, whatever the Service type).
pub fn service(input: &BuildInput<'_>) -> Service {
    let exposure = &input.agent.spec.exposure;
    let mut metadata = input.meta(input.names().workload);
    if !exposure.service_annotations.is_empty() {
        metadata.annotations = Some(exposure.service_annotations.clone());
    }
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(exposure.service_type.as_str().into()),
            selector: Some(names::selector_labels(&input.name())),
            ports: Some(vec![ServicePort {
                name: Some("peer".into()),
                port: i32::from(DEFAULT_PEER_PORT),
                target_port: Some(IntOrString::String("peer".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The addresses an agent advertises, most dialable first: the Service's
/// ClusterIP (works on every cluster, also without DNS), the Service's DNS
/// name, a LoadBalancer's ingress IP or hostname (peers outside the
/// cluster), then the tenant's own `spec.exposure.advertise` entries. For a
/// NodePort Service, list a node address with the node port in
/// `spec.exposure.advertise` (the operator does not read Nodes).
/// The most addresses [`advertise_addresses`] puts before the tenant's: the
/// ClusterIP, the DNS name and up to two LoadBalancer ingress entries
/// (validation leaves the tenant the rest of an agent's limit).
pub const OPERATOR_ADDRESSES: usize = 4;

pub fn advertise_addresses(svc: &Service, dns_endpoint: &str, extra: &[String]) -> Vec<String> {
    let port = DEFAULT_PEER_PORT;
    let mut out = Vec::new();
    let host = |h: &str| {
        if h.contains(':') {
            format!("[{h}]:{port}")
        } else {
            format!("{h}:{port}")
        }
    };
    if let Some(ip) = svc
        .spec
        .as_ref()
        .and_then(|s| s.cluster_ip.as_deref())
        .filter(|ip| !ip.is_empty() && *ip != "None")
    {
        out.push(host(ip));
    }
    out.push(dns_endpoint.to_string());
    for ing in svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .take(OPERATOR_ADDRESSES - 2)
    {
        if let Some(h) = ing.ip.as_deref().or(ing.hostname.as_deref()) {
            out.push(host(h));
        }
    }
    for a in extra {
        if !out.contains(a) {
            out.push(a.clone());
        }
    }
    out
}

/// The NetworkPolicy, plus — when the chart names a Prometheus namespace —
/// one rule letting that namespace's pods scrape the metrics port, and only
/// that port. Without the setting no rule is added, so the policies of
/// existing agents do not change.
pub fn network_policy(input: &BuildInput<'_>) -> NetworkPolicy {
    let mut np = base_network_policy(input);
    if !input.cfg.metrics_namespace_labels.is_empty()
        && let Some(spec) = np.spec.as_mut()
    {
        spec.ingress
            .get_or_insert_with(Vec::new)
            .push(NetworkPolicyIngressRule {
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(i32::from(DEFAULT_METRICS_PORT))),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                from: Some(vec![NetworkPolicyPeer {
                    namespace_selector: Some(LabelSelector {
                        match_labels: Some(input.cfg.metrics_namespace_labels.clone()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }]),
            });
    }
    np
}

/// The NetworkPolicy: the peer port is open (to `peerCidrs` or everyone:
/// peers authenticate each other), while the admin and metrics ports accept
/// only the operator's namespace. Egress stays open: agents must reach
/// their storage and peers wherever those are.
fn base_network_policy(input: &BuildInput<'_>) -> NetworkPolicy {
    let exposure = &input.agent.spec.exposure;
    let tcp = |p: u16| NetworkPolicyPort {
        port: Some(IntOrString::Int(i32::from(p))),
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let peer_from = if exposure.peer_cidrs.is_empty() {
        None
    } else {
        Some(
            exposure
                .peer_cidrs
                .iter()
                .map(|c| NetworkPolicyPeer {
                    ip_block: Some(IPBlock {
                        cidr: c.clone(),
                        except: None,
                    }),
                    ..Default::default()
                })
                .collect(),
        )
    };
    NetworkPolicy {
        metadata: input.meta(input.names().workload),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(names::selector_labels(&input.name())),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into(), "Egress".into()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    ports: Some(vec![tcp(DEFAULT_PEER_PORT)]),
                    from: peer_from,
                },
                NetworkPolicyIngressRule {
                    ports: Some(vec![tcp(DEFAULT_ADMIN_PORT), tcp(DEFAULT_METRICS_PORT)]),
                    from: Some(vec![NetworkPolicyPeer {
                        namespace_selector: Some(LabelSelector {
                            match_labels: Some(BTreeMap::from([(
                                "kubernetes.io/metadata.name".to_string(),
                                input.cfg.operator_namespace.clone(),
                            )])),
                            ..Default::default()
                        }),
                        pod_selector: operator_pods(input.cfg),
                        ..Default::default()
                    }]),
                },
            ]),
            egress: Some(egress_rules(input.cfg)),
        }),
    }
}

/// Only the operator's own pods (by label) in its namespace reach the admin
/// and metrics ports: the public repository runs in that namespace too.
fn operator_pods(cfg: &OperatorConfig) -> Option<LabelSelector> {
    (!cfg.operator_pod_labels.is_empty()).then(|| LabelSelector {
        match_labels: Some(cfg.operator_pod_labels.clone()),
        ..Default::default()
    })
}

/// Egress of an agent pod: DNS, every pod of the cluster (peers, the
/// repository), and outside the cluster the configured ranges minus the
/// private ones and — unless node credentials are allowed — the
/// instance-metadata service, so a tenant's agent never acts with the
/// node's cloud identity.
pub fn egress_rules(cfg: &OperatorConfig) -> Vec<NetworkPolicyEgressRule> {
    let port = |p: i32, proto: &str| NetworkPolicyPort {
        port: Some(IntOrString::Int(p)),
        protocol: Some(proto.into()),
        ..Default::default()
    };
    let mut except: Vec<&str> = cfg.egress.except.iter().map(String::as_str).collect();
    if !cfg.allow_node_credentials {
        except.extend_from_slice(METADATA_RANGES);
    }
    let outside: Vec<NetworkPolicyPeer> = cfg
        .egress
        .cidrs
        .iter()
        .map(|c| {
            // The API server requires every `except` strictly inside its `cidr`.
            let inside: Vec<String> = except
                .iter()
                .filter(|e| cidr_strictly_contains(c, e))
                .map(|e| e.to_string())
                .collect();
            NetworkPolicyPeer {
                ip_block: Some(IPBlock {
                    cidr: c.clone(),
                    except: (!inside.is_empty()).then_some(inside),
                }),
                ..Default::default()
            }
        })
        .collect();
    let cluster_pods = NetworkPolicyPeer {
        namespace_selector: Some(LabelSelector::default()),
        ..Default::default()
    };
    let mut rules = vec![
        NetworkPolicyEgressRule {
            ports: Some(vec![port(53, "UDP"), port(53, "TCP")]),
            to: Some(vec![cluster_pods.clone()]),
        },
        NetworkPolicyEgressRule {
            ports: None,
            to: Some(vec![cluster_pods]),
        },
    ];
    if !outside.is_empty() {
        rules.push(NetworkPolicyEgressRule {
            ports: None,
            to: Some(outside),
        });
    }
    rules
}

/// Is `inner` a strictly smaller range inside `outer` (same address family)?
pub fn cidr_strictly_contains(outer: &str, inner: &str) -> bool {
    /// Address as the top bits of a u128, prefix length counted in those bits, family.
    fn parse(c: &str) -> Option<(u128, u32, bool)> {
        let (ip, bits) = c.split_once('/')?;
        let bits: u32 = bits.parse().ok()?;
        match ip.parse::<std::net::IpAddr>().ok()? {
            std::net::IpAddr::V4(a) if bits <= 32 => {
                Some((u128::from(u32::from(a)) << 96, bits, false))
            }
            std::net::IpAddr::V6(a) if bits <= 128 => Some((u128::from(a), bits, true)),
            _ => None,
        }
    }
    let (Some((o, ob, o6)), Some((i, ib, i6))) = (parse(outer), parse(inner)) else {
        return false;
    };
    let mask = if ob == 0 { 0 } else { u128::MAX << (128 - ob) };
    o6 == i6 && ib > ob && (o & mask) == (i & mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fs_agent, s3_agent};

    fn build<T>(agent: &Agent, f: impl Fn(&BuildInput<'_>) -> T) -> T {
        let cfg = OperatorConfig::default();
        let input = BuildInput {
            agent,
            namespace: "tenant-a",
            config_toml: "listen = \"0.0.0.0:7400\"\n",
            credentials_version: Some("42"),
            cfg: &cfg,
        };
        f(&input)
    }

    #[test]
    fn the_cluster_ip_is_advertised_first_then_dns_then_outside_addresses() {
        use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
        let a = s3_agent("alice", "tenant-a");
        let mut svc = build(&a, service);
        let dns = "caravan-alice.tenant-a.svc:7400";
        assert_eq!(advertise_addresses(&svc, dns, &[]), [dns]);
        svc.spec.as_mut().unwrap().cluster_ip = Some("10.233.0.17".into());
        svc.status = Some(ServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some("203.0.113.5".into()),
                    ..Default::default()
                }]),
            }),
            ..Default::default()
        });
        let extra = vec!["peer.example.org:443".to_string(), dns.to_string()];
        assert_eq!(
            advertise_addresses(&svc, dns, &extra),
            [
                "10.233.0.17:7400",
                dns,
                "203.0.113.5:7400",
                "peer.example.org:443"
            ]
        );
        svc.spec.as_mut().unwrap().cluster_ip = Some("fd00::5".into());
        assert_eq!(advertise_addresses(&svc, dns, &[])[0], "[fd00::5]:7400");
    }

    #[test]
    fn every_child_is_owned_by_the_agent_and_labelled() {
        let a = s3_agent("alice", "tenant-a");
        let metas = [
            build(&a, |i| identity_secret(i, "k", "t").metadata),
            build(&a, |i| config_map(i).metadata),
            build(&a, |i| deployment(i).metadata),
            build(&a, |i| service(i).metadata),
            build(&a, |i| network_policy(i).metadata),
        ];
        for m in metas {
            let owners = m.owner_references.unwrap();
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].kind, "Agent");
            assert_eq!(owners[0].uid, "uid-alice");
            assert_eq!(owners[0].controller, Some(true));
            assert_eq!(m.namespace.as_deref(), Some("tenant-a"));
            let labels = m.labels.unwrap();
            assert_eq!(labels["app.kubernetes.io/managed-by"], "caravan-operator");
            assert_eq!(labels["caravan.dev/agent"], "alice");
        }
    }

    #[test]
    fn identity_secret_is_immutable_with_both_keys() {
        let a = fs_agent("alice", "tenant-a");
        let s = build(&a, |i| {
            identity_secret(i, "caravan-secret-key-v1:abc\n", "00ff")
        });
        assert_eq!(s.metadata.name.as_deref(), Some("caravan-alice-identity"));
        assert_eq!(s.immutable, Some(true));
        let data = s.data.unwrap();
        assert_eq!(data["identity.key"].0, b"caravan-secret-key-v1:abc\n");
        assert_eq!(data["admin.token"].0, b"00ff");
        assert!(s.metadata.annotations.is_none());
        // Kept: no owner (not garbage-collected with the Agent), and the
        // uid of the Agent it was made for.
        let mut keeper = fs_agent("alice", "tenant-a");
        keeper.spec.keep_identity = true;
        let kept = build(&keeper, |i| identity_secret(i, "k", "t"));
        assert_eq!(kept.metadata.owner_references, None);
        assert_eq!(
            kept.metadata.annotations.unwrap()[KEPT_FOR_UID],
            "uid-alice"
        );
        assert_eq!(kept.immutable, Some(true));
    }

    #[test]
    fn pod_is_locked_down() {
        let a = s3_agent("alice", "tenant-a");
        let d = build(&a, deployment);
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(1));
        assert_eq!(spec.strategy.unwrap().type_.as_deref(), Some("Recreate"));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let c = &pod.containers[0];
        let sc = c.security_context.clone().unwrap();
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_string()]));
        assert_eq!(sc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        let res = c.resources.clone().unwrap();
        assert!(res.requests.unwrap().contains_key("memory"));
        assert!(res.limits.unwrap().contains_key("memory"));
        assert_eq!(
            c.command.clone().unwrap(),
            [
                "caravan-agent",
                "run",
                "--config",
                "/etc/caravan/agent.toml"
            ]
        );
        assert_eq!(c.image.as_deref(), Some("caravan/agent:dev"));
        let ready = c.readiness_probe.clone().unwrap().http_get.unwrap();
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        assert_eq!(ready.port, IntOrString::String("metrics".into()));
        let live = c.liveness_probe.clone().unwrap().http_get.unwrap();
        assert_eq!(live.path.as_deref(), Some("/livez"));
        let ports: Vec<i32> = c
            .ports
            .clone()
            .unwrap()
            .iter()
            .map(|p| p.container_port)
            .collect();
        assert_eq!(ports, [7400, 7401, 9400]);
    }

    #[test]
    fn secrets_are_mounted_read_only() {
        let a = s3_agent("alice", "tenant-a");
        let pod = build(&a, deployment).spec.unwrap().template.spec.unwrap();
        let mounts = pod.containers[0].volume_mounts.clone().unwrap();
        let find = |n: &str| mounts.iter().find(|m| m.name == n).unwrap().clone();
        assert_eq!(find("identity").read_only, Some(true));
        assert_eq!(find("identity").mount_path, "/var/run/caravan/identity");
        assert_eq!(find("storage-credentials").read_only, Some(true));
        assert_eq!(
            find("storage-credentials").mount_path,
            "/var/run/caravan/storage"
        );
        assert_eq!(find("config").read_only, Some(true));
        assert!(
            mounts.iter().all(|m| m.name != "data"),
            "s3 needs no data volume"
        );
        let vols = pod.volumes.unwrap();
        let cred = vols
            .iter()
            .find(|v| v.name == "storage-credentials")
            .unwrap();
        assert_eq!(
            cred.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("alice-storage")
        );
    }

    #[test]
    fn fs_agent_gets_an_empty_dir_or_its_claim_at_data() {
        let mut a = fs_agent("alice", "tenant-a");
        let pod = build(&a, deployment).spec.unwrap().template.spec.unwrap();
        let data = pod
            .volumes
            .clone()
            .unwrap()
            .into_iter()
            .find(|v| v.name == "data")
            .unwrap();
        assert!(data.empty_dir.is_some());
        assert!(
            pod.volumes
                .unwrap()
                .iter()
                .all(|v| v.name != "storage-credentials")
        );
        a.spec.storage.data_volume = Some(crate::crd::agent::DataVolumeSpec {
            claim_name: Some("alice-data".into()),
            size_limit: None,
        });
        let pod = build(&a, deployment).spec.unwrap().template.spec.unwrap();
        let data = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "data")
            .unwrap();
        assert_eq!(
            data.persistent_volume_claim.unwrap().claim_name,
            "alice-data"
        );
    }

    #[test]
    fn config_change_changes_the_pod_template() {
        let a = fs_agent("alice", "tenant-a");
        let cfg = OperatorConfig::default();
        let tmpl = |toml: &str| {
            let input = BuildInput {
                agent: &a,
                namespace: "tenant-a",
                config_toml: toml,
                credentials_version: None,
                cfg: &cfg,
            };
            deployment(&input)
                .spec
                .unwrap()
                .template
                .metadata
                .unwrap()
                .annotations
                .unwrap()
        };
        assert_ne!(
            tmpl("a = 1")[CONFIG_HASH_ANNOTATION],
            tmpl("a = 2")[CONFIG_HASH_ANNOTATION]
        );
        assert_eq!(tmpl("a = 1"), tmpl("a = 1"));
    }

    #[test]
    fn service_exposes_only_the_peer_port() {
        let mut a = s3_agent("alice", "tenant-a");
        a.spec.exposure.service_type = crate::crd::agent::ServiceType::LoadBalancer;
        let s = build(&a, service).spec.unwrap();
        assert_eq!(s.type_.as_deref(), Some("LoadBalancer"));
        let ports = s.ports.unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(ports[0].port, 7400);
        assert_eq!(s.selector.unwrap()["caravan.dev/agent"], "alice");
    }

    #[test]
    fn network_policy_limits_admin_and_metrics_to_the_operator_namespace() {
        let mut a = s3_agent("alice", "tenant-a");
        let np = build(&a, network_policy).spec.unwrap();
        assert_eq!(
            np.policy_types,
            Some(vec!["Ingress".to_string(), "Egress".to_string()])
        );
        let rules = np.ingress.unwrap();
        assert_eq!(rules[0].from, None, "peer port open to all by default");
        let admin = &rules[1];
        let ns = admin.from.clone().unwrap()[0]
            .namespace_selector
            .clone()
            .unwrap();
        assert_eq!(
            ns.match_labels.unwrap()["kubernetes.io/metadata.name"],
            "caravan-system"
        );
        // …and within it only the operator's pods, not the public repository.
        let pods = admin.from.clone().unwrap()[0].pod_selector.clone().unwrap();
        assert_eq!(
            pods.match_labels.unwrap()["app.kubernetes.io/name"],
            "caravan-operator"
        );
        a.spec.exposure.peer_cidrs = vec!["203.0.113.0/24".into()];
        let np = build(&a, network_policy).spec.unwrap();
        let from = np.ingress.unwrap()[0].from.clone().unwrap();
        assert_eq!(from[0].ip_block.clone().unwrap().cidr, "203.0.113.0/24");
    }

    #[test]
    fn egress_allows_dns_cluster_and_internet_but_never_the_metadata_service() {
        let a = s3_agent("alice", "tenant-a");
        let np = build(&a, network_policy).spec.unwrap();
        let rules = np.egress.unwrap();
        let blocks: Vec<IPBlock> = rules
            .iter()
            .flat_map(|r| r.to.clone().unwrap_or_default())
            .filter_map(|p| p.ip_block)
            .collect();
        assert_eq!(blocks.len(), 2, "{blocks:?}");
        let v4 = blocks.iter().find(|b| b.cidr == "0.0.0.0/0").unwrap();
        let ex = v4.except.clone().unwrap();
        for must in [
            "169.254.0.0/16",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
        ] {
            assert!(
                ex.contains(&must.to_string()),
                "{must} not excepted: {ex:?}"
            );
        }
        let v6 = blocks.iter().find(|b| b.cidr == "::/0").unwrap();
        let ex6 = v6.except.clone().unwrap();
        assert!(ex6.contains(&"fd00:ec2::254/128".to_string()));
        assert!(
            ex6.iter().all(|e| e.contains(':')),
            "v4 except in a v6 block"
        );
        // DNS is allowed (port 53 to cluster pods).
        assert!(rules.iter().any(|r| {
            r.ports
                .iter()
                .flatten()
                .any(|p| p.port == Some(IntOrString::Int(53)))
        }));

        // A provider that allows node credentials drops only the metadata ranges.
        let cfg = OperatorConfig {
            allow_node_credentials: true,
            ..OperatorConfig::default()
        };
        let input = BuildInput {
            agent: &a,
            namespace: "tenant-a",
            config_toml: "",
            credentials_version: None,
            cfg: &cfg,
        };
        let np = network_policy(&input).spec.unwrap();
        let ex: Vec<String> = np
            .egress
            .unwrap()
            .iter()
            .flat_map(|r| r.to.clone().unwrap_or_default())
            .filter_map(|p| p.ip_block)
            .flat_map(|b| b.except.unwrap_or_default())
            .collect();
        assert!(!ex.contains(&"169.254.0.0/16".to_string()));
        assert!(ex.contains(&"10.0.0.0/8".to_string()));
    }

    #[test]
    fn cidr_containment() {
        assert!(cidr_strictly_contains("0.0.0.0/0", "169.254.0.0/16"));
        assert!(cidr_strictly_contains("10.0.0.0/8", "10.1.0.0/16"));
        assert!(!cidr_strictly_contains("10.0.0.0/8", "10.0.0.0/8"));
        assert!(!cidr_strictly_contains("10.0.0.0/8", "11.0.0.0/16"));
        assert!(!cidr_strictly_contains("0.0.0.0/0", "fe80::/10"));
        assert!(cidr_strictly_contains("::/0", "fd00:ec2::254/128"));
        assert!(!cidr_strictly_contains("203.0.113.0/24", "169.254.0.0/16"));
        assert!(!cidr_strictly_contains("garbage", "10.0.0.0/8"));
    }

    fn pod_spec(a: &Agent, cfg: &OperatorConfig) -> PodSpec {
        let input = BuildInput {
            agent: a,
            namespace: "tenant-a",
            config_toml: "listen = \"0.0.0.0:7400\"\n",
            credentials_version: Some("42"),
            cfg,
        };
        deployment(&input).spec.unwrap().template.spec.unwrap()
    }

    /// The pod template an Agent gets from this operator with default
    /// settings. When it changes, every running agent restarts on the
    /// operator upgrade that brings the change: update the golden file
    /// (`CARAVAN_UPDATE_GOLDEN=1`) only on purpose, and say so in the
    /// release notes.
    #[test]
    fn default_pod_template_is_stable_across_operator_versions() {
        let cfg = OperatorConfig::default();
        let mut out = String::new();
        for a in [s3_agent("alice", "tenant-a"), fs_agent("bob", "tenant-a")] {
            let input = BuildInput {
                agent: &a,
                namespace: "tenant-a",
                config_toml: "listen = \"0.0.0.0:7400\"\n",
                credentials_version: Some("42"),
                cfg: &cfg,
            };
            let tmpl = deployment(&input).spec.unwrap().template;
            out.push_str(&serde_json::to_string_pretty(&tmpl).unwrap());
            out.push('\n');
        }
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/testdata/agent-pod-templates.json");
        if std::env::var_os("CARAVAN_UPDATE_GOLDEN").is_some() {
            std::fs::write(&path, &out).unwrap();
        }
        let golden = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            golden == out,
            "the default agent pod template changed: every agent would restart on upgrade. \
             If intended, rerun with CARAVAN_UPDATE_GOLDEN=1 and note it in the changelog.\n{out}"
        );
    }

    #[test]
    fn version_label_is_on_children_but_never_on_the_pod_template() {
        let a = s3_agent("alice", "tenant-a");
        let d = build(&a, deployment);
        assert_eq!(
            d.metadata.labels.unwrap()["app.kubernetes.io/version"],
            OPERATOR_VERSION
        );
        let tmpl = d.spec.unwrap().template.metadata.unwrap();
        assert!(
            !tmpl
                .labels
                .unwrap()
                .contains_key("app.kubernetes.io/version")
        );
        for l in [
            build(&a, |i| service(i).metadata.labels),
            build(&a, |i| config_map(i).metadata.labels),
            build(&a, |i| network_policy(i).metadata.labels),
        ] {
            assert_eq!(l.unwrap()["app.kubernetes.io/version"], OPERATOR_VERSION);
        }
    }

    #[test]
    fn scheduling_defaults_apply_field_by_field_and_the_agent_wins() {
        use crate::crd::agent::SchedulingSpec;
        use k8s_openapi::api::core::v1::Toleration;
        let mut cfg = OperatorConfig::default();
        let pod = pod_spec(&s3_agent("alice", "tenant-a"), &cfg);
        assert_eq!(pod.node_selector, None);
        assert_eq!(pod.tolerations, None);
        assert_eq!(pod.affinity, None);
        assert_eq!(pod.topology_spread_constraints, None);
        assert_eq!(pod.priority_class_name, None);
        assert_eq!(pod.image_pull_secrets, None);

        cfg.default_scheduling = SchedulingSpec {
            node_selector: Some(BTreeMap::from([("pool".into(), "agents".into())])),
            tolerations: Some(vec![Toleration {
                key: Some("dedicated".into()),
                operator: Some("Equal".into()),
                value: Some("agents".into()),
                effect: Some("NoSchedule".into()),
                ..Default::default()
            }]),
            priority_class_name: Some("caravan-agents".into()),
            ..Default::default()
        };
        cfg.image_pull_secrets = vec!["regcred".into()];
        let mut a = s3_agent("alice", "tenant-a");
        a.spec.scheduling = Some(SchedulingSpec {
            node_selector: Some(BTreeMap::from([("pool".into(), "gold".into())])),
            ..Default::default()
        });
        let pod = pod_spec(&a, &cfg);
        assert_eq!(pod.node_selector.unwrap()["pool"], "gold", "the Agent wins");
        assert_eq!(
            pod.tolerations.unwrap()[0].key.as_deref(),
            Some("dedicated"),
            "the default fills what the Agent left out"
        );
        assert_eq!(pod.priority_class_name.as_deref(), Some("caravan-agents"));
        assert_eq!(pod.image_pull_secrets.unwrap()[0].name, "regcred");
    }

    #[test]
    fn json_logs_add_the_flag_and_text_leaves_the_command_alone() {
        use crate::crd::agent::LogFormat;
        let mut cfg = OperatorConfig::default();
        let mut a = s3_agent("alice", "tenant-a");
        let cmd = |a: &Agent, cfg: &OperatorConfig| {
            pod_spec(a, cfg).containers[0].command.clone().unwrap()
        };
        assert_eq!(cmd(&a, &cfg).len(), 4);
        cfg.default_log_format = LogFormat::Json;
        assert_eq!(cmd(&a, &cfg)[4..], ["--log-format", "json"]);
        a.spec.log_format = Some(LogFormat::Text);
        assert_eq!(cmd(&a, &cfg).len(), 4, "the Agent's own setting wins");
    }

    #[test]
    fn metrics_namespace_selector_opens_only_the_metrics_port() {
        let a = s3_agent("alice", "tenant-a");
        let mut cfg = OperatorConfig::default();
        let np = |cfg: &OperatorConfig| {
            let input = BuildInput {
                agent: &a,
                namespace: "tenant-a",
                config_toml: "",
                credentials_version: None,
                cfg,
            };
            network_policy(&input).spec.unwrap().ingress.unwrap()
        };
        assert_eq!(np(&cfg).len(), 2);
        cfg.metrics_namespace_labels =
            BTreeMap::from([("kubernetes.io/metadata.name".into(), "monitoring".into())]);
        let rules = np(&cfg);
        assert_eq!(rules.len(), 3);
        let ports: Vec<_> = rules[2]
            .ports
            .clone()
            .unwrap()
            .into_iter()
            .map(|p| p.port)
            .collect();
        assert_eq!(ports, [Some(IntOrString::Int(9400))]);
        let sel = rules[2].from.clone().unwrap()[0]
            .namespace_selector
            .clone()
            .unwrap();
        assert_eq!(
            sel.match_labels.unwrap()["kubernetes.io/metadata.name"],
            "monitoring"
        );
    }
}

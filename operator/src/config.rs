//! Operator-wide settings that come from the chart (flags or environment),
//! kept apart from the per-Agent spec so the pure builders can be tested
//! with any combination.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::crd::agent::{LogFormat, SchedulingSpec};

/// What every Agent's children share.
#[derive(Clone, Debug, PartialEq)]
pub struct OperatorConfig {
    /// Image of the agent container, e.g. `caravan/agent:dev`.
    pub agent_image: String,
    /// `Always`, `IfNotPresent` or `Never`.
    pub agent_image_pull_policy: String,
    /// Namespace the operator runs in; its pods may reach the agents' admin
    /// and metrics ports through the NetworkPolicy.
    pub operator_namespace: String,
    /// Repositories used when an Agent lists none.
    pub default_repositories: Vec<String>,
    /// Resources of an agent container whose Agent sets none.
    pub default_resources: ResourceRequirements,
    /// Labels of the operator's pods: only pods with all of them, in the
    /// operator namespace, reach an agent's admin and metrics ports (the
    /// public repository runs in that namespace too).
    pub operator_pod_labels: BTreeMap<String, String>,
    /// Where agent pods may open connections (see [`EgressConfig`]).
    pub egress: EgressConfig,
    /// When false (the default), storage options that reach the node's
    /// cloud identity (instance metadata, assumed roles, profiles) are
    /// refused and the metadata credential chain is switched off.
    pub allow_node_credentials: bool,
    /// Log format of agents whose Agent sets none.
    pub default_log_format: LogFormat,
    /// Scheduling of agent pods, field by field, where the Agent sets none.
    pub default_scheduling: SchedulingSpec,
    /// Secrets (in each tenant's namespace) used to pull the agent image.
    pub image_pull_secrets: Vec<String>,
    /// Labels of namespaces (besides the operator's) whose pods may scrape
    /// the agents' metrics port through the NetworkPolicy, e.g. Prometheus'.
    /// Empty: none.
    pub metrics_namespace_labels: BTreeMap<String, String>,
    /// What tenants may set in their Agent's `spec.scheduling` that reaches
    /// other tenants (see [`TenantScheduling`]). Default: nothing.
    pub tenant_scheduling: TenantScheduling,
    /// What tenants may set in their Agent's `spec.exposure` (see
    /// [`TenantExposure`]). Default: a ClusterIP Service, no annotations.
    pub tenant_exposure: TenantExposure,
}

/// The provider's allow-list of Service settings an Agent (a tenant) may
/// set itself. A NodePort opens a port on every node and uses up the
/// cluster's range; a LoadBalancer costs money and gets a public address;
/// an annotation steers controllers the provider runs (a load balancer's
/// address, an IP shared with another Service, an external-dns name). So
/// by default a tenant gets a ClusterIP Service and sets no annotation.
#[derive(Clone, Debug, PartialEq)]
pub struct TenantExposure {
    /// `spec.exposure.serviceType` values tenants may use.
    pub service_types: Vec<crate::crd::agent::ServiceType>,
    /// Prefixes a key of `spec.exposure.serviceAnnotations` must start with
    /// (e.g. `service.beta.kubernetes.io/aws-load-balancer-`). Empty: none.
    pub annotation_prefixes: Vec<String>,
}

impl Default for TenantExposure {
    fn default() -> Self {
        TenantExposure {
            service_types: vec![crate::crd::agent::ServiceType::ClusterIP],
            annotation_prefixes: Vec::new(),
        }
    }
}

/// The provider's allow-list of scheduling settings an Agent (a tenant) may
/// set itself. A priority class preempts other tenants' pods and the
/// provider's own (`system-node-critical` evicts almost anything), and a
/// toleration (`operator: Exists`) lands the agent on nodes whose taints
/// keep tenants off; so by default a tenant may set neither, and the
/// chart's `agent.scheduling` defaults (the provider's) are not limited.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct TenantScheduling {
    /// `spec.scheduling.priorityClassName` values tenants may use.
    pub priority_class_names: Vec<String>,
    /// Tolerations tenants may list in `spec.scheduling.tolerations`; each
    /// of a tenant's must equal one of these (key, operator, value, effect,
    /// tolerationSeconds).
    pub tolerations: Vec<k8s_openapi::api::core::v1::Toleration>,
}

/// Egress of agent pods. Pods of the cluster (other agents, the repository)
/// and DNS are always reachable; outside the cluster only `cidrs`, minus
/// `except`, minus the instance-metadata ranges unless node credentials are
/// allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressConfig {
    /// Destinations outside the cluster: peers, repositories, storage endpoints.
    pub cidrs: Vec<String>,
    /// Never reachable even inside `cidrs` (private ranges: nodes, the
    /// Kubernetes API, cloud-internal services).
    pub except: Vec<String>,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            cidrs: vec!["0.0.0.0/0".into(), "::/0".into()],
            except: DEFAULT_EGRESS_EXCEPT
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// Private and shared address ranges agent pods may not reach by default.
pub const DEFAULT_EGRESS_EXCEPT: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
];

/// Instance-metadata ranges (link-local, AWS/GCP/Azure 169.254.169.254, AWS
/// ECS 169.254.170.2, AWS IPv6 fd00:ec2::254): refused to agent pods unless
/// node credentials are allowed.
pub const METADATA_RANGES: &[&str] = &["169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128"];

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            agent_image: "caravan/agent:dev".into(),
            agent_image_pull_policy: "IfNotPresent".into(),
            operator_namespace: "caravan-system".into(),
            default_repositories: Vec::new(),
            default_resources: default_agent_resources(),
            operator_pod_labels: BTreeMap::from([(
                "app.kubernetes.io/name".to_string(),
                "caravan-operator".to_string(),
            )]),
            egress: EgressConfig::default(),
            allow_node_credentials: false,
            default_log_format: LogFormat::Text,
            default_scheduling: SchedulingSpec::default(),
            image_pull_secrets: Vec::new(),
            metrics_namespace_labels: BTreeMap::new(),
            tenant_scheduling: TenantScheduling::default(),
            tenant_exposure: TenantExposure::default(),
        }
    }
}

/// Small but bounded: an idle agent needs little, and limits keep one
/// tenant's agent from starving its neighbours.
pub fn default_agent_resources() -> ResourceRequirements {
    let q = |s: &str| Quantity(s.to_string());
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), q("50m")),
            ("memory".to_string(), q("64Mi")),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".to_string(), q("1")),
            ("memory".to_string(), q("256Mi")),
        ])),
        ..Default::default()
    }
}

/// Version of the operator, written as `app.kubernetes.io/version` on the
/// objects it makes (never on pod templates: an operator upgrade alone must
/// not restart agents).
pub const OPERATOR_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Field manager of every server-side apply the operator makes.
pub const FIELD_MANAGER: &str = "caravan-operator";

/// Names and mount points shared by the builders and the agent config.
pub mod paths {
    /// Where the identity Secret is mounted.
    pub const IDENTITY_DIR: &str = "/var/run/caravan/identity";
    /// Key of the identity Secret holding `SecretKey::to_text()`.
    pub const IDENTITY_KEY: &str = "identity.key";
    /// Key of the identity Secret holding the admin API bearer token.
    pub const ADMIN_TOKEN_KEY: &str = "admin.token";
    /// Where the user's storage-credentials Secret is mounted.
    pub const CREDENTIALS_DIR: &str = "/var/run/caravan/storage";
    /// Where the config ConfigMap is mounted.
    pub const CONFIG_DIR: &str = "/etc/caravan";
    /// Key of the ConfigMap holding the agent's TOML config.
    pub const CONFIG_KEY: &str = "agent.toml";
    /// Mount point of the data volume (the `fs` scheme's root).
    pub const DATA_DIR: &str = "/data";
}

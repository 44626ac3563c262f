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
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            agent_image: "caravan/agent:dev".into(),
            agent_image_pull_policy: "IfNotPresent".into(),
            operator_namespace: "caravan-system".into(),
            default_repositories: Vec::new(),
            default_resources: default_agent_resources(),
            default_log_format: LogFormat::Text,
            default_scheduling: SchedulingSpec::default(),
            image_pull_secrets: Vec::new(),
            metrics_namespace_labels: BTreeMap::new(),
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

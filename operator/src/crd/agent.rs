//! `Agent`: one user's Caravan agent, run by the operator as a one-pod Deployment.
// kube's `printcolumn(...)` repeats keys like `type_` per column, which
// clippy mistakes for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a Caravan agent: where the user's storage is, which
/// repositories to announce to, and how the agent pod is exposed and sized.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "caravan.dev",
    version = "v1alpha1",
    kind = "Agent",
    plural = "agents",
    singular = "agent",
    shortname = "cva",
    category = "caravan",
    namespaced,
    status = "AgentStatus",
    derive = "PartialEq",
    doc = "A Caravan agent: a pod that holds one user's storage credentials and swaps encrypted chunks with other agents. The operator creates its identity Secret, config ConfigMap, Deployment, Service and NetworkPolicy, all owned by the Agent.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Ready, Degraded or Sleeping"
    ),
    printcolumn(
        name = "Agent ID",
        type_ = "string",
        json_path = ".status.agentId",
        description = "The agent's public id (cv1-…)"
    ),
    printcolumn(
        name = "Scheme",
        type_ = "string",
        json_path = ".spec.storage.scheme",
        description = "OpenDAL storage scheme"
    ),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        priority = "1",
        description = "host:port other agents dial"
    ),
    printcolumn(
        name = "Awake",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Awake\")].reason",
        priority = "1",
        description = "Scale to zero: why the agent sleeps or is awake"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Degraded\")].reason",
        priority = "1",
        description = "Why the agent is degraded"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AgentSpec {
    /// The user's storage: an OpenDAL scheme, its non-secret options, and the
    /// Secret (in this namespace) that holds the secret options.
    pub storage: StorageSpec,

    /// Repository (tracker) base URLs the agent announces itself to and looks
    /// peers up in, e.g. `http://caravan-repository.caravan-system.svc:7500`.
    /// When empty, the operator's default repositories (a chart value) are used.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-validations" = [{
        "rule": "self.all(r, r.startsWith('http://') || r.startsWith('https://'))",
        "message": "every repository must be an http:// or https:// URL"
    }]))]
    pub repositories: Vec<String>,

    /// CPU and memory for the agent container. When omitted the operator's
    /// defaults apply (requests 50m CPU / 64Mi memory, limits 1 CPU / 256Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// How the agent's peer port is exposed.
    #[serde(default)]
    pub exposure: ExposureSpec,

    /// Log filter of the agent process (`RUST_LOG` syntax), e.g. `info` or
    /// `caravan_agent=debug`.
    #[serde(default = "default_log_level")]
    #[schemars(length(min = 1, max = 256))]
    pub log_level: String,

    /// Format of the agent's logs: `text` or `json` (one JSON object per
    /// line, for log collectors). When omitted, the operator's default (the
    /// chart value `agent.logFormat`) applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,

    /// Where the agent pod may run. Each field given here replaces the
    /// operator's default for that field (chart values under
    /// `agent.scheduling`); fields left out keep the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduling: Option<SchedulingSpec>,

    /// Scale the agent to zero pods while it has nothing to do, and back to
    /// one when it has: a Share or TrustGrant of this Agent changes, a
    /// rescan or an offline-seeding URL refresh is due, or a subscribe Share
    /// in the cluster needs this agent as its publisher (unless that share
    /// is offline-seeded). Omitted: the agent always runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_to_zero: Option<ScaleToZeroSpec>,

    /// Keep the agent's identity (its key, so its agent id) when this Agent
    /// is deleted: the identity Secret is created without an owner
    /// reference, so it is not garbage-collected, and an Agent of the same
    /// name created later in this namespace takes it up (an
    /// `IdentityReused` Event says so): the same agent id, so its grants'
    /// issuer, its subscribers' publisher and, with the same storage, its
    /// shares stay. Read when the identity is created; later edits change
    /// nothing (add or remove the Secret's owner reference by hand). Delete
    /// the Secret `caravan-NAME-identity` to start afresh. Omitted: the
    /// identity goes with the Agent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub keep_identity: bool,
}

/// When an idle agent is scaled to zero.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "duration(self.idleAfter) >= duration('10s') && duration(self.idleAfter) <= duration('24h')",
    "message": "idleAfter must be between 10s and 24h"
}]))]
pub struct ScaleToZeroSpec {
    /// How long the agent must have had no fetch, serve or pending work
    /// before its pod is stopped (a duration such as `20s`, `15m`, `1h`;
    /// 10s to 24h).
    #[serde(default = "default_idle_after")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h)$"))]
    pub idle_after: String,
}

impl Default for ScaleToZeroSpec {
    fn default() -> Self {
        Self {
            idle_after: default_idle_after(),
        }
    }
}

fn default_idle_after() -> String {
    "15m".to_string()
}

/// Log format of the agent process.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The value of the agent's `--log-format` flag.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Scheduling constraints of the agent pod (the pod spec fields of the same names).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SchedulingSpec {
    /// Node labels the pod's node must have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("maxProperties" = 32))]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Taints the pod tolerates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    pub tolerations: Option<Vec<Toleration>>,
    /// Node and pod (anti-)affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How agent pods spread over zones or nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    /// PriorityClass of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub priority_class_name: Option<String>,
}

impl SchedulingSpec {
    /// `self`'s fields where set, `defaults`' elsewhere.
    pub fn over(&self, defaults: &SchedulingSpec) -> SchedulingSpec {
        SchedulingSpec {
            node_selector: self
                .node_selector
                .clone()
                .or_else(|| defaults.node_selector.clone()),
            tolerations: self
                .tolerations
                .clone()
                .or_else(|| defaults.tolerations.clone()),
            affinity: self.affinity.clone().or_else(|| defaults.affinity.clone()),
            topology_spread_constraints: self
                .topology_spread_constraints
                .clone()
                .or_else(|| defaults.topology_spread_constraints.clone()),
            priority_class_name: self
                .priority_class_name
                .clone()
                .or_else(|| defaults.priority_class_name.clone()),
        }
    }
}

fn default_log_level() -> String {
    "info".to_string()
}

/// Which storage holds the user's files and how to reach it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.scheme != 'fs' || !has(self.options) || !('root' in self.options) || self.options['root'] == '/data' || self.options['root'].startsWith('/data/')",
    "message": "with scheme fs, options.root must be /data or below it (the only writable mount)"
}]))]
pub struct StorageSpec {
    /// OpenDAL scheme: one of fs, memory, s3, gcs, azblob, gdrive, dropbox,
    /// onedrive, webdav. `fs` stores under the data volume mounted at /data.
    #[schemars(length(min = 1, max = 32), regex(pattern = r"^[a-z][a-z0-9-]*$"))]
    pub scheme: String,

    /// Non-secret options of the OpenDAL service (bucket, region, endpoint,
    /// root…). Keys are lower_snake_case. Secret options (keys, passwords,
    /// tokens) are refused here: put them in the Secret named by `secretRef`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 64))]
    pub options: BTreeMap<String, String>,

    /// The Secret holding the secret options, one key per option (for s3:
    /// `access_key_id`, `secret_access_key`). It must be in the Agent's own
    /// namespace; it is mounted read-only into the agent pod and never read
    /// into any status, log or event. Omit it for storage without secrets
    /// (e.g. `fs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretReference>,

    /// The volume mounted at /data, used by the `fs` scheme. An emptyDir
    /// (lost when the pod moves) unless `claimName` names a PersistentVolumeClaim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_volume: Option<DataVolumeSpec>,
}

/// A reference to a Secret in the Agent's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::names::OBJECT_NAME_PATTERN))]
    pub name: String,
    /// Namespace of the Secret. Only the Agent's own namespace is allowed
    /// (tenants never share Secrets); leave it empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// Where the `fs` scheme keeps files.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataVolumeSpec {
    /// An existing PersistentVolumeClaim in this namespace to mount at /data.
    /// When empty, an emptyDir is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::names::OBJECT_NAME_PATTERN))]
    pub claim_name: Option<String>,
    /// Size limit of the emptyDir (ignored with `claimName`), e.g. `1Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_limit: Option<Quantity>,
}

/// How the agent is reachable by other agents.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExposureSpec {
    /// Type of the Service in front of the peer port: ClusterIP (peers inside
    /// the cluster), NodePort or LoadBalancer (peers elsewhere).
    #[serde(default)]
    pub service_type: ServiceType,
    /// Annotations for the Service (e.g. for a cloud load balancer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub service_annotations: BTreeMap<String, String>,
    /// Extra addresses (host:port) other agents should dial, advertised in
    /// addition to the in-cluster Service address, e.g. a load balancer name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub advertise: Vec<String>,
    /// CIDR blocks allowed to reach the peer port. Empty means anyone (peers
    /// authenticate each other; the port is meant to be public).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub peer_cidrs: Vec<String>,
}

impl Default for ExposureSpec {
    fn default() -> Self {
        Self {
            service_type: ServiceType::ClusterIP,
            service_annotations: BTreeMap::new(),
            advertise: Vec::new(),
            peer_cidrs: Vec::new(),
        }
    }
}

/// Kubernetes Service type for the peer port.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ServiceType {
    /// Reachable inside the cluster only.
    #[default]
    ClusterIP,
    /// Reachable on every node's address.
    NodePort,
    /// Reachable through a cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// The string the Service API expects.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Summary of an agent's state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum AgentPhase {
    /// Created or rolling out; not serving yet.
    Pending,
    /// The agent pod is running and ready.
    Ready,
    /// Something needs a human: see the Degraded condition.
    Degraded,
    /// Scaled to zero while idle (`spec.scaleToZero`): no pod runs; the
    /// Awake condition says why and `wakeAt` when it is woken next.
    Sleeping,
}

impl AgentPhase {
    /// The phase as written in status.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentPhase::Pending => "Pending",
            AgentPhase::Ready => "Ready",
            AgentPhase::Degraded => "Degraded",
            AgentPhase::Sleeping => "Sleeping",
        }
    }
}

/// Observed state of an agent, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// The agent's public id (`cv1-…`), derived from its identity Secret.
    /// Give it to people who want to share with or trust this agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    /// host:port of the agent's peer Service inside the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Every host:port the agent advertises in tickets and announcements:
    /// the Service's ClusterIP (dialable even without cluster DNS), its DNS
    /// name, a LoadBalancer's address, then `spec.exposure.advertise`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Pending, Ready, Degraded or Sleeping: a summary of the conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AgentPhase>,
    /// With `spec.scaleToZero`: while Sleeping, when the operator wakes the
    /// agent for scheduled work (a rescan, a URL refresh); while awake, the
    /// scheduled time it was woken for, if that is why it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wake_at: Option<Time>,
    /// Ready, Progressing and Degraded (and Awake with `spec.scaleToZero`:
    /// False while scaled to zero; its reason says why it sleeps or wakes),
    /// each with the generation it describes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `.metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

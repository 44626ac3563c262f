//! `Share`: publish a folder of an Agent's storage, or subscribe to one.
//! The controller is `crate::shares`.
// kube's `printcolumn(...)` repeats keys like `type_` per column, which
// clippy mistakes for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired state of a share: exactly one of `publish` or `subscribe`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "caravan.dev",
    version = "v1alpha1",
    kind = "Share",
    plural = "shares",
    singular = "share",
    shortname = "cvs",
    category = "caravan",
    namespaced,
    status = "ShareStatus",
    derive = "PartialEq",
    doc = "A Caravan share: a folder of an Agent's storage published to chosen recipients, or another agent's share fetched into this Agent's storage and kept in sync with its new versions. Deleting a publish Share stops the agent serving it (the files in storage stay, and recipients keep what they already fetched); deleting a subscribe Share stops following it (the fetched files stay). The agent's bookkeeping under `.caravan/` is removed either way.",
    printcolumn(
        name = "Agent",
        type_ = "string",
        json_path = ".spec.agent",
        description = "The Agent that publishes or subscribes"
    ),
    printcolumn(
        name = "Share ID",
        type_ = "string",
        json_path = ".status.shareId",
        description = "Public id of the share"
    ),
    printcolumn(
        name = "Version",
        type_ = "integer",
        json_path = ".status.version",
        description = "Manifest sequence number"
    ),
    printcolumn(
        name = "Bytes Done",
        type_ = "integer",
        json_path = ".status.bytesDone",
        priority = "1"
    ),
    printcolumn(
        name = "Bytes Total",
        type_ = "integer",
        json_path = ".status.bytesTotal",
        priority = "1"
    ),
    printcolumn(name = "Peers", type_ = "integer", json_path = ".status.peers"),
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, Progressing, Ready or Degraded"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = "1",
        description = "Why the share is (not) ready"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.publish) != has(self.subscribe)",
    "message": "set exactly one of publish or subscribe"
}]))]
pub struct ShareSpec {
    /// Name of the Agent (in this namespace) that publishes or subscribes.
    /// Fixed once the Agent has taken the share (`status.agent`): to move a
    /// share to another Agent, delete this Share and create one for the
    /// other Agent. Until then (e.g. a misspelt name) it may be corrected.
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::names::OBJECT_NAME_PATTERN))]
    pub agent: String,
    /// Publish a folder of the Agent's storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishSpec>,
    /// Fetch someone else's share into the Agent's storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<SubscribeSpec>,
}

/// What to publish and to whom.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PublishSpec {
    /// Folder in the Agent's storage, relative to its root, e.g. `photos/2026/`.
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    /// Who may fetch it.
    #[serde(default)]
    pub recipients: RecipientsSpec,
    /// Stage encrypted chunks in the publisher's bucket and hand out presigned
    /// URLs, so recipients can fetch while the agent sleeps (s3, gcs, azblob).
    #[serde(default)]
    pub offline_seeding: bool,
    /// How often the agent rescans `path` (a duration such as `30s`, `5m`,
    /// `1h`; at least 5s). A new version is published only when the content
    /// changed, and only changed chunks travel. A spec change rescans at once.
    #[serde(default = "default_rescan")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h)$"))]
    pub rescan_interval: String,
}

fn default_rescan() -> String {
    "5m".to_string()
}

fn default_poll() -> String {
    "30s".to_string()
}

/// Recipients: explicit agent ids and/or everyone this agent trusts within a depth.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecipientsSpec {
    /// Agent ids (`cv1-…`) allowed to fetch.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000), inner(regex(pattern = r"^cv1(-[a-z2-7]{8}){7}$")))]
    pub agent_ids: Vec<String>,
    /// Also allow every agent trusted through a chain of at most this many
    /// hops of trust grants (0 = nobody beyond `agentIds`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 8))]
    pub trusted_within_depth: Option<u8>,
}

/// Which share to fetch and where to put it. Name the share in exactly one
/// way: `ticket`, `ticketSecretRef`, or `shareId` + `publisher` (for a share
/// published to the publisher's trusted agents: the agent finds holders
/// through its repositories and presents its trust chain).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "(has(self.ticket) ? 1 : 0) + (has(self.ticketSecretRef) ? 1 : 0) + (has(self.shareId) ? 1 : 0) == 1 && has(self.shareId) == has(self.publisher)",
    "message": "set exactly one of ticket, ticketSecretRef, or shareId together with publisher"
}]))]
pub struct SubscribeSpec {
    /// The ticket the publisher gave (its share key is wrapped for this agent,
    /// so it is safe to keep in a manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 65536))]
    pub ticket: Option<String>,
    /// A key of a Secret in this namespace holding the ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket_secret_ref: Option<SecretKeyRef>,
    /// Id of a share the publisher published to the agents it trusts
    /// (`status.shareId` of the publisher's Share). Needs `publisher`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub share_id: Option<String>,
    /// Agent id (`cv1-…`) of the publisher of `shareId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^cv1(-[a-z2-7]{8}){7}$"))]
    pub publisher: Option<String>,
    /// Folder in the Agent's storage to write the files into (relative, no
    /// `..`, not under `.caravan/`).
    #[schemars(length(min = 1, max = 1024))]
    pub destination: String,
    /// How often the agent looks for a newer version of the share (a
    /// duration such as `10s`, `1m`; at least 5s).
    #[serde(default = "default_poll")]
    #[schemars(regex(pattern = r"^[0-9]+(s|m|h)$"))]
    pub poll_interval: String,
}

/// A key of a Secret in the Share's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::names::OBJECT_NAME_PATTERN))]
    pub name: String,
    /// Key in the Secret's data.
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// Summary of a share's state.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SharePhase {
    /// Waiting for the Agent.
    Pending,
    /// Publishing or fetching.
    Progressing,
    /// Published, or fetched at the newest version known.
    Ready,
    /// Cannot proceed: see the Degraded condition's reason.
    Degraded,
}

/// A ticket for one explicit recipient.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RecipientTicket {
    /// The recipient's agent id.
    pub agent_id: String,
    /// The ticket: the share key is wrapped for this recipient alone, so it
    /// is safe to show and to copy into the recipient's Share.
    pub ticket: String,
}

/// Observed progress of a share, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShareStatus {
    /// The Agent that holds the share's declaration: recorded before the
    /// operator first declares it, so delete always stops the share on the
    /// Agent that serves or follows it, whatever `spec.agent` says later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Public id of the share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share_id: Option<String>,
    /// Sequence number of the newest manifest published or fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Bytes verified (subscribe) or staged (publish) so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_done: Option<u64>,
    /// Bytes in the current version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    /// Chunks verified or staged so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks_done: Option<u64>,
    /// Chunks in the current version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunks_total: Option<u64>,
    /// Number of peers currently exchanging chunks of this share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<u32>,
    /// Files complete (subscribe) or in the share (publish).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_done: Option<u64>,
    /// Files in the current version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files_total: Option<u64>,
    /// Subscribe: ciphertext bytes received from peers for the current
    /// version (chunks already held locally are reused, not received).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_received: Option<u64>,
    /// Agent id of the publisher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publisher: Option<String>,
    /// Publish: one ticket per explicit recipient (`recipients.agentIds`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tickets: Vec<RecipientTicket>,
    /// Publish with `trustedWithinDepth`: a ticket without a key that any
    /// agent the publisher trusts within that depth can use (the key is
    /// released only after its trust chain is checked). Subscribing by
    /// `shareId` + `publisher` needs no ticket at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyless_ticket: Option<String>,
    /// Pending, Progressing, Ready or Degraded: a summary of the conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SharePhase>,
    /// Ready, Progressing and Degraded, each with the generation it describes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `.metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl Share {
    /// The Agent that holds (or will hold) this share's declaration:
    /// `status.agent` once recorded, else `spec.agent`. Delete, wake-ups and
    /// watches follow this name, never a later edit of `spec.agent`.
    pub fn holder(&self) -> &str {
        self.status
            .as_ref()
            .and_then(|s| s.agent.as_deref())
            .unwrap_or(&self.spec.agent)
    }
}

//! `Share`: publish a folder of an Agent's storage, or subscribe to one.
//! Only the types exist so far; the controller comes with the sharing issue.
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
    doc = "A Caravan share: a folder of an Agent's storage published to chosen recipients, or another agent's share fetched into this Agent's storage.",
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
    #[schemars(length(min = 1, max = 253))]
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

/// Which share to fetch and where to put it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubscribeSpec {
    /// The ticket the publisher gave (its share key is wrapped for this agent,
    /// so it is safe to keep in a manifest).
    #[schemars(length(min = 1, max = 65536))]
    pub ticket: String,
    /// Folder in the Agent's storage to write the files into.
    #[schemars(length(min = 1, max = 1024))]
    pub destination: String,
}

/// Observed progress of a share, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShareStatus {
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
    /// Ready, Progressing and Degraded, each with the generation it describes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `.metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

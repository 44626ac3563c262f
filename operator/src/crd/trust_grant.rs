//! `TrustGrant`: an Agent vouches for another agent. The controller is
//! `crate::grants`: the issuer's agent signs and publishes the grant, and a
//! finalizer publishes the revocation on delete.
// kube's `printcolumn(...)` repeats keys like `type_` per column, which
// clippy mistakes for duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Desired grant: issuer vouches for subject, allowing `depth` further hops.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "caravan.dev",
    version = "v1alpha1",
    kind = "TrustGrant",
    plural = "trustgrants",
    singular = "trustgrant",
    shortname = "cvt",
    category = "caravan",
    namespaced,
    status = "TrustGrantStatus",
    derive = "PartialEq",
    doc = "A Caravan trust grant: the issuer Agent signs that it trusts the subject agent, which may vouch further within `depth` hops. Deleting it publishes a revocation that prunes everything trusted only through it.",
    printcolumn(name = "Issuer", type_ = "string", json_path = ".spec.issuer"),
    printcolumn(name = "Subject", type_ = "string", json_path = ".spec.subject"),
    printcolumn(name = "Depth", type_ = "integer", json_path = ".spec.depth"),
    printcolumn(name = "Published", type_ = "boolean", json_path = ".status.published"),
    printcolumn(
        name = "Expires",
        type_ = "date",
        json_path = ".spec.expires",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "self.issuer == oldSelf.issuer && self.subject == oldSelf.subject",
    "message": "issuer and subject are immutable: a grant is signed; create a new TrustGrant instead"
}]))]
pub struct TrustGrantSpec {
    /// Name of the issuing Agent in this namespace; its key signs the grant.
    /// Immutable (like `subject`).
    #[schemars(length(min = 1, max = 253), regex(pattern = crate::names::OBJECT_NAME_PATTERN))]
    pub issuer: String,
    /// Agent id (`cv1-…`) of the agent being trusted.
    #[schemars(regex(pattern = r"^cv1(-[a-z2-7]{8}){7}$"))]
    pub subject: String,
    /// How many further hops the subject may vouch: 0 trusts the subject only.
    #[serde(default)]
    #[schemars(range(min = 0, max = 8))]
    pub depth: u8,
    /// What the grant covers. `all` (the default) lets the subject fetch
    /// every share published for agents trusted within some depth. Any
    /// other value is signed as given and lets the subject fetch nothing:
    /// shares carry no scope (a scope is for other uses of the trust web).
    #[serde(default = "default_scope")]
    #[schemars(length(min = 1, max = 128))]
    pub scope: String,
    /// When the grant stops being valid (RFC 3339). When omitted the grant
    /// stays in effect while this TrustGrant exists: the issuer signs it
    /// for 30 days and again every 15, so a grant whose issuer is gone
    /// without revoking it (deleted with its namespace) lapses within 30
    /// days.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<Time>,
}

fn default_scope() -> String {
    "all".to_string()
}

/// Observed state of a grant, written only by the operator.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrustGrantStatus {
    /// The issuer Agent that holds (signed) the grant: recorded before the
    /// operator first declares it, so the revocation on delete is always
    /// signed by that Agent, whatever `spec.issuer` says later.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Id of the signed grant record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// Whether the signed grant has been published to the issuer's repositories.
    #[serde(default)]
    pub published: bool,
    /// Agent id of the issuer (the key that signed the grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer_id: Option<String>,
    /// When the grant stops being valid (unix seconds), as signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
    /// Ready, Progressing and Degraded, each with the generation it describes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "super::conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The `.metadata.generation` the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

impl TrustGrant {
    /// The issuer Agent that holds (or will hold) this grant:
    /// `status.issuer` once recorded, else `spec.issuer`. The revocation on
    /// delete and wake-ups follow this name, never a later edit of
    /// `spec.issuer`.
    pub fn holder(&self) -> &str {
        self.status
            .as_ref()
            .and_then(|s| s.issuer.as_deref())
            .unwrap_or(&self.spec.issuer)
    }
}

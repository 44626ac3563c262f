//! The three custom resources of API group `caravan.dev`, version `v1alpha1`.
//!
//! The Rust types are the single source of truth: `crdgen` renders them into
//! `crds/*.yaml`, and a test fails when the committed YAML drifts. Every field
//! carries a doc comment because it becomes the OpenAPI `description` that
//! `kubectl explain` shows to the person writing the manifest.

pub mod agent;
pub mod share;
pub mod trust_grant;

pub use agent::{Agent, AgentPhase, AgentSpec, AgentStatus};
pub use share::{Share, ShareSpec, ShareStatus};
pub use trust_grant::{TrustGrant, TrustGrantSpec, TrustGrantStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, ValidationRule,
};
use kube::CustomResourceExt;

/// The API group of every Caravan resource.
pub const GROUP: &str = "caravan.dev";
/// The one served and stored version.
pub const VERSION: &str = "v1alpha1";

/// Regular expression of an agent id (`cv1-` then seven groups of eight
/// lowercase base32 characters); the checksum itself is checked in code.
pub const AGENT_ID_PATTERN: &str = r"^cv1(-[a-z2-7]{8}){7}$";

/// Every CRD this operator serves, in the order `crdgen` writes them.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![agent_crd(), Share::crd(), TrustGrant::crd()]
}

/// The Agent CRD plus a root-level rule on the name: children are called
/// `caravan-<name>` and a Service name is a DNS label of at most 63 characters.
pub fn agent_crd() -> CustomResourceDefinition {
    let mut crd = Agent::crd();
    for v in &mut crd.spec.versions {
        if let Some(schema) = v
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            schema
                .x_kubernetes_validations
                .get_or_insert_with(Vec::new)
                .push(ValidationRule {
                    rule: format!(
                        "self.metadata.name.size() <= {} && !self.metadata.name.contains('.')",
                        crate::names::MAX_AGENT_NAME
                    ),
                    message: Some(format!(
                        "an Agent name must be at most {} characters without dots",
                        crate::names::MAX_AGENT_NAME
                    )),
                    ..Default::default()
                });
        }
    }
    crd
}

/// Adds `x-kubernetes-list-type: map` keyed by `type` to a conditions list,
/// so server-side apply merges conditions by type like built-in resources do.
pub(crate) fn conditions_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema =
        generator.subschema_for::<Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert(
        "x-kubernetes-list-map-keys".into(),
        serde_json::json!(["type"]),
    );
    schema.insert(
        "description".into(),
        "Latest observations of the resource's state, one per condition type.".into(),
    );
    schema
}

//! The three custom resources of API group `caravan.dev`, version `v1alpha1`.
//!
//! The Rust types are the single source of truth: `crdgen` renders them into
//! `crds/*.yaml`, and a test fails when the committed YAML drifts. Every field
//! carries a doc comment because it becomes the OpenAPI `description` that
//! `kubectl explain` shows to the person writing the manifest.

pub mod agent;
pub mod share;
pub mod trust_grant;

pub use agent::{Agent, AgentPhase, AgentSpec, AgentStatus, ScaleToZeroSpec};
pub use share::{Share, SharePhase, ShareSpec, ShareStatus};
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_have_status_short_names_and_columns() {
        for crd in all() {
            let v = &crd.spec.versions[0];
            assert_eq!(crd.spec.group, GROUP);
            assert_eq!(v.name, VERSION);
            assert_eq!(crd.spec.scope, "Namespaced");
            assert!(v.subresources.as_ref().unwrap().status.is_some());
            assert!(!crd.spec.names.short_names.clone().unwrap().is_empty());
            assert!(v.additional_printer_columns.as_ref().unwrap().len() >= 3);
            assert_eq!(crd.spec.names.categories, Some(vec!["caravan".to_string()]));
        }
    }

    #[test]
    fn every_spec_field_is_documented() {
        fn walk(path: &str, v: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
                for (k, child) in props {
                    let p = format!("{path}.{k}");
                    if child.get("description").is_none() {
                        missing.push(p.clone());
                    }
                    walk(&p, child, missing);
                }
            }
            if let Some(items) = v.get("items") {
                walk(path, items, missing);
            }
        }
        let mut missing = Vec::new();
        for crd in all() {
            let schema = serde_json::to_value(
                crd.spec.versions[0]
                    .schema
                    .as_ref()
                    .unwrap()
                    .open_api_v3_schema
                    .as_ref()
                    .unwrap(),
            )
            .unwrap();
            for top in ["spec", "status"] {
                walk(
                    &format!("{}.{top}", crd.spec.names.kind),
                    &schema["properties"][top],
                    &mut missing,
                );
            }
        }
        assert!(missing.is_empty(), "undocumented fields: {missing:?}");
    }

    #[test]
    fn agent_schema_carries_defaults_and_cel_rules() {
        let json = serde_json::to_string(&agent_crd()).unwrap();
        assert!(json.contains(r#""default":"info""#));
        assert!(json.contains("x-kubernetes-validations"));
        assert!(json.contains("self.metadata.name.size() <= 55"));
        let share = serde_json::to_string(&Share::crd()).unwrap();
        assert!(share.contains("has(self.publish) != has(self.subscribe)"));
    }

    #[test]
    fn agent_id_pattern_matches_real_ids() {
        let id = caravan_agent::identity::SecretKey::from_seed([7; 32])
            .agent_id()
            .to_string();
        let body = id.strip_prefix("cv1").unwrap();
        let groups: Vec<&str> = body.split('-').skip(1).collect();
        assert_eq!(groups.len(), 7, "{id}");
        assert!(groups.iter().all(|g| {
            g.len() == 8
                && g.chars()
                    .all(|c| c.is_ascii_lowercase() || ('2'..='7').contains(&c))
        }));
        assert_eq!(AGENT_ID_PATTERN, r"^cv1(-[a-z2-7]{8}){7}$");
    }
}

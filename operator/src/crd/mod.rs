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
    let mut crds = vec![agent_crd(), Share::crd(), TrustGrant::crd()];
    for crd in &mut crds {
        for v in &mut crd.spec.versions {
            if let Some(schema) = v
                .schema
                .as_mut()
                .and_then(|s| s.open_api_v3_schema.as_mut())
            {
                bound_to_rust_types(schema);
            }
        }
    }
    crds
}

/// Gives every number and time in a schema the range its Rust type holds,
/// so the API server refuses a value the operator could not read.
///
/// Why: the API server takes any integer for `format: int32` and any year
/// for `format: date-time`, and the operator reads each kind's objects as
/// one list: a single tenant's Agent with `maxSkew: 99999999999` (or a
/// TrustGrant expiring in the year 9999, past what the time type holds)
/// made every list of that kind fail, and after a restart the operator
/// managed no tenant's Agents (or grants, revocations included) until the
/// object was deleted. Years are bounded to 2999.
pub fn bound_to_rust_types(
    s: &mut k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps,
) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    };
    let range = match s.format.as_deref() {
        Some("int8") => Some((i8::MIN as f64, i8::MAX as f64)),
        Some("int16") => Some((i16::MIN as f64, i16::MAX as f64)),
        Some("int32") => Some((i32::MIN as f64, i32::MAX as f64)),
        Some("uint8") => Some((0.0, u8::MAX as f64)),
        Some("uint16") => Some((0.0, u16::MAX as f64)),
        Some("uint32") => Some((0.0, u32::MAX as f64)),
        _ => None,
    };
    if let (Some((lo, hi)), Some("integer")) = (range, s.type_.as_deref()) {
        s.minimum = Some(s.minimum.map_or(lo, |m| m.max(lo)));
        s.maximum = Some(s.maximum.map_or(hi, |m| m.min(hi)));
    }
    if s.format.as_deref() == Some("date-time") && s.pattern.is_none() {
        s.pattern = Some(DATE_TIME_PATTERN.into());
    }
    let children = s
        .properties
        .iter_mut()
        .flat_map(|p| p.values_mut())
        .chain(s.all_of.iter_mut().flatten())
        .chain(s.any_of.iter_mut().flatten())
        .chain(s.one_of.iter_mut().flatten())
        .chain(s.not.as_deref_mut());
    for c in children {
        bound_to_rust_types(c);
    }
    match s.items.as_mut() {
        Some(JSONSchemaPropsOrArray::Schema(i)) => bound_to_rust_types(i),
        Some(JSONSchemaPropsOrArray::Schemas(v)) => v.iter_mut().for_each(bound_to_rust_types),
        None => {}
    }
    if let Some(JSONSchemaPropsOrBool::Schema(a)) = s.additional_properties.as_mut() {
        bound_to_rust_types(a);
    }
}

/// An RFC 3339 time from the years 0000 to 2999 (the time type holds up
/// to 9999-12-30; a grant or a sleep is never meant past 2999).
pub const DATE_TIME_PATTERN: &str = r"^[0-2][0-9]{3}-";

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

    /// Every bounded number or time in `v` (a rendered schema), as (path,
    /// format, minimum, maximum or pattern).
    fn bounded(
        v: &serde_json::Value,
        path: &str,
        out: &mut Vec<(String, String, serde_json::Value)>,
    ) {
        if let Some(f) = v.get("format").and_then(|f| f.as_str()) {
            let bound = match f {
                "date-time" => v.get("pattern").cloned().unwrap_or_default(),
                _ => serde_json::json!([v.get("minimum"), v.get("maximum")]),
            };
            out.push((path.to_string(), f.to_string(), bound));
        }
        if let Some(o) = v.as_object() {
            for (k, c) in o {
                bounded(c, &format!("{path}.{k}"), out);
            }
        }
        if let Some(a) = v.as_array() {
            for c in a {
                bounded(c, path, out);
            }
        }
    }

    /// Guarantee: the API server refuses any number or time in a Caravan
    /// resource that the operator could not read into its Rust types (one
    /// such object made every list of its kind fail, so the operator
    /// managed no tenant's resources of that kind after a restart).
    #[test]
    fn every_number_and_time_is_bounded_to_what_the_operator_reads() {
        let mut found = Vec::new();
        for crd in all() {
            bounded(
                &serde_json::to_value(&crd).unwrap(),
                crd.spec.names.kind.as_str(),
                &mut found,
            );
        }
        let int32 = serde_json::json!([i32::MIN as f64, i32::MAX as f64]);
        for (path, format, bound) in &found {
            match format.as_str() {
                "int32" => assert_eq!(bound, &int32, "{path}"),
                "date-time" => assert_eq!(bound, DATE_TIME_PATTERN, "{path}"),
                "uint8" | "uint16" | "uint32" => {
                    assert!(
                        bound[0].as_f64() == Some(0.0) && bound[1].is_number(),
                        "{path}"
                    )
                }
                _ => {}
            }
        }
        assert!(
            found.iter().any(|(p, _, _)| p.contains("maxSkew")),
            "{found:?}"
        );
        // The largest time the pattern lets through is one the operator reads.
        let grant: TrustGrantSpec = serde_json::from_value(serde_json::json!({
            "issuer": "alice",
            "subject": "cv1-aaaaaaaa-aaaaaaaa-aaaaaaaa-aaaaaaaa-aaaaaaaa-aaaaaaaa-aaaaaaaa",
            "expires": "2999-12-31T23:59:59Z"
        }))
        .unwrap();
        assert!(grant.expires.is_some());
        assert!(!"9999-12-31T23:59:59Z".starts_with(|c: char| ('0'..='2').contains(&c)));
    }

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

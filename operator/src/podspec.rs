//! Checks of the Agent fields the operator copies into its children's specs
//! (resources, scheduling, the data volume's size, Service annotations),
//! made before anything is applied. The API server would refuse the same
//! mistakes, but only when one child is applied, after the others were: the
//! Agent would be half-applied (a new ConfigMap beside a refused
//! Deployment) with nothing but a line in the operator's log. Checked here,
//! they end in `InvalidSpec` and a Warning Event, and nothing is applied.
//! A refusal the checks do not foresee is still reported the same way by
//! the controller (see `controller::refused_child`).

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::crd::AgentSpec;

/// Parses a Kubernetes quantity (`100m`, `1.5Gi`, `2e3`, `-1`) into its
/// value; `None` when it is not one.
pub fn quantity_value(q: &str) -> Option<f64> {
    let q = q.trim();
    let num_end = q
        .char_indices()
        .find(|(i, c)| !(c.is_ascii_digit() || *c == '.' || (*i == 0 && (*c == '-' || *c == '+'))))
        .map_or(q.len(), |(i, _)| i);
    let (num, suffix) = q.split_at(num_end);
    if num.is_empty() || num == "-" || num == "+" || num.matches('.').count() > 1 {
        return None;
    }
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse::<i32>().ok()?),
        _ => return None,
    };
    Some(n * mult)
}

fn non_negative(field: &str, q: &Quantity) -> Result<f64, String> {
    match quantity_value(&q.0) {
        Some(v) if v >= 0.0 => Ok(v),
        Some(_) => Err(format!("{field} {:?} must not be negative", q.0)),
        None => Err(format!(
            "{field} {:?} is not a quantity (such as 500m, 256Mi, 1Gi)",
            q.0
        )),
    }
}

/// Resource requests and limits: quantities, not negative, requests ≤ limits.
pub fn check_resources(field: &str, r: &ResourceRequirements) -> Result<(), String> {
    let limits = r.limits.clone().unwrap_or_default();
    for (k, q) in &limits {
        non_negative(&format!("{field}.limits.{k}"), q)?;
    }
    for (k, q) in r.requests.iter().flatten() {
        let req = non_negative(&format!("{field}.requests.{k}"), q)?;
        if let Some(l) = limits.get(k) {
            let lim = non_negative(&format!("{field}.limits.{k}"), l)?;
            if req > lim {
                return Err(format!(
                    "{field}.requests.{k} {:?} is above {field}.limits.{k} {:?}",
                    q.0, l.0
                ));
            }
        }
    }
    Ok(())
}

/// A label or annotation key: `[prefix/]name`, the prefix a DNS subdomain,
/// the name ≤ 63 characters of letters, digits, `-`, `_`, `.`, starting
/// and ending with a letter or digit.
pub fn qualified_name_ok(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix
        && crate::names::check_object_name("", p).is_err()
    {
        return false;
    }
    label_value_ok(name) && !name.is_empty()
}

/// A label value: empty, or ≤ 63 characters of letters, digits, `-`, `_`,
/// `.`, starting and ending with a letter or digit.
pub fn label_value_ok(v: &str) -> bool {
    v.is_empty()
        || v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            && v.as_bytes()[0].is_ascii_alphanumeric()
            && v.as_bytes()[v.len() - 1].is_ascii_alphanumeric()
}

fn check_toleration(i: usize, t: &Toleration) -> Result<(), String> {
    let f = format!("spec.scheduling.tolerations[{i}]");
    let op = t.operator.as_deref().unwrap_or("");
    let key = t.key.as_deref().unwrap_or("");
    let value = t.value.as_deref().unwrap_or("");
    let effect = t.effect.as_deref().unwrap_or("");
    if !matches!(op, "" | "Exists" | "Equal") {
        return Err(format!("{f}.operator {op:?} must be Exists or Equal"));
    }
    if !key.is_empty() && !qualified_name_ok(key) {
        return Err(format!("{f}.key {key:?} is not a valid label key"));
    }
    if key.is_empty() && op != "Exists" {
        return Err(format!("{f}: an empty key needs operator Exists"));
    }
    if op == "Exists" && !value.is_empty() {
        return Err(format!("{f}: operator Exists takes no value"));
    }
    if !label_value_ok(value) {
        return Err(format!("{f}.value {value:?} is not a valid label value"));
    }
    if !matches!(effect, "" | "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(format!(
            "{f}.effect {effect:?} must be NoSchedule, PreferNoSchedule or NoExecute"
        ));
    }
    if t.toleration_seconds.is_some() && effect != "NoExecute" {
        return Err(format!("{f}.tolerationSeconds needs effect NoExecute"));
    }
    Ok(())
}

/// The provider's allow-list: a priority class or toleration the tenant set
/// that the provider did not list is refused (`spec.scheduling` only; the
/// chart's defaults are the provider's own).
pub fn check_tenant_scheduling(
    spec: &AgentSpec,
    allowed: &crate::config::TenantScheduling,
) -> Result<(), String> {
    let Some(s) = &spec.scheduling else {
        return Ok(());
    };
    let list = |v: &[String]| {
        if v.is_empty() {
            "none".to_string()
        } else {
            v.join(", ")
        }
    };
    if let Some(p) = s.priority_class_name.as_deref().filter(|p| !p.is_empty())
        && !allowed.priority_class_names.iter().any(|a| a == p)
    {
        return Err(format!(
            "spec.scheduling.priorityClassName {p:?} is not one the provider allows tenants \
             to use (allowed: {}; chart value agent.tenantScheduling.priorityClassNames); \
             remove it to get the provider's default",
            list(&allowed.priority_class_names)
        ));
    }
    for (i, t) in s.tolerations.iter().flatten().enumerate() {
        if !allowed.tolerations.iter().any(|a| same_toleration(a, t)) {
            let shown = serde_json::to_string(t).unwrap_or_default();
            return Err(format!(
                "spec.scheduling.tolerations[{i}] {shown} is not one the provider allows \
                 tenants to use (chart value agent.tenantScheduling.tolerations lists {}); \
                 remove it to get the provider's default",
                allowed.tolerations.len()
            ));
        }
    }
    Ok(())
}

/// Refuses a Service type or annotation the provider does not let tenants
/// set (chart values `agent.tenantExposure.*`).
pub fn check_tenant_exposure(
    spec: &AgentSpec,
    allowed: &crate::config::TenantExposure,
) -> Result<(), String> {
    let t = spec.exposure.service_type;
    if !allowed.service_types.contains(&t) {
        let list: Vec<&str> = allowed.service_types.iter().map(|t| t.as_str()).collect();
        return Err(format!(
            "spec.exposure.serviceType {} is not one the provider allows tenants to use \
             (allowed: {}; chart value agent.tenantExposure.serviceTypes)",
            t.as_str(),
            list.join(", ")
        ));
    }
    for k in spec.exposure.service_annotations.keys() {
        if !allowed
            .annotation_prefixes
            .iter()
            .any(|p| !p.is_empty() && k.starts_with(p.as_str()))
        {
            let list = match allowed.annotation_prefixes.is_empty() {
                true => "none".to_string(),
                false => allowed.annotation_prefixes.join(", "),
            };
            return Err(format!(
                "spec.exposure.serviceAnnotations key {k:?} is not one the provider lets \
                 tenants set (allowed prefixes: {list}; chart value \
                 agent.tenantExposure.serviceAnnotationPrefixes)"
            ));
        }
    }
    Ok(())
}

fn same_toleration(a: &Toleration, b: &Toleration) -> bool {
    let s = |o: &Option<String>| o.clone().unwrap_or_default();
    let op = |o: &Option<String>| match o.as_deref() {
        None | Some("") => "Equal".to_string(),
        Some(x) => x.to_string(),
    };
    s(&a.key) == s(&b.key)
        && op(&a.operator) == op(&b.operator)
        && s(&a.value) == s(&b.value)
        && s(&a.effect) == s(&b.effect)
        && a.toleration_seconds == b.toleration_seconds
}

/// Every check of this module on an Agent's spec.
pub fn check(spec: &AgentSpec) -> Result<(), String> {
    if let Some(r) = &spec.resources {
        check_resources("spec.resources", r)?;
    }
    if let Some(s) = &spec.scheduling {
        for (k, v) in s.node_selector.iter().flatten() {
            if !qualified_name_ok(k) {
                return Err(format!(
                    "spec.scheduling.nodeSelector key {k:?} is not a valid label key"
                ));
            }
            if !label_value_ok(v) {
                return Err(format!(
                    "spec.scheduling.nodeSelector.{k} value {v:?} is not a valid label value"
                ));
            }
        }
        for (i, t) in s.tolerations.iter().flatten().enumerate() {
            check_toleration(i, t)?;
        }
        if let Some(p) = &s.priority_class_name {
            crate::names::check_object_name("spec.scheduling.priorityClassName", p)?;
        }
    }
    if let Some(d) = &spec.storage.data_volume {
        if let Some(q) = &d.size_limit {
            non_negative("spec.storage.dataVolume.sizeLimit", q)?;
        }
        if let Some(c) = &d.claim_name {
            crate::names::check_object_name("spec.storage.dataVolume.claimName", c)?;
        }
    }
    let annotations = &spec.exposure.service_annotations;
    for k in annotations.keys() {
        if !qualified_name_ok(k) {
            return Err(format!(
                "spec.exposure.serviceAnnotations key {k:?} is not a valid annotation key"
            ));
        }
    }
    let total: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > 256 * 1024 {
        return Err("spec.exposure.serviceAnnotations are larger than 256 KiB".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// By default a tenant gets a ClusterIP Service and no annotations; a
    /// NodePort, a LoadBalancer or an annotation only where the provider
    /// lists it.
    #[test]
    fn tenants_get_only_the_service_types_and_annotations_the_provider_lists() {
        use crate::config::TenantExposure;
        use crate::crd::agent::ServiceType;
        let mut spec = crate::testutil::fs_agent("a", "t").spec;
        let default = TenantExposure::default();
        check_tenant_exposure(&spec, &default).unwrap();
        spec.exposure.service_type = ServiceType::LoadBalancer;
        let e = check_tenant_exposure(&spec, &default).unwrap_err();
        assert!(
            e.contains("LoadBalancer") && e.contains("allowed: ClusterIP"),
            "{e}"
        );
        let lb = TenantExposure {
            service_types: vec![ServiceType::ClusterIP, ServiceType::LoadBalancer],
            annotation_prefixes: vec!["service.beta.kubernetes.io/aws-load-balancer-".into()],
        };
        check_tenant_exposure(&spec, &lb).unwrap();
        spec.exposure.service_annotations = BTreeMap::from([(
            "service.beta.kubernetes.io/aws-load-balancer-internal".into(),
            "true".into(),
        )]);
        check_tenant_exposure(&spec, &lb).unwrap();
        assert!(check_tenant_exposure(&spec, &default).is_err());
        spec.exposure.service_annotations = BTreeMap::from([(
            "metallb.universe.tf/loadBalancerIPs".into(),
            "10.0.0.7".into(),
        )]);
        let e = check_tenant_exposure(&spec, &lb).unwrap_err();
        assert!(e.contains("metallb.universe.tf/loadBalancerIPs"), "{e}");
    }

    #[test]
    fn tenants_get_only_the_priority_classes_and_tolerations_the_provider_lists() {
        use crate::config::TenantScheduling;
        use crate::crd::agent::SchedulingSpec;
        let mut spec = crate::testutil::fs_agent("a", "t").spec;
        let none = TenantScheduling::default();
        check_tenant_scheduling(&spec, &none).unwrap();
        spec.scheduling = Some(SchedulingSpec {
            priority_class_name: Some("system-node-critical".into()),
            ..Default::default()
        });
        let e = check_tenant_scheduling(&spec, &none).unwrap_err();
        assert!(
            e.contains("system-node-critical") && e.contains("allowed: none"),
            "{e}"
        );
        let listed = TenantScheduling {
            priority_class_names: vec!["tenant-high".into()],
            tolerations: vec![Toleration {
                key: Some("caravan.dev/agents".into()),
                operator: Some("Exists".into()),
                effect: Some("NoSchedule".into()),
                ..Default::default()
            }],
        };
        assert!(check_tenant_scheduling(&spec, &listed).is_err());
        spec.scheduling.as_mut().unwrap().priority_class_name = Some("tenant-high".into());
        check_tenant_scheduling(&spec, &listed).unwrap();
        // Tolerate everything: refused unless listed exactly.
        spec.scheduling.as_mut().unwrap().tolerations = Some(vec![Toleration {
            operator: Some("Exists".into()),
            ..Default::default()
        }]);
        let e = check_tenant_scheduling(&spec, &listed).unwrap_err();
        assert!(e.contains("tolerations[0]"), "{e}");
        spec.scheduling.as_mut().unwrap().tolerations = Some(listed.tolerations.clone());
        check_tenant_scheduling(&spec, &listed).unwrap();
    }

    #[test]
    fn quantities_parse_like_kubernetes() {
        assert_eq!(quantity_value("100m"), Some(0.1));
        assert_eq!(quantity_value("1Gi"), Some(1024f64.powi(3)));
        assert_eq!(quantity_value("2e3"), Some(2000.0));
        assert_eq!(quantity_value("-1"), Some(-1.0));
        assert_eq!(quantity_value("1.5"), Some(1.5));
        for bad in ["", "abc", "1x", "1..2", "-", "Gi"] {
            assert_eq!(quantity_value(bad), None, "{bad}");
        }
    }

    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }

    #[test]
    fn each_mistake_the_api_server_refuses_is_caught_up_front() {
        use crate::crd::agent::{DataVolumeSpec, SchedulingSpec};
        let ok = crate::testutil::fs_agent("a", "t").spec;
        check(&ok).unwrap();
        let with = |f: &dyn Fn(&mut AgentSpec)| {
            let mut s = ok.clone();
            f(&mut s);
            check(&s)
        };
        let res = |req: &str, lim: &str| ResourceRequirements {
            requests: Some(BTreeMap::from([("cpu".to_string(), q(req))])),
            limits: Some(BTreeMap::from([("cpu".to_string(), q(lim))])),
            ..Default::default()
        };
        with(&|s| s.resources = Some(res("100m", "1"))).unwrap();
        let e = with(&|s| s.resources = Some(res("-1", "1"))).unwrap_err();
        assert!(e.contains("negative"), "{e}");
        let e = with(&|s| s.resources = Some(res("2", "1"))).unwrap_err();
        assert!(e.contains("above"), "{e}");
        let tol = |op: &str| Toleration {
            key: Some("k".into()),
            operator: Some(op.into()),
            ..Default::default()
        };
        let sched = |t: Toleration| SchedulingSpec {
            tolerations: Some(vec![t]),
            ..Default::default()
        };
        with(&|s| s.scheduling = Some(sched(tol("Exists")))).unwrap();
        let e = with(&|s| s.scheduling = Some(sched(tol("Sometimes")))).unwrap_err();
        assert!(e.contains("operator"), "{e}");
        let e = with(&|s| {
            s.scheduling = Some(SchedulingSpec {
                node_selector: Some(BTreeMap::from([("bad key!".into(), "v".into())])),
                ..Default::default()
            })
        })
        .unwrap_err();
        assert!(e.contains("nodeSelector"), "{e}");
        let e = with(&|s| {
            s.storage.data_volume = Some(DataVolumeSpec {
                claim_name: None,
                size_limit: Some(q("-1Gi")),
            })
        })
        .unwrap_err();
        assert!(e.contains("sizeLimit"), "{e}");
        let e = with(&|s| {
            s.storage.data_volume = Some(DataVolumeSpec {
                claim_name: Some("Data_PVC".into()),
                size_limit: None,
            })
        })
        .unwrap_err();
        assert!(e.contains("claimName"), "{e}");
        let e = with(&|s| {
            s.exposure.service_annotations = BTreeMap::from([("no spaces/ok".into(), "v".into())])
        })
        .unwrap_err();
        assert!(e.contains("serviceAnnotations"), "{e}");
        with(&|s| {
            s.exposure.service_annotations = BTreeMap::from([(
                "service.beta.kubernetes.io/aws-load-balancer-type".into(),
                "nlb".into(),
            )])
        })
        .unwrap();
    }
}

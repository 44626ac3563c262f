//! Names and labels of an Agent's children. One place, so the builders, the
//! reconciler and the tests agree, and so the name-length rule is enforced
//! where the names are made.

use std::collections::BTreeMap;

/// Prefix of every child object's name; keeps operator-made objects from
/// colliding with a tenant's own Deployments and Services.
pub const PREFIX: &str = "caravan-";
/// Longest Agent name whose children are still valid DNS-1035 labels
/// (63 characters, Service names) after the prefix.
pub const MAX_AGENT_NAME: usize = 63 - PREFIX.len();

/// Label every operator-made object carries (`managed-by`).
pub const MANAGED_BY: &str = "caravan-operator";
/// Label key naming the Agent a child belongs to.
pub const AGENT_LABEL: &str = "caravan.dev/agent";

/// Children names of one Agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildNames {
    /// Deployment, Service and NetworkPolicy.
    pub workload: String,
    /// ConfigMap with `agent.toml`.
    pub config: String,
    /// Secret with the agent's key and admin token.
    pub identity: String,
}

impl ChildNames {
    /// Names for the Agent called `agent`.
    pub fn for_agent(agent: &str) -> Self {
        Self {
            workload: format!("{PREFIX}{agent}"),
            config: format!("{PREFIX}{agent}-config"),
            identity: format!("{PREFIX}{agent}-identity"),
        }
    }

    /// The in-cluster peer address other agents dial.
    pub fn endpoint(&self, namespace: &str) -> String {
        format!(
            "{}.{namespace}.svc:{}",
            self.workload,
            caravan_agent::config::DEFAULT_PEER_PORT
        )
    }
}

/// Labels that select an Agent's pod (stable: a Deployment selector is immutable).
pub fn selector_labels(agent: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_string(),
            "caravan-agent".to_string(),
        ),
        (AGENT_LABEL.to_string(), agent.to_string()),
    ])
}

/// Labels of every child: the selector labels plus the recommended ones.
pub fn labels(agent: &str) -> BTreeMap<String, String> {
    let mut l = selector_labels(agent);
    l.insert("app.kubernetes.io/instance".into(), agent.to_string());
    l.insert("app.kubernetes.io/part-of".into(), "caravan".into());
    l.insert("app.kubernetes.io/managed-by".into(), MANAGED_BY.into());
    l
}

/// Label selector (string form) that matches every child the operator made.
pub fn managed_selector() -> String {
    format!("app.kubernetes.io/managed-by={MANAGED_BY}")
}

/// Schema pattern of a Kubernetes object name (DNS-1123 subdomain) for CRD
/// fields that name another object: the API server rejects anything else at
/// apply, and [`check_object_name`] repeats the check for objects stored
/// before the pattern existed.
pub const OBJECT_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Longest object name (DNS-1123 subdomain).
pub const MAX_OBJECT_NAME: usize = 253;

/// Checks that `value` of `field` is a valid Kubernetes object name (a
/// DNS-1123 subdomain: at most 253 characters of `a-z`, `0-9`, `-` and `.`,
/// each dot-separated part starting and ending with a letter or digit).
/// Such names go into API request paths (`…/agents/{name}`), so this runs
/// before any API call: `x/y`, `bob?x=1` or `..` would otherwise address
/// another resource, or another object, than the one named.
pub fn check_object_name(field: &str, value: &str) -> Result<(), String> {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if value.is_empty() || value.len() > MAX_OBJECT_NAME || !value.split('.').all(label_ok) {
        let shown: String = value.chars().take(80).collect();
        return Err(format!(
            "{field} {shown:?} is not a Kubernetes object name: use at most \
             {MAX_OBJECT_NAME} lowercase letters, digits, '-' and '.', starting and \
             ending with a letter or digit"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_are_dns_subdomains() {
        for ok in ["bob", "bob-2", "a.b", "0", &"a".repeat(253)] {
            check_object_name("spec.agent", ok).unwrap();
        }
        for bad in [
            "",
            "x/y",
            "bob?x=1",
            "..",
            "a..b",
            ".a",
            "a.",
            "-a",
            "a-",
            "Bob",
            "a b",
            "a%2Fb",
            "a\u{e9}",
            &"a".repeat(254),
        ] {
            let e = check_object_name("spec.agent", bad).unwrap_err();
            assert!(e.starts_with("spec.agent"), "{e}");
        }
    }
}

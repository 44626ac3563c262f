//! Checks of an Agent's input that the API server may not enforce (CEL rules
//! are ignored before Kubernetes 1.25, and some checks need the agent crate).
//! Every failure becomes a condition reason and an Event the tenant can act
//! on, never a crash loop: the reconciler reports it and waits for a fix.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use caravan_agent::config::{AgentConfig, StorageConfig};

use crate::children::OPERATOR_ADDRESSES;
use crate::config::{OperatorConfig, paths};
use crate::crd::AgentSpec;
use crate::names::{ChildNames, MAX_AGENT_NAME};

/// A problem with what the tenant wrote; fixed by editing the input.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// `spec.storage.secretRef` names a Secret that does not exist (yet).
    #[error(
        "credentials Secret {namespace}/{name} not found; create it or fix spec.storage.secretRef.name"
    )]
    SecretNotFound { namespace: String, name: String },
    /// `spec.storage.secretRef.namespace` is another namespace.
    #[error(
        "spec.storage.secretRef points into namespace {secret_namespace:?}, but an Agent may only use Secrets of its own namespace {namespace:?}"
    )]
    SecretOutsideNamespace {
        namespace: String,
        secret_namespace: String,
    },
    /// The agent build cannot open this storage scheme.
    #[error("spec.storage.scheme: {0}")]
    UnknownStorageScheme(String),
    /// An option key or value is malformed, secret, or given twice.
    #[error("{0}")]
    InvalidOptions(String),
    /// Anything else in the spec or metadata that cannot work.
    #[error("{0}")]
    InvalidSpec(String),
}

impl InputError {
    /// The condition reason (and Event reason) for this problem.
    pub fn reason(&self) -> &'static str {
        match self {
            InputError::SecretNotFound { .. } => "SecretNotFound",
            InputError::SecretOutsideNamespace { .. } => "SecretOutsideNamespace",
            InputError::UnknownStorageScheme(_) => "UnknownStorageScheme",
            InputError::InvalidOptions(_) => "InvalidOptions",
            InputError::InvalidSpec(_) => "InvalidSpec",
        }
    }
}

/// Option names that look like secrets: they belong in the Secret, where they
/// are mounted as files, not in a spec any namespace reader can see.
const SECRET_WORDS: &[&str] = &[
    "secret",
    "password",
    "passwd",
    "token",
    "credential",
    "access_key",
    "account_key",
    "private_key",
    "sas",
];

/// Is `key` a plausible OpenDAL option name (lower_snake_case, short)?
fn valid_option_key(key: &str) -> bool {
    let mut chars = key.chars();
    key.len() <= 64
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

fn looks_secret(key: &str) -> bool {
    SECRET_WORDS.iter().any(|w| key.contains(w))
}

/// Storage options through which an agent would act with the node's cloud
/// identity rather than the tenant's own credentials: assumed roles, shared
/// profiles, the instance-metadata service. Refused in the spec and in the
/// credentials Secret unless the provider allows node credentials.
pub fn node_credential_options(scheme: &str) -> &'static [&'static str] {
    match scheme {
        "s3" => &[
            "role_arn",
            "external_id",
            "role_session_name",
            "assume_role_duration_seconds",
            "assume_role_session_tags",
            "profile",
            "disable_ec2_metadata",
            "disable_config_load",
        ],
        "gcs" => &[
            "service_account",
            "credential_path",
            "disable_vm_metadata",
            "disable_config_load",
        ],
        _ => &[],
    }
}

/// Options the operator pins so the credential chain never falls back to
/// the instance-metadata service, the pod's environment or files on disk
/// (OpenDAL 0.59 option names).
pub fn pinned_options(scheme: &str) -> &'static [(&'static str, &'static str)] {
    match scheme {
        "s3" => &[
            ("disable_config_load", "true"),
            ("disable_ec2_metadata", "true"),
        ],
        "gcs" => &[
            ("disable_config_load", "true"),
            ("disable_vm_metadata", "true"),
        ],
        _ => &[],
    }
}

/// Refuses options (spec or Secret keys) that reach the node's credentials.
/// Azure Blob has no switch for its metadata fallback in OpenDAL 0.59, so
/// there the Secret must hold the tenant's own `account_key` or `sas_token`
/// (static credentials come first in its chain; then it never asks the node).
pub fn check_node_credentials<'a>(
    scheme: &str,
    keys: impl IntoIterator<Item = &'a String>,
    where_: &str,
    cfg: &OperatorConfig,
) -> Result<(), InputError> {
    if cfg.allow_node_credentials {
        return Ok(());
    }
    let refused = node_credential_options(scheme);
    let mut seen = BTreeSet::new();
    for k in keys {
        if refused.contains(&k.as_str()) {
            return Err(InputError::InvalidOptions(format!(
                "{where_} sets {k:?}, which would let the agent use the node's cloud identity \
                 (instance metadata, assumed roles or profiles); give the tenant's own \
                 credentials in the Secret instead (the provider can allow node credentials \
                 with the chart value agent.allowNodeCredentials)"
            )));
        }
        seen.insert(k.as_str());
    }
    if scheme == "azblob"
        && where_.starts_with("Secret")
        && !seen.contains("account_key")
        && !seen.contains("sas_token")
    {
        return Err(InputError::InvalidOptions(format!(
            "{where_} holds neither account_key nor sas_token: without them the azblob \
             client would fall back to the node's managed identity"
        )));
    }
    Ok(())
}

/// Checks the Agent's name, spec and the options, and renders the agent
/// config from them. `secret_ref` is the mounted credentials directory (or
/// `None` when the Agent has no Secret).
pub fn agent_config(
    name: &str,
    namespace: &str,
    spec: &AgentSpec,
    cfg: &OperatorConfig,
) -> Result<AgentConfig, InputError> {
    if name.len() > MAX_AGENT_NAME || name.contains('.') {
        return Err(InputError::InvalidSpec(format!(
            "Agent name {name:?} must be at most {MAX_AGENT_NAME} characters without dots, \
             so its Service name is a valid DNS label"
        )));
    }
    let storage = &spec.storage;
    if let Some(sr) = &storage.secret_ref {
        if let Some(ns) = sr
            .namespace
            .as_deref()
            .filter(|ns| !ns.is_empty() && *ns != namespace)
        {
            return Err(InputError::SecretOutsideNamespace {
                namespace: namespace.to_string(),
                secret_namespace: ns.to_string(),
            });
        }
        // The name goes into the API path of the Secret's GET.
        crate::names::check_object_name("spec.storage.secretRef.name", &sr.name)
            .map_err(InputError::InvalidSpec)?;
    }
    // Fields copied into the children: refused here, not half-way through
    // applying them.
    crate::podspec::check(spec).map_err(InputError::InvalidSpec)?;
    crate::podspec::check_tenant_scheduling(spec, &cfg.tenant_scheduling)
        .map_err(InputError::InvalidSpec)?;
    crate::podspec::check_tenant_exposure(spec, &cfg.tenant_exposure)
        .map_err(InputError::InvalidSpec)?;
    caravan_agent::config::check_scheme(&storage.scheme)
        .map_err(|e| InputError::UnknownStorageScheme(strip_config_prefix(&e.to_string())))?;

    let mut options = BTreeMap::new();
    for (k, v) in &storage.options {
        if !valid_option_key(k) {
            return Err(InputError::InvalidOptions(format!(
                "spec.storage.options key {k:?} is not a lower_snake_case option name"
            )));
        }
        if looks_secret(k) {
            return Err(InputError::InvalidOptions(format!(
                "spec.storage.options.{k} looks like a secret; put it in the Secret named by \
                 spec.storage.secretRef (one key per option) instead"
            )));
        }
        if v.contains(['\n', '\r', '\0']) || v.len() > 4096 {
            return Err(InputError::InvalidOptions(format!(
                "spec.storage.options.{k} must be one line of at most 4096 bytes"
            )));
        }
        options.insert(k.clone(), v.clone());
    }
    check_node_credentials(
        &storage.scheme,
        storage.options.keys(),
        "spec.storage.options",
        cfg,
    )?;
    if storage.scheme == "azblob" && !cfg.allow_node_credentials && storage.secret_ref.is_none() {
        return Err(InputError::InvalidOptions(
            "scheme azblob needs spec.storage.secretRef with account_key or sas_token: \
             without them the client would fall back to the node's managed identity"
                .into(),
        ));
    }
    if !cfg.allow_node_credentials {
        for (k, v) in pinned_options(&storage.scheme) {
            options.insert(k.to_string(), v.to_string());
        }
    }
    if storage.scheme == "fs" {
        let root = options
            .entry("root".to_string())
            .or_insert_with(|| paths::DATA_DIR.to_string());
        if !(root == paths::DATA_DIR || root.starts_with("/data/")) || root.contains("..") {
            return Err(InputError::InvalidOptions(format!(
                "spec.storage.options.root = {root:?}: with scheme fs it must be /data or below \
                 (the root filesystem is read-only; /data is the data volume)"
            )));
        }
    } else if storage.data_volume.is_some() {
        return Err(InputError::InvalidSpec(
            "spec.storage.dataVolume is only used by scheme fs".into(),
        ));
    }

    for cidr in &spec.exposure.peer_cidrs {
        if !valid_cidr(cidr) {
            return Err(InputError::InvalidSpec(format!(
                "spec.exposure.peerCidrs entry {cidr:?} is not a CIDR like 203.0.113.0/24"
            )));
        }
    }
    // The operator puts up to four addresses of its own first (the
    // Service's ClusterIP and DNS name, a LoadBalancer's ingress): the
    // rest of an agent's limit is the tenant's.
    let room = caravan_agent::config::MAX_ADDRESSES - OPERATOR_ADDRESSES;
    if spec.exposure.advertise.len() > room {
        return Err(InputError::InvalidSpec(format!(
            "spec.exposure.advertise lists {} addresses: at most {room} (an agent \
             advertises {} in all, {OPERATOR_ADDRESSES} of them the Service's)",
            spec.exposure.advertise.len(),
            caravan_agent::config::MAX_ADDRESSES
        )));
    }
    for a in &spec.exposure.advertise {
        if a.len() > caravan_agent::config::MAX_ADDRESS_LEN
            || a.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(InputError::InvalidSpec(format!(
                "spec.exposure.advertise entry {a:?} is not host:port (at most {} bytes)",
                caravan_agent::config::MAX_ADDRESS_LEN
            )));
        }
    }
    if spec.log_level.is_empty()
        || !spec
            .log_level
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_=,:-".contains(c))
    {
        return Err(InputError::InvalidSpec(format!(
            "spec.logLevel {:?} is not a filter like `info` or `caravan_agent=debug`",
            spec.log_level
        )));
    }

    if let Some(s) = &spec.scale_to_zero {
        crate::sleep::idle_after(s).map_err(InputError::InvalidSpec)?;
        let lost_on_sleep = storage.scheme == "memory"
            || storage.scheme == "fs"
                && storage
                    .data_volume
                    .as_ref()
                    .and_then(|v| v.claim_name.as_ref())
                    .is_none();
        if lost_on_sleep {
            return Err(InputError::InvalidSpec(format!(
                "spec.scaleToZero needs storage that outlives the pod, and scheme {} {} \
                 would lose every file when the agent sleeps: use an object store or \
                 spec.storage.dataVolume.claimName",
                storage.scheme,
                if storage.scheme == "fs" {
                    "on an emptyDir"
                } else {
                    "in memory"
                }
            )));
        }
    }

    let names = ChildNames::for_agent(name);
    let mut advertise = vec![names.endpoint(namespace)];
    advertise.extend(spec.exposure.advertise.iter().cloned());
    let repositories = if spec.repositories.is_empty() {
        cfg.default_repositories.clone()
    } else {
        spec.repositories.clone()
    };
    let config = AgentConfig {
        identity_file: PathBuf::from(paths::IDENTITY_DIR).join(paths::IDENTITY_KEY),
        admin_token_file: PathBuf::from(paths::IDENTITY_DIR).join(paths::ADMIN_TOKEN_KEY),
        listen: format!("0.0.0.0:{}", caravan_agent::config::DEFAULT_PEER_PORT),
        admin_listen: format!("0.0.0.0:{}", caravan_agent::config::DEFAULT_ADMIN_PORT),
        metrics_listen: format!("0.0.0.0:{}", caravan_agent::config::DEFAULT_METRICS_PORT),
        advertise,
        sync_interval_secs: None,
        repositories,
        state_prefix: caravan_agent::config::DEFAULT_STATE_PREFIX.to_string(),
        storage: StorageConfig {
            scheme: storage.scheme.clone(),
            options,
            credentials: storage
                .secret_ref
                .as_ref()
                .map(|_| PathBuf::from(paths::CREDENTIALS_DIR)),
            size_limit: empty_dir_limit(spec),
        },
    };
    config.validate().map_err(|e| {
        let msg = strip_config_prefix(&e.to_string());
        if msg.starts_with("repository") {
            InputError::InvalidSpec(format!("spec.repositories: {msg}"))
        } else {
            InputError::InvalidSpec(msg)
        }
    })?;
    Ok(config)
}

/// Checks the keys of the credentials Secret against the spec's options: a
/// key is an option name (the file the agent reads), and an option may not
/// be given in both places, where which one wins would be a guess.
pub fn check_credentials(
    spec_options: &BTreeMap<String, String>,
    secret_name: &str,
    keys: &BTreeSet<String>,
) -> Result<(), InputError> {
    if keys.is_empty() {
        return Err(InputError::InvalidOptions(format!(
            "Secret {secret_name} has no keys; it should hold one key per secret option"
        )));
    }
    for k in keys {
        if !valid_option_key(k) {
            return Err(InputError::InvalidOptions(format!(
                "Secret {secret_name} key {k:?} is not a lower_snake_case option name"
            )));
        }
        if spec_options.contains_key(k) {
            return Err(InputError::InvalidOptions(format!(
                "option {k:?} is given both in spec.storage.options and in Secret {secret_name}; keep one"
            )));
        }
    }
    Ok(())
}

/// The `sizeLimit` of an `fs` Agent's emptyDir, in bytes: past it the
/// kubelet evicts the pod, and a fetch that went over would start again
/// and be evicted again, so the agent refuses it up front (its filesystem's
/// free space says nothing of the limit). A claim is its own filesystem.
fn empty_dir_limit(spec: &AgentSpec) -> Option<u64> {
    let dv = spec.storage.data_volume.as_ref()?;
    if spec.storage.scheme != "fs" || dv.claim_name.is_some() {
        return None;
    }
    let bytes = crate::podspec::quantity_value(&dv.size_limit.as_ref()?.0)?;
    (bytes >= 1.0).then_some(bytes as u64)
}

/// Options the operator checks in the spec and must therefore never come
/// from the credentials Secret (whose values it does not check, and which
/// the agent reads over the spec's): with scheme `fs`, `root` (the spec's
/// is held to `/data`; a Secret's `root: /` published the whole pod).
pub fn check_secret_location_keys(
    scheme: &str,
    secret_name: &str,
    keys: &BTreeSet<String>,
) -> Result<(), InputError> {
    if scheme == "fs" && keys.contains("root") {
        return Err(InputError::InvalidOptions(format!(
            "Secret {secret_name} key \"root\": with scheme fs the root is not a credential; \
             set it in spec.storage.options.root (/data or below)"
        )));
    }
    Ok(())
}

fn strip_config_prefix(s: &str) -> String {
    s.strip_prefix("configuration error: ")
        .unwrap_or(s)
        .to_string()
}

fn valid_cidr(s: &str) -> bool {
    let Some((ip, bits)) = s.split_once('/') else {
        return false;
    };
    match (ip.parse::<std::net::IpAddr>(), bits.parse::<u8>()) {
        (Ok(std::net::IpAddr::V4(_)), Ok(b)) => b <= 32,
        (Ok(std::net::IpAddr::V6(_)), Ok(b)) => b <= 128,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::agent::SecretReference;
    use crate::testutil::{fs_agent, s3_agent};

    fn cfg() -> OperatorConfig {
        OperatorConfig::default()
    }

    #[test]
    fn fs_agent_gets_data_root_and_no_credentials() {
        let a = fs_agent("alice", "tenant-a");
        let c = agent_config("alice", "tenant-a", &a.spec, &cfg()).unwrap();
        assert_eq!(
            c.storage.options.get("root").map(String::as_str),
            Some("/data")
        );
        assert_eq!(c.storage.credentials, None);
        assert_eq!(c.listen, "0.0.0.0:7400");
        assert_eq!(c.admin_listen, "0.0.0.0:7401");
        assert_eq!(c.metrics_listen, "0.0.0.0:9400");
        assert_eq!(
            c.advertise,
            vec!["caravan-alice.tenant-a.svc:7400".to_string()]
        );
        assert_eq!(
            c.identity_file,
            PathBuf::from("/var/run/caravan/identity/identity.key")
        );
        assert_eq!(
            c.admin_token_file,
            PathBuf::from("/var/run/caravan/identity/admin.token")
        );
        // What the operator renders, the agent parses back.
        let text = c.to_toml().unwrap();
        assert_eq!(AgentConfig::parse(&text).unwrap(), c);
    }

    #[test]
    fn s3_agent_points_credentials_at_the_mounted_secret() {
        let a = s3_agent("bob", "tenant-b");
        let c = agent_config("bob", "tenant-b", &a.spec, &cfg()).unwrap();
        assert_eq!(
            c.storage.credentials,
            Some(PathBuf::from("/var/run/caravan/storage"))
        );
        assert_eq!(
            c.storage.options.get("bucket").map(String::as_str),
            Some("photos")
        );
        assert_eq!(
            c.repositories,
            vec!["http://repo.caravan-system.svc:7500".to_string()]
        );
    }

    #[test]
    fn default_repositories_apply_only_when_none_given() {
        let mut a = fs_agent("alice", "t");
        let mut cfg = cfg();
        cfg.default_repositories = vec!["http://default:7500".into()];
        assert_eq!(
            agent_config("alice", "t", &a.spec, &cfg)
                .unwrap()
                .repositories,
            vec!["http://repo.caravan-system.svc:7500".to_string()]
        );
        a.spec.repositories.clear();
        assert_eq!(
            agent_config("alice", "t", &a.spec, &cfg)
                .unwrap()
                .repositories,
            vec!["http://default:7500".to_string()]
        );
    }

    #[test]
    fn secret_ref_into_another_namespace_is_refused() {
        let mut a = s3_agent("bob", "tenant-b");
        a.spec.storage.secret_ref = Some(SecretReference {
            name: "stolen".into(),
            namespace: Some("tenant-a".into()),
        });
        let e = agent_config("bob", "tenant-b", &a.spec, &cfg()).unwrap_err();
        assert_eq!(e.reason(), "SecretOutsideNamespace");
        assert!(e.to_string().contains("tenant-a"), "{e}");
        // Naming its own namespace explicitly is fine.
        a.spec.storage.secret_ref.as_mut().unwrap().namespace = Some("tenant-b".into());
        assert!(agent_config("bob", "tenant-b", &a.spec, &cfg()).is_ok());
    }

    /// Guarantee: an Agent cannot be given more addresses to advertise
    /// than tickets and announcements carry (the agent would refuse its
    /// config and crash-loop); the operator's own come first and fit.
    #[test]
    fn too_many_addresses_to_advertise_are_refused_by_name() {
        let mut a = fs_agent("alice", "t");
        let room = caravan_agent::config::MAX_ADDRESSES - OPERATOR_ADDRESSES;
        a.spec.exposure.advertise = (0..room).map(|i| format!("203.0.113.{i}:7400")).collect();
        assert!(agent_config("alice", "t", &a.spec, &cfg()).is_ok());
        a.spec.exposure.advertise.push("203.0.113.200:7400".into());
        let e = agent_config("alice", "t", &a.spec, &cfg()).unwrap_err();
        assert_eq!(e.reason(), "InvalidSpec");
        assert!(
            e.to_string().contains("spec.exposure.advertise lists 13"),
            "{e}"
        );
        a.spec.exposure.advertise = vec![format!("{}:7400", "h".repeat(300))];
        let e = agent_config("alice", "t", &a.spec, &cfg()).unwrap_err();
        assert!(e.to_string().contains("at most 256 bytes"), "{e}");
        let mut a = fs_agent("alice", "t");
        a.spec.repositories = (0..17).map(|i| format!("http://repo{i}:7500")).collect();
        let e = agent_config("alice", "t", &a.spec, &cfg()).unwrap_err();
        assert!(e.to_string().contains("17 repositories: at most 16"), "{e}");
    }

    #[test]
    fn unknown_scheme_lists_the_supported_ones() {
        let mut a = s3_agent("bob", "t");
        a.spec.storage.scheme = "ftp".into();
        let e = agent_config("bob", "t", &a.spec, &cfg()).unwrap_err();
        assert_eq!(e.reason(), "UnknownStorageScheme");
        assert!(e.to_string().contains("\"ftp\""), "{e}");
        assert!(e.to_string().contains("s3"), "{e}");
    }

    #[test]
    fn malformed_options_are_refused() {
        let cases: &[(&str, &str, &str)] = &[
            ("secret_access_key", "x", "looks like a secret"),
            ("Bucket", "x", "lower_snake_case"),
            ("bucket", "a\nb", "one line"),
        ];
        for (k, v, want) in cases {
            let mut a = s3_agent("bob", "t");
            a.spec.storage.options.insert((*k).into(), (*v).into());
            let e = agent_config("bob", "t", &a.spec, &cfg()).unwrap_err();
            assert_eq!(e.reason(), "InvalidOptions", "{k}");
            assert!(e.to_string().contains(want), "{k}: {e}");
        }
    }

    /// An emptyDir's sizeLimit reaches the agent's config (it refuses a
    /// fetch that would go over it, rather than being evicted); a claim,
    /// or no limit, gives none.
    #[test]
    fn an_empty_dirs_size_limit_reaches_the_agent() {
        use crate::crd::agent::DataVolumeSpec;
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        let with = |claim: Option<&str>, limit: Option<&str>| {
            let mut a = fs_agent("alice", "t");
            a.spec.storage.data_volume = Some(DataVolumeSpec {
                claim_name: claim.map(str::to_string),
                size_limit: limit.map(|l| Quantity(l.into())),
            });
            agent_config("alice", "t", &a.spec, &cfg())
                .unwrap()
                .storage
                .size_limit
        };
        assert_eq!(with(None, Some("1Gi")), Some(1 << 30));
        assert_eq!(with(None, Some("1.5G")), Some(1_500_000_000));
        assert_eq!(with(None, None), None);
        assert_eq!(with(Some("photos"), Some("1Gi")), None);
        let toml = {
            let mut a = fs_agent("alice", "t");
            a.spec.storage.data_volume = Some(DataVolumeSpec {
                claim_name: None,
                size_limit: Some(Quantity("256Mi".into())),
            });
            agent_config("alice", "t", &a.spec, &cfg())
                .unwrap()
                .to_toml()
                .unwrap()
        };
        assert!(toml.contains("size_limit = 268435456"), "{toml}");
    }

    #[test]
    fn fs_root_outside_data_is_refused() {
        for root in ["/etc", "/data/../etc", "relative"] {
            let mut a = fs_agent("alice", "t");
            a.spec.storage.options.insert("root".into(), root.into());
            let e = agent_config("alice", "t", &a.spec, &cfg()).unwrap_err();
            assert_eq!(e.reason(), "InvalidOptions", "{root}");
        }
        let mut a = fs_agent("alice", "t");
        a.spec
            .storage
            .options
            .insert("root".into(), "/data/photos".into());
        assert!(agent_config("alice", "t", &a.spec, &cfg()).is_ok());
    }

    #[test]
    fn other_spec_mistakes_are_invalid_spec() {
        let mut a = fs_agent("alice", "t");
        a.spec.repositories = vec!["ftp://x".into()];
        assert_eq!(
            agent_config("alice", "t", &a.spec, &cfg())
                .unwrap_err()
                .reason(),
            "InvalidSpec"
        );
        let mut a = fs_agent("alice", "t");
        a.spec.exposure.peer_cidrs = vec!["10.0.0.0/99".into()];
        assert_eq!(
            agent_config("alice", "t", &a.spec, &cfg())
                .unwrap_err()
                .reason(),
            "InvalidSpec"
        );
        let mut a = fs_agent("alice", "t");
        a.spec.log_level = "info; rm -rf".into();
        assert_eq!(
            agent_config("alice", "t", &a.spec, &cfg())
                .unwrap_err()
                .reason(),
            "InvalidSpec"
        );
        let a = fs_agent("x", "t");
        let long = "a".repeat(MAX_AGENT_NAME + 1);
        assert_eq!(
            agent_config(&long, "t", &a.spec, &cfg())
                .unwrap_err()
                .reason(),
            "InvalidSpec"
        );
    }

    #[test]
    fn credentials_keys_are_checked_against_options() {
        let opts = BTreeMap::from([("bucket".to_string(), "b".to_string())]);
        let keys = |ks: &[&str]| ks.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            check_secret_location_keys("fs", "s", &keys(&["root"]))
                .unwrap_err()
                .reason(),
            "InvalidOptions",
            "an fs root from the Secret would escape the /data check"
        );
        check_secret_location_keys("s3", "s", &keys(&["root", "secret_access_key"])).unwrap();
        assert!(
            check_credentials(&opts, "s", &keys(&["access_key_id", "secret_access_key"])).is_ok()
        );
        assert_eq!(
            check_credentials(&opts, "s", &keys(&[]))
                .unwrap_err()
                .reason(),
            "InvalidOptions"
        );
        assert_eq!(
            check_credentials(&opts, "s", &keys(&["bucket"]))
                .unwrap_err()
                .reason(),
            "InvalidOptions"
        );
        assert_eq!(
            check_credentials(&opts, "s", &keys(&["AWS_KEY"]))
                .unwrap_err()
                .reason(),
            "InvalidOptions"
        );
    }

    #[test]
    fn node_credentials_are_refused_and_metadata_switched_off() {
        let keys = |ks: &[&str]| ks.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let mut a = s3_agent("bob", "t");
        let c = agent_config("bob", "t", &a.spec, &cfg()).unwrap();
        assert_eq!(c.storage.options["disable_ec2_metadata"], "true");
        assert_eq!(c.storage.options["disable_config_load"], "true");
        for k in ["role_arn", "profile", "disable_ec2_metadata", "external_id"] {
            a.spec.storage.options.insert(k.into(), "x".into());
            let e = agent_config("bob", "t", &a.spec, &cfg()).unwrap_err();
            assert_eq!(e.reason(), "InvalidOptions");
            assert!(e.to_string().contains("node's cloud identity"), "{e}");
            a.spec.storage.options.remove(k);
        }
        // …in the Secret too.
        let secret_keys = keys(&["access_key_id", "secret_access_key", "role_arn"]);
        let e = check_node_credentials("s3", &secret_keys, "Secret s", &cfg()).unwrap_err();
        assert!(e.to_string().contains("role_arn"));
        // gcs: the VM metadata chain is pinned off, service_account refused.
        a.spec.storage.scheme = "gcs".into();
        let c = agent_config("bob", "t", &a.spec, &cfg()).unwrap();
        assert_eq!(c.storage.options["disable_vm_metadata"], "true");
        a.spec
            .storage
            .options
            .insert("service_account".into(), "x".into());
        assert!(agent_config("bob", "t", &a.spec, &cfg()).is_err());
        a.spec.storage.options.remove("service_account");
        // azblob: the Secret must hold the tenant's own key or SAS token.
        assert!(
            check_node_credentials("azblob", &keys(&["account_name"]), "Secret s", &cfg()).is_err()
        );
        assert!(
            check_node_credentials("azblob", &keys(&["sas_token"]), "Secret s", &cfg()).is_ok()
        );
        // A provider that allows node credentials gets neither refusal nor pins.
        let allow = OperatorConfig {
            allow_node_credentials: true,
            ..cfg()
        };
        a.spec.storage.scheme = "s3".into();
        a.spec
            .storage
            .options
            .insert("role_arn".into(), "arn:x".into());
        let c = agent_config("bob", "t", &a.spec, &allow).unwrap();
        assert!(!c.storage.options.contains_key("disable_ec2_metadata"));
    }
}

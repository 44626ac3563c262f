//! Fixtures shared by unit tests and the mocked-API tests.

use std::collections::BTreeMap;

use crate::crd::agent::{ExposureSpec, SecretReference, StorageSpec};
use crate::crd::{Agent, AgentSpec};

/// An s3 Agent `name` in `ns` with a credentials Secret `<name>-storage`.
pub fn s3_agent(name: &str, ns: &str) -> Agent {
    let mut a = Agent::new(
        name,
        AgentSpec {
            storage: StorageSpec {
                scheme: "s3".into(),
                options: BTreeMap::from([
                    ("bucket".to_string(), "photos".to_string()),
                    ("region".to_string(), "eu-west-1".to_string()),
                ]),
                secret_ref: Some(SecretReference {
                    name: format!("{name}-storage"),
                    namespace: None,
                }),
                data_volume: None,
            },
            repositories: vec!["http://repo.caravan-system.svc:7500".into()],
            resources: None,
            exposure: ExposureSpec::default(),
            log_level: "info".into(),
            log_format: None,
            scheduling: None,
            scale_to_zero: None,
            keep_identity: false,
        },
    );
    a.metadata.namespace = Some(ns.into());
    a.metadata.uid = Some(format!("uid-{name}"));
    a.metadata.generation = Some(1);
    a.metadata.resource_version = Some("100".into());
    a
}

/// An fs Agent without a Secret (emptyDir at /data).
pub fn fs_agent(name: &str, ns: &str) -> Agent {
    let mut a = s3_agent(name, ns);
    a.spec.storage = StorageSpec {
        scheme: "fs".into(),
        options: BTreeMap::new(),
        secret_ref: None,
        data_volume: None,
    };
    a
}

//! The CRDs' CEL rules (`x-kubernetes-validations`) are not enforced by the
//! local 1.20 API server, but a rule that does not compile would make a
//! 1.25+ API server reject the whole CRD. So: compile every rule, evaluate
//! them client-side (kube-cel), and check that the operator's own validation
//! refuses the same Agents the rules refuse.

use caravan_operator::config::OperatorConfig;
use caravan_operator::crd::{self, Agent};
use caravan_operator::testutil::{fs_agent, s3_agent};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use kube_cel::{CompiledSchema, Validator, compile_schema};
use serde_json::{Value, json};

fn schema(crd: &CustomResourceDefinition) -> Value {
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

fn count_rules(node: &CompiledSchema, errors: &mut Vec<String>) -> usize {
    let mut n = node.validations.len();
    for e in node.compilation_errors() {
        errors.push(format!("{e:?}"));
    }
    for child in node.properties.values() {
        n += count_rules(child, errors);
    }
    if let Some(items) = &node.items {
        n += count_rules(items, errors);
    }
    if let Some(ap) = &node.additional_properties {
        n += count_rules(ap, errors);
    }
    n
}

#[test]
fn every_rule_compiles() {
    let mut total = 0;
    for crd in crd::all() {
        let mut errors = Vec::new();
        total += count_rules(&compile_schema(&schema(&crd)), &mut errors);
        assert!(errors.is_empty(), "{}: {errors:?}", crd.spec.names.kind);
    }
    assert_eq!(
        total, 7,
        "rules: agent name, repositories, fs root, idleAfter; share mode, subscribe source; grant immutability"
    );
}

fn cel_accepts(agent: &Agent) -> bool {
    let v = serde_json::to_value(agent).unwrap();
    Validator::new()
        .validate(&schema(&crd::agent_crd()), &v, None)
        .is_ok()
}

fn operator_accepts(agent: &Agent) -> bool {
    caravan_operator::validate::agent_config(
        agent.metadata.name.as_deref().unwrap(),
        agent.metadata.namespace.as_deref().unwrap(),
        &agent.spec,
        &OperatorConfig::default(),
    )
    .is_ok()
}

#[test]
fn operator_refuses_what_the_agent_rules_refuse() {
    let mut cases: Vec<(&str, Agent, bool)> = Vec::new();
    cases.push(("s3 example", s3_agent("alice", "t"), true));
    cases.push(("fs default root", fs_agent("alice", "t"), true));
    let mut a = fs_agent("alice", "t");
    a.spec
        .storage
        .options
        .insert("root".into(), "/data/alice".into());
    cases.push(("fs root below /data", a, true));
    let mut a = fs_agent("alice", "t");
    a.spec.storage.options.insert("root".into(), "/etc".into());
    cases.push(("fs root outside /data", a, false));
    let mut a = fs_agent("alice", "t");
    a.spec.repositories = vec!["ftp://x".into()];
    cases.push(("non-http repository", a, false));
    let long = "a".repeat(caravan_operator::names::MAX_AGENT_NAME + 1);
    cases.push(("name too long", fs_agent(&long, "t"), false));
    cases.push(("name with a dot", fs_agent("a.b", "t"), false));
    for (what, idle, valid) in [
        ("idleAfter 15m", "15m", true),
        ("idleAfter 10s", "10s", true),
        ("idleAfter 24h", "24h", true),
        ("idleAfter 5s", "5s", false),
        ("idleAfter 25h", "25h", false),
    ] {
        let mut a = s3_agent("alice", "t");
        a.spec.scale_to_zero = Some(caravan_operator::crd::ScaleToZeroSpec {
            idle_after: idle.into(),
        });
        cases.push((what, a, valid));
    }
    for (what, agent, valid) in cases {
        assert_eq!(cel_accepts(&agent), valid, "CEL on {what}");
        assert_eq!(operator_accepts(&agent), valid, "operator on {what}");
    }
}

#[test]
fn share_needs_exactly_one_mode() {
    let s = schema(&crd::Share::crd());
    let v = Validator::new();
    let base = json!({"apiVersion":"caravan.dev/v1alpha1","kind":"Share","metadata":{"name":"s"}});
    let with = |spec: Value| {
        let mut o = base.clone();
        o["spec"] = spec;
        o
    };
    let publish = json!({"path": "photos/"});
    let subscribe = json!({"ticket": "t", "destination": "in/"});
    assert!(
        v.validate(&s, &with(json!({"agent":"a","publish":publish})), None)
            .is_ok()
    );
    assert!(
        v.validate(&s, &with(json!({"agent":"a","subscribe":subscribe})), None)
            .is_ok()
    );
    assert!(v.validate(&s, &with(json!({"agent":"a"})), None).is_err());
    assert!(
        v.validate(
            &s,
            &with(json!({"agent":"a","publish":publish,"subscribe":subscribe})),
            None
        )
        .is_err()
    );
}

#[test]
fn trust_grant_subject_is_immutable() {
    let s = schema(&crd::TrustGrant::crd());
    let id = caravan_agent::identity::SecretKey::from_seed([1; 32])
        .agent_id()
        .to_string();
    let other = caravan_agent::identity::SecretKey::from_seed([2; 32])
        .agent_id()
        .to_string();
    let grant = |subject: &str, depth: u8| {
        json!({"apiVersion":"caravan.dev/v1alpha1","kind":"TrustGrant","metadata":{"name":"g"},
               "spec":{"issuer":"alice","subject":subject,"depth":depth}})
    };
    let v = Validator::new();
    assert!(v.validate(&s, &grant(&id, 1), None).is_ok());
    assert!(v.validate(&s, &grant(&id, 2), Some(&grant(&id, 1))).is_ok());
    assert!(
        v.validate(&s, &grant(&other, 1), Some(&grant(&id, 1)))
            .is_err()
    );
}

#[test]
fn subscribe_names_the_share_one_way_and_cel_agrees_with_the_operator() {
    use caravan_operator::crd::share::ShareSpec;
    use caravan_operator::shares::plan;
    let s = schema(&crd::Share::crd());
    let v = Validator::new();
    let publisher = caravan_agent::identity::SecretKey::from_seed([1; 32])
        .agent_id()
        .to_string();
    let share_id = caravan_agent::ticket::ShareId([7; 32]).to_string();
    let cases = [
        (json!({"ticket": "t"}), true),
        (
            json!({"ticketSecretRef": {"name": "s", "key": "ticket"}}),
            true,
        ),
        (json!({"shareId": share_id, "publisher": publisher}), true),
        (json!({}), false),
        (json!({"shareId": share_id}), false),
        (json!({"publisher": publisher}), false),
        (
            json!({"ticket": "t", "shareId": share_id, "publisher": publisher}),
            false,
        ),
        (
            json!({"ticket": "t", "ticketSecretRef": {"name": "s", "key": "k"}}),
            false,
        ),
    ];
    for (src, ok) in cases {
        let mut sub = src.clone();
        sub["destination"] = json!("inbox/");
        let spec = json!({"agent": "bob", "subscribe": sub});
        let obj = json!({"apiVersion":"caravan.dev/v1alpha1","kind":"Share",
                         "metadata":{"name":"s"},"spec": spec});
        assert_eq!(v.validate(&s, &obj, None).is_ok(), ok, "CEL on {src}");
        let parsed: ShareSpec = serde_json::from_value(spec).unwrap();
        let sub = parsed.subscribe.as_ref().unwrap();
        assert_eq!(plan::ticket_source(sub).is_ok(), ok, "operator on {src}");
    }
}

#[test]
fn issuer_is_immutable_in_cel_and_the_operator_and_agent_once_held() {
    use caravan_operator::crd::{Share, ShareStatus, TrustGrant, TrustGrantStatus};
    use caravan_operator::{grants, shares};
    let v = Validator::new();
    // Share: spec.agent.
    let s = schema(&crd::Share::crd());
    let share = |agent: &str| {
        json!({"apiVersion":"caravan.dev/v1alpha1","kind":"Share","metadata":{"name":"s"},
               "spec":{"agent":agent,"publish":{"path":"p","recipients":{"trustedWithinDepth":1}}}})
    };
    // No CEL rule (it could not tell whether an Agent holds the share yet,
    // and would refuse correcting a misspelt name): the operator decides.
    assert!(v.validate(&s, &share("bob2"), Some(&share("bob"))).is_ok());
    let mut moved: Share = serde_json::from_value(share("bob2")).unwrap();
    // Nothing declared yet (e.g. a misspelt Agent): may be corrected.
    shares::plan::check_holder(&moved).unwrap();
    moved.status = Some(ShareStatus {
        agent: Some("bob".into()),
        ..Default::default()
    });
    assert_eq!(
        shares::plan::check_holder(&moved).unwrap_err().reason(),
        "InvalidSpec"
    );
    moved.spec.agent = "bob".into();
    shares::plan::check_holder(&moved).unwrap();

    // TrustGrant: spec.issuer.
    let s = schema(&crd::TrustGrant::crd());
    let subject = caravan_agent::identity::SecretKey::from_seed([1; 32])
        .agent_id()
        .to_string();
    let grant = |issuer: &str| {
        json!({"apiVersion":"caravan.dev/v1alpha1","kind":"TrustGrant","metadata":{"name":"g"},
               "spec":{"issuer":issuer,"subject":subject,"depth":1}})
    };
    assert!(v.validate(&s, &grant("bob2"), Some(&grant("bob"))).is_err());
    let mut moved: TrustGrant = serde_json::from_value(grant("bob2")).unwrap();
    moved.status = Some(TrustGrantStatus {
        issuer: Some("bob".into()),
        ..Default::default()
    });
    assert_eq!(
        grants::plan::check_holder(&moved).unwrap_err().reason(),
        "InvalidSpec"
    );
}

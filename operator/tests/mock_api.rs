//! Reconcile scenarios against a mocked API server (tower-test), asserting
//! the exact sequence of requests, in the style of kube-rs' controller-rs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use caravan_agent::identity::SecretKey;
use caravan_operator::config::OperatorConfig;
use caravan_operator::controller::{self, Context, Outcome};
use caravan_operator::crd::{Agent, AgentStatus};
use caravan_operator::metrics::Metrics;
use caravan_operator::status::{self, Observation};
use caravan_operator::testutil::{fs_agent, s3_agent};
use http::{Request, Response};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Send = tower_test::mock::SendResponse<Response<Body>>;

fn fixed_now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

struct ApiServer(Handle);

struct Seen {
    body: Value,
    query: String,
    send: Send,
}

impl ApiServer {
    async fn expect(&mut self, method: &str, path: &str) -> Seen {
        let (req, send) = tokio::time::timeout(Duration::from_secs(5), self.0.next_request())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {method} {path}"))
            .unwrap_or_else(|| panic!("client gone; expected {method} {path}"));
        assert_eq!(
            (req.method().as_str(), req.uri().path()),
            (method, path),
            "unexpected request {} {}",
            req.method(),
            req.uri()
        );
        let query = req.uri().query().unwrap_or_default().to_string();
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Seen { body, query, send }
    }

    /// Asserts the client made no further request (all clients dropped).
    async fn done(mut self) {
        if let Ok(Some((req, _))) =
            tokio::time::timeout(Duration::from_millis(200), self.0.next_request()).await
        {
            panic!("unexpected extra request {} {}", req.method(), req.uri());
        }
    }
}

fn respond(send: Send, code: u16, body: &Value) {
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap(),
    );
}

fn not_found(send: Send, what: &str) {
    respond(
        send,
        404,
        &json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,
                "message": format!("{what} not found")}),
    );
}

impl Seen {
    fn echo(self) -> Value {
        let body = self.body.clone();
        respond(self.send, 200, &body);
        body
    }
}

fn context() -> (Arc<Context>, ApiServer) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "caravan-operator".into(),
            instance: Some("test".into()),
        },
    );
    let mut ctx = Context::new(
        client,
        OperatorConfig::default(),
        recorder,
        Metrics::new().unwrap(),
    );
    ctx.clock = fixed_now;
    (Arc::new(ctx), ApiServer(handle))
}

fn spawn(agent: Agent, ctx: Arc<Context>) -> JoinHandle<Result<Outcome, controller::Error>> {
    tokio::spawn(async move { controller::reconcile_agent(&agent, &ctx).await })
}

fn credentials_secret(name: &str, ns: &str) -> Value {
    json!({"apiVersion":"v1","kind":"Secret",
           "metadata":{"name":name,"namespace":ns,"resourceVersion":"42"},
           "data":{"access_key_id":"QUtJQQ==","secret_access_key":"c2VjcmV0"}})
}

fn identity_secret(agent: &Agent, key: &SecretKey) -> Value {
    let name = agent.metadata.name.clone().unwrap();
    let b64 = |s: &str| data_encoding::BASE64.encode(s.as_bytes());
    json!({"apiVersion":"v1","kind":"Secret",
           "metadata":{"name":format!("caravan-{name}-identity"),
                       "namespace":agent.metadata.namespace,
                       "ownerReferences":[{"apiVersion":"caravan.dev/v1alpha1","kind":"Agent",
                           "name":name,"uid":agent.metadata.uid,"controller":true,"blockOwnerDeletion":true}]},
           "immutable":true,
           "data":{"identity.key": b64(&key.to_text()), "admin.token": b64("00")}})
}

fn ready_deployment(applied: &Value) -> Value {
    let mut d = applied.clone();
    d["metadata"]["generation"] = json!(1);
    d["status"] = json!({"observedGeneration":1,"replicas":1,"updatedReplicas":1,
                         "readyReplicas":1,"availableReplicas":1});
    d
}

/// Serves the four server-side applies (Service first: its ClusterIP is
/// advertised); returns the applied bodies as ConfigMap, Deployment,
/// Service, NetworkPolicy.
async fn expect_children(api: &mut ApiServer, ns: &str, name: &str, ready: bool) -> Vec<Value> {
    let mut out = Vec::new();
    let svc = api
        .expect(
            "PATCH",
            &format!("/api/v1/namespaces/{ns}/services/caravan-{name}"),
        )
        .await;
    let svc_body = svc.body.clone();
    let mut answered = svc_body.clone();
    answered["spec"]["clusterIP"] = json!("10.233.0.44");
    respond(svc.send, 200, &answered);
    let cm = api
        .expect(
            "PATCH",
            &format!("/api/v1/namespaces/{ns}/configmaps/caravan-{name}-config"),
        )
        .await;
    assert!(
        cm.query.contains("fieldManager=caravan-operator"),
        "{}",
        cm.query
    );
    assert!(cm.query.contains("force=true"), "{}", cm.query);
    out.push(cm.echo());
    let dep = api
        .expect(
            "PATCH",
            &format!("/apis/apps/v1/namespaces/{ns}/deployments/caravan-{name}"),
        )
        .await;
    let body = dep.body.clone();
    if ready {
        respond(dep.send, 200, &ready_deployment(&body));
    } else {
        dep.echo();
    }
    out.push(body);
    out.push(svc_body);
    out.push(
        api.expect(
            "PATCH",
            &format!("/apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/caravan-{name}"),
        )
        .await
        .echo(),
    );
    if !ready {
        // Rolling out: the newest pod is asked whether it is only slow.
        let pods = api
            .expect("GET", &format!("/api/v1/namespaces/{ns}/pods"))
            .await;
        assert!(
            pods.query.contains("caravan.dev%2Fagent%3D") && pods.query.contains(name),
            "{}",
            pods.query
        );
        respond(
            pods.send,
            200,
            &json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}),
        );
    }
    out
}

async fn expect_event(api: &mut ApiServer, ns: &str, reason: &str, type_: &str) -> Value {
    let ev = api
        .expect(
            "POST",
            &format!("/apis/events.k8s.io/v1/namespaces/{ns}/events"),
        )
        .await;
    assert_eq!(ev.body["reason"], reason, "{}", ev.body);
    assert_eq!(ev.body["type"], type_, "{}", ev.body);
    ev.echo()
}

async fn expect_status(api: &mut ApiServer, ns: &str, name: &str) -> Value {
    let st = api
        .expect(
            "PATCH",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{ns}/agents/{name}/status"),
        )
        .await;
    assert!(
        st.query.contains("fieldManager=caravan-operator"),
        "{}",
        st.query
    );
    assert_eq!(st.body["kind"], "Agent");
    let status = st.body["status"].clone();
    // The API server answers with the whole object.
    let mut whole = serde_json::to_value(s3_agent(name, ns)).unwrap();
    whole["status"] = status.clone();
    respond(st.send, 200, &whole);
    status
}

fn condition<'a>(status: &'a Value, ty: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == ty)
        .unwrap()
}

#[tokio::test]
async fn new_agent_gets_identity_then_children_then_status() {
    let (ctx, mut api) = context();
    let agent = s3_agent("alice", "tenant-a");
    let task = spawn(agent, ctx.clone());

    let cred = api
        .expect("GET", "/api/v1/namespaces/tenant-a/secrets/alice-storage")
        .await;
    respond(
        cred.send,
        200,
        &credentials_secret("alice-storage", "tenant-a"),
    );
    let idg = api
        .expect(
            "GET",
            "/api/v1/namespaces/tenant-a/secrets/caravan-alice-identity",
        )
        .await;
    not_found(idg.send, "secret");
    let created = api
        .expect("POST", "/api/v1/namespaces/tenant-a/secrets")
        .await;
    assert!(created.query.contains("fieldManager=caravan-operator"));
    let secret = created.body.clone();
    assert_eq!(secret["metadata"]["name"], "caravan-alice-identity");
    assert_eq!(secret["immutable"], true);
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], "uid-alice");
    let key_text = String::from_utf8(
        data_encoding::BASE64
            .decode(secret["data"]["identity.key"].as_str().unwrap().as_bytes())
            .unwrap(),
    )
    .unwrap();
    let agent_id = SecretKey::from_text(&key_text)
        .unwrap()
        .agent_id()
        .to_string();
    let token = data_encoding::BASE64
        .decode(secret["data"]["admin.token"].as_str().unwrap().as_bytes())
        .unwrap();
    assert_eq!(token.len(), 64, "32 random bytes, hex");
    created.echo();
    let ev = expect_event(&mut api, "tenant-a", "IdentityCreated", "Normal").await;
    assert!(ev["note"].as_str().unwrap().contains(&agent_id));
    assert!(
        !ev.to_string().contains("caravan-secret-key"),
        "key must never leak"
    );

    let applied = expect_children(&mut api, "tenant-a", "alice", false).await;
    let toml = applied[0]["data"]["agent.toml"].as_str().unwrap();
    assert!(toml.contains("scheme = \"s3\""), "{toml}");
    assert!(
        toml.contains(
            "advertise = [\n    \"10.233.0.44:7400\",\n    \"caravan-alice.tenant-a.svc:7400\",\n]"
        ),
        "the ClusterIP is advertised first, beside the DNS name: {toml}"
    );
    assert!(
        toml.contains("credentials = \"/var/run/caravan/storage\""),
        "{toml}"
    );
    assert!(
        !toml.contains("c2VjcmV0") && !toml.contains("secret_access_key"),
        "{toml}"
    );
    let tmpl = &applied[1]["spec"]["template"];
    assert_eq!(
        tmpl["metadata"]["annotations"]["caravan.dev/credentials-version"],
        "42"
    );
    assert_eq!(tmpl["spec"]["automountServiceAccountToken"], false);

    let status = expect_status(&mut api, "tenant-a", "alice").await;
    assert_eq!(status["agentId"], agent_id.as_str());
    assert_eq!(status["endpoint"], "caravan-alice.tenant-a.svc:7400");
    assert_eq!(status["phase"], "Pending");
    assert_eq!(condition(&status, "Progressing")["status"], "True");
    assert_eq!(condition(&status, "Ready")["observedGeneration"], 1);
    expect_event(&mut api, "tenant-a", "RollingOut", "Normal").await;

    // A pod just rolling out is looked at again within seconds (the
    // watches see no pod crash), not after the minute of a long rollout.
    let outcome = task.await.unwrap().unwrap();
    assert!(
        matches!(outcome, Outcome::Healthy(d) if d == controller::SHORT_RESYNC),
        "{outcome:?}"
    );
    drop(ctx);
    api.done().await;
}

/// The status a ready fs Agent would be given, so the test can start there.
fn ready_status(agent: &Agent, agent_id: &str) -> AgentStatus {
    let dep: Deployment = serde_json::from_value(json!({
        "metadata":{"generation":1},"spec":{"replicas":1,"selector":{},"template":{}},
        "status":{"observedGeneration":1,"replicas":1,"updatedReplicas":1,"readyReplicas":1,"availableReplicas":1}
    }))
    .unwrap();
    let endpoint = format!(
        "caravan-{}.{}.svc:7400",
        agent.metadata.name.as_deref().unwrap(),
        agent.metadata.namespace.as_deref().unwrap()
    );
    let mut st = status::compute(
        None,
        agent.metadata.generation,
        Some(agent_id.into()),
        Some(endpoint.clone()),
        &Observation::Applied(&dep),
        fixed_now(),
    );
    // What expect_children's Service answer (ClusterIP 10.233.0.44) yields.
    st.addresses = vec!["10.233.0.44:7400".into(), endpoint];
    st
}

#[tokio::test]
async fn steady_state_reuses_identity_and_sends_no_status_patch() {
    let (ctx, mut api) = context();
    let key = SecretKey::from_seed([3; 32]);
    let mut agent = fs_agent("carol", "tenant-a");
    agent.status = Some(ready_status(&agent, &key.agent_id().to_string()));
    let task = spawn(agent.clone(), ctx.clone());

    // fs needs no credentials Secret: the first request is the identity.
    let idg = api
        .expect(
            "GET",
            "/api/v1/namespaces/tenant-a/secrets/caravan-carol-identity",
        )
        .await;
    respond(idg.send, 200, &identity_secret(&agent, &key));
    let applied = expect_children(&mut api, "tenant-a", "carol", true).await;
    let pod = &applied[1]["spec"]["template"]["spec"];
    let data = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "data")
        .unwrap();
    assert!(data.get("emptyDir").is_some(), "{data}");

    let outcome = task.await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::Healthy(d) if d == controller::RESYNC));
    drop(ctx);
    api.done().await; // no POST secret, no status patch, no event
}

#[tokio::test]
async fn missing_credentials_secret_is_a_condition_not_an_error() {
    let (ctx, mut api) = context();
    let task = spawn(s3_agent("dave", "tenant-b"), ctx.clone());
    let cred = api
        .expect("GET", "/api/v1/namespaces/tenant-b/secrets/dave-storage")
        .await;
    not_found(cred.send, "secret");
    let status = expect_status(&mut api, "tenant-b", "dave").await;
    assert_eq!(status["phase"], "Degraded");
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "SecretNotFound");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("tenant-b/dave-storage")
    );
    expect_event(&mut api, "tenant-b", "SecretNotFound", "Warning").await;
    let outcome = task.await.unwrap().unwrap();
    assert!(matches!(outcome, Outcome::BadInput(d) if d == controller::SECRET_RECHECK));
    drop(ctx);
    api.done().await;
}

async fn bad_spec_case(agent: Agent, reason: &str) {
    let (ctx, mut api) = context();
    let ns = agent.metadata.namespace.clone().unwrap();
    let name = agent.metadata.name.clone().unwrap();
    let task = spawn(agent, ctx.clone());
    // Nothing is read or applied: the very first request is the status patch.
    let status = expect_status(&mut api, &ns, &name).await;
    assert_eq!(condition(&status, "Degraded")["reason"], reason);
    assert_eq!(condition(&status, "Ready")["status"], "False");
    expect_event(&mut api, &ns, reason, "Warning").await;
    assert!(matches!(task.await.unwrap().unwrap(), Outcome::BadInput(_)));
    drop(ctx);
    api.done().await;
}

#[tokio::test]
async fn secret_ref_into_another_namespace_reads_no_secret() {
    let mut a = s3_agent("erin", "tenant-b");
    a.spec.storage.secret_ref.as_mut().unwrap().namespace = Some("tenant-a".into());
    bad_spec_case(a, "SecretOutsideNamespace").await;
}

#[tokio::test]
async fn unknown_storage_scheme_is_reported() {
    let mut a = s3_agent("frank", "tenant-b");
    a.spec.storage.scheme = "ftp".into();
    bad_spec_case(a, "UnknownStorageScheme").await;
}

#[tokio::test]
async fn malformed_options_are_reported() {
    let mut a = s3_agent("grace", "tenant-b");
    a.spec.storage.options = BTreeMap::from([("secret_access_key".into(), "oops".into())]);
    bad_spec_case(a, "InvalidOptions").await;
}

#[tokio::test]
async fn identity_create_race_keeps_the_winner() {
    let (ctx, mut api) = context();
    let agent = fs_agent("heidi", "tenant-a");
    let winner = SecretKey::from_seed([9; 32]);
    let task = spawn(agent.clone(), ctx.clone());
    let path = "/api/v1/namespaces/tenant-a/secrets/caravan-heidi-identity";
    not_found(api.expect("GET", path).await.send, "secret");
    let post = api
        .expect("POST", "/api/v1/namespaces/tenant-a/secrets")
        .await;
    respond(
        post.send,
        409,
        &json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"AlreadyExists","code":409}),
    );
    respond(
        api.expect("GET", path).await.send,
        200,
        &identity_secret(&agent, &winner),
    );
    expect_children(&mut api, "tenant-a", "heidi", true).await;
    let status = expect_status(&mut api, "tenant-a", "heidi").await;
    assert_eq!(status["agentId"], winner.agent_id().to_string().as_str());
    assert_eq!(status["phase"], "Ready");
    expect_event(&mut api, "tenant-a", "AgentReady", "Normal").await;
    task.await.unwrap().unwrap();
    drop(ctx);
    api.done().await;
}

#[tokio::test]
async fn fixing_the_secret_heals_the_agent() {
    let (ctx, mut api) = context();
    let key = SecretKey::from_seed([4; 32]);
    let mut agent = s3_agent("ivan", "tenant-b");
    // It was degraded because the Secret was missing; now the Secret exists.
    let err = caravan_operator::validate::InputError::SecretNotFound {
        namespace: "tenant-b".into(),
        name: "ivan-storage".into(),
    };
    agent.status = Some(status::compute(
        None,
        Some(1),
        None,
        None,
        &Observation::BadInput(&err),
        fixed_now(),
    ));
    let task = spawn(agent.clone(), ctx.clone());
    let cred = api
        .expect("GET", "/api/v1/namespaces/tenant-b/secrets/ivan-storage")
        .await;
    respond(
        cred.send,
        200,
        &credentials_secret("ivan-storage", "tenant-b"),
    );
    let idg = api
        .expect(
            "GET",
            "/api/v1/namespaces/tenant-b/secrets/caravan-ivan-identity",
        )
        .await;
    respond(idg.send, 200, &identity_secret(&agent, &key));
    expect_children(&mut api, "tenant-b", "ivan", true).await;
    let status = expect_status(&mut api, "tenant-b", "ivan").await;
    assert_eq!(status["phase"], "Ready");
    assert_eq!(condition(&status, "Degraded")["status"], "False");
    expect_event(&mut api, "tenant-b", "Recovered", "Normal").await;
    expect_event(&mut api, "tenant-b", "AgentReady", "Normal").await;
    task.await.unwrap().unwrap();
    drop(ctx);
    api.done().await;
}

#[tokio::test]
async fn deleted_identity_is_never_regenerated() {
    let (ctx, mut api) = context();
    let mut agent = fs_agent("judy", "tenant-a");
    agent.status = Some(ready_status(&agent, "cv1-old"));
    let task = spawn(agent, ctx.clone());
    not_found(
        api.expect(
            "GET",
            "/api/v1/namespaces/tenant-a/secrets/caravan-judy-identity",
        )
        .await
        .send,
        "secret",
    );
    let status = expect_status(&mut api, "tenant-a", "judy").await;
    assert_eq!(condition(&status, "Degraded")["reason"], "IdentityLost");
    assert_eq!(status["agentId"], "cv1-old");
    expect_event(&mut api, "tenant-a", "IdentityLost", "Warning").await;
    task.await.unwrap().unwrap();
    drop(ctx);
    api.done().await;
}

#[tokio::test]
async fn api_errors_are_returned_and_backed_off() {
    let (ctx, mut api) = context();
    let agent = s3_agent("mallory", "tenant-b");
    let task = spawn(agent.clone(), ctx.clone());
    let cred = api
        .expect("GET", "/api/v1/namespaces/tenant-b/secrets/mallory-storage")
        .await;
    respond(
        cred.send,
        500,
        &json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"InternalError","code":500}),
    );
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(err.metric_reason(), "InternalError");
    let a = Arc::new(agent);
    let first = controller::error_policy(a.clone(), &err, ctx.clone());
    let second = controller::error_policy(a.clone(), &err, ctx.clone());
    assert_eq!(
        first,
        kube::runtime::controller::Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        second,
        kube::runtime::controller::Action::requeue(Duration::from_secs(2))
    );
    assert_eq!(controller::backoff(20), Duration::from_secs(300));
    let metrics = ctx.metrics.render();
    assert!(metrics.contains(r#"caravan_operator_reconcile_errors_total{controller="agent",reason="InternalError"} 2"#), "{metrics}");
    drop(ctx);
    api.done().await;
}

#[tokio::test]
async fn pod_fields_the_api_server_would_refuse_are_refused_before_anything_is_applied() {
    use caravan_operator::crd::agent::{DataVolumeSpec, SchedulingSpec};
    use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    fn q(s: &str) -> Quantity {
        Quantity(s.into())
    }
    type Edit = Box<dyn Fn(&mut Agent)>;
    let cases: Vec<Edit> = vec![
        Box::new(|a| {
            a.spec.resources = Some(ResourceRequirements {
                requests: Some(BTreeMap::from([("cpu".into(), q("-1"))])),
                ..Default::default()
            })
        }),
        Box::new(|a| {
            a.spec.resources = Some(ResourceRequirements {
                requests: Some(BTreeMap::from([("memory".into(), q("2Gi"))])),
                limits: Some(BTreeMap::from([("memory".into(), q("1Gi"))])),
                ..Default::default()
            })
        }),
        Box::new(|a| {
            a.spec.scheduling = Some(SchedulingSpec {
                tolerations: Some(vec![Toleration {
                    operator: Some("Maybe".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            })
        }),
        Box::new(|a| {
            a.spec.scheduling = Some(SchedulingSpec {
                node_selector: Some(BTreeMap::from([("bad key".into(), "x".into())])),
                ..Default::default()
            })
        }),
        Box::new(|a| {
            a.spec.storage.data_volume = Some(DataVolumeSpec {
                claim_name: None,
                size_limit: Some(q("-5Mi")),
            })
        }),
        Box::new(|a| {
            a.spec.exposure.service_annotations = BTreeMap::from([("a b".into(), "x".into())])
        }),
    ];
    for edit in cases {
        // A Ready agent edited into the mistake: Ready turns False with the
        // reason, a Warning Event, and not one child is applied.
        let key = SecretKey::from_seed([3; 32]);
        let mut agent = fs_agent("carol", "tenant-a");
        agent.status = Some(ready_status(&agent, &key.agent_id().to_string()));
        edit(&mut agent);
        let (ctx, mut api) = context();
        let task = spawn(agent, ctx.clone());
        let status = expect_status(&mut api, "tenant-a", "carol").await;
        assert_eq!(condition(&status, "Ready")["status"], "False");
        assert_eq!(condition(&status, "Ready")["reason"], "InvalidSpec");
        assert!(
            condition(&status, "Degraded")["message"]
                .as_str()
                .unwrap()
                .starts_with("spec."),
            "{status}"
        );
        expect_event(&mut api, "tenant-a", "InvalidSpec", "Warning").await;
        assert!(matches!(task.await.unwrap().unwrap(), Outcome::BadInput(_)));
        drop(ctx);
        api.done().await;
    }
}

#[tokio::test]
async fn a_child_the_api_server_refuses_is_the_specs_fault_not_a_retry_loop() {
    let (ctx, mut api) = context();
    let key = SecretKey::from_seed([3; 32]);
    let mut agent = fs_agent("carol", "tenant-a");
    agent.status = Some(ready_status(&agent, &key.agent_id().to_string()));
    let task = spawn(agent.clone(), ctx.clone());
    let idg = api
        .expect(
            "GET",
            "/api/v1/namespaces/tenant-a/secrets/caravan-carol-identity",
        )
        .await;
    respond(idg.send, 200, &identity_secret(&agent, &key));
    let svc = api
        .expect(
            "PATCH",
            "/api/v1/namespaces/tenant-a/services/caravan-carol",
        )
        .await;
    let mut answered = svc.body.clone();
    answered["spec"]["clusterIP"] = json!("10.233.0.44");
    respond(svc.send, 200, &answered);
    api.expect(
        "PATCH",
        "/api/v1/namespaces/tenant-a/configmaps/caravan-carol-config",
    )
    .await
    .echo();
    let dep = api
        .expect(
            "PATCH",
            "/apis/apps/v1/namespaces/tenant-a/deployments/caravan-carol",
        )
        .await;
    respond(
        dep.send,
        422,
        &json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Invalid","code":422,
                "message":"Deployment.apps \"caravan-carol\" is invalid: spec.template.spec.containers[0].resources.requests: Invalid value: \"2\": must be less than or equal to cpu limit"}),
    );
    // No NetworkPolicy: the status says why, with the API's message.
    let status = expect_status(&mut api, "tenant-a", "carol").await;
    let ready = condition(&status, "Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "InvalidSpec");
    let msg = ready["message"].as_str().unwrap();
    assert!(
        msg.contains("refused the Deployment caravan-carol") && msg.contains("cpu limit"),
        "{msg}"
    );
    expect_event(&mut api, "tenant-a", "InvalidSpec", "Warning").await;
    assert!(matches!(
        task.await.unwrap().unwrap(),
        Outcome::BadInput(d) if d == controller::RESYNC
    ));
    drop(ctx);
    api.done().await;
}

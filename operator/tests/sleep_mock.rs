//! Scale to zero against a mocked API server (tower-test) and a scripted
//! agent: the exact requests of the reconcile that puts an idle Agent to
//! sleep (its Deployment applied with 0 replicas, status Sleeping, an Event)
//! and of the one that wakes it for a changed Share (1 replica, no call to
//! the sleeping agent).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use caravan_agent::identity::SecretKey;
use caravan_operator::agent_api::{
    ActivityReport, AgentApi, AgentEndpoint, CallError, DeclaredGrant, DeclaredGrantStatus,
    DeclaredShare, DeclaredShareStatus, RevocationStatus,
};
use caravan_operator::config::OperatorConfig;
use caravan_operator::controller::{self, Context, Outcome};
use caravan_operator::crd::agent::ScaleToZeroSpec;
use caravan_operator::crd::share::{PublishSpec, RecipientsSpec, ShareSpec, ShareStatus};
use caravan_operator::crd::{Agent, Share, SharePhase};
use caravan_operator::metrics::Metrics;
use caravan_operator::sleep;
use caravan_operator::status::{self, Observation};
use caravan_operator::testutil::s3_agent;
use futures::future::BoxFuture;
use http::{Request, Response};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Send = tower_test::mock::SendResponse<Response<Body>>;

const NOW: i64 = 1_800_000_000;

fn fixed_now() -> Timestamp {
    Timestamp::from_second(NOW).unwrap()
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

impl Seen {
    fn echo(self) -> Value {
        let body = self.body.clone();
        respond(self.send, 200, &body);
        body
    }
}

/// An agent that only answers `GET /v1/activity`, and records who asked.
struct FakeAgent {
    report: ActivityReport,
    asked: Mutex<Vec<String>>,
}

impl AgentApi for FakeAgent {
    fn put_share<'a>(
        &'a self,
        _: &'a AgentEndpoint,
        _: &'a str,
        _: &'a DeclaredShare,
    ) -> BoxFuture<'a, Result<DeclaredShareStatus, CallError>> {
        panic!("the Agent controller declares no shares")
    }
    fn delete_share<'a>(
        &'a self,
        _: &'a AgentEndpoint,
        _: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        panic!("the Agent controller deletes no shares")
    }
    fn put_grant<'a>(
        &'a self,
        _: &'a AgentEndpoint,
        _: &'a str,
        _: &'a DeclaredGrant,
    ) -> BoxFuture<'a, Result<DeclaredGrantStatus, CallError>> {
        panic!("the Agent controller signs no grants")
    }
    fn delete_grant<'a>(
        &'a self,
        _: &'a AgentEndpoint,
        _: &'a str,
    ) -> BoxFuture<'a, Result<RevocationStatus, CallError>> {
        panic!("the Agent controller revokes no grants")
    }
    fn activity<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
    ) -> BoxFuture<'a, Result<ActivityReport, CallError>> {
        self.asked
            .lock()
            .unwrap()
            .push(format!("{} {}", ep.base, ep.token));
        let r = self.report.clone();
        Box::pin(async move { Ok(r) })
    }
}

fn context(report: ActivityReport) -> (Arc<Context>, Arc<FakeAgent>, ApiServer) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "caravan-operator".into(),
            instance: Some("test".into()),
        },
    );
    let fake = Arc::new(FakeAgent {
        report,
        asked: Mutex::new(Vec::new()),
    });
    let mut ctx = Context::new(
        client,
        OperatorConfig::default(),
        recorder,
        Metrics::new().unwrap(),
    )
    .with_agent_api(fake.clone(), None);
    ctx.clock = fixed_now;
    (Arc::new(ctx), fake, ApiServer(handle))
}

fn key() -> SecretKey {
    SecretKey::from_seed([1; 32])
}

/// alice, Ready (awake) or Sleeping, with `scaleToZero.idleAfter: 20s`,
/// her status as the operator computed it.
fn sleepy_alice(asleep: bool) -> Agent {
    let mut a = s3_agent("alice", "tenant-a");
    a.spec.scale_to_zero = Some(ScaleToZeroSpec {
        idle_after: "20s".into(),
    });
    let then = Timestamp::from_second(NOW - 600).unwrap();
    let ready = Deployment {
        metadata: ObjectMeta {
            generation: Some(1),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            ..Default::default()
        }),
        status: Some(DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(1),
            updated_replicas: Some(1),
            ready_replicas: Some(1),
            available_replicas: Some(1),
            ..Default::default()
        }),
    };
    let obs = if asleep {
        Observation::Sleeping("m")
    } else {
        Observation::Applied(&ready)
    };
    let mut st = status::compute(
        None,
        Some(1),
        Some(key().agent_id().to_string()),
        Some("caravan-alice.tenant-a.svc:7400".into()),
        &obs,
        then,
    );
    st.addresses = vec![
        "10.233.0.44:7400".into(),
        "caravan-alice.tenant-a.svc:7400".into(),
    ];
    let d = sleep::Decision {
        awake: !asleep,
        reason: if asleep { "Idle" } else { "Active" },
        message: "m".into(),
        wake_at: None,
        requeue: Duration::ZERO,
    };
    sleep::apply(&mut st, None, &d, Some(1), then);
    a.status = Some(st);
    a
}

fn photos(generation: i64, observed: i64) -> Share {
    let mut s = Share::new(
        "photos",
        ShareSpec {
            agent: "alice".into(),
            publish: Some(PublishSpec {
                path: "photos".into(),
                recipients: RecipientsSpec {
                    agent_ids: vec![SecretKey::from_seed([2; 32]).agent_id().to_string()],
                    trusted_within_depth: None,
                },
                offline_seeding: false,
                rescan_interval: "5m".into(),
            }),
            subscribe: None,
        },
    );
    s.metadata.namespace = Some("tenant-a".into());
    s.metadata.generation = Some(generation);
    s.status = Some(ShareStatus {
        share_id: Some("sh".into()),
        version: Some(1),
        phase: Some(SharePhase::Ready),
        observed_generation: Some(observed),
        ..Default::default()
    });
    s
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"apiVersion": "caravan.dev/v1alpha1", "kind": kind, "metadata": {}, "items": items})
}

async fn expect_secrets(api: &mut ApiServer) {
    let cred = api
        .expect("GET", "/api/v1/namespaces/tenant-a/secrets/alice-storage")
        .await;
    respond(
        cred.send,
        200,
        &json!({"apiVersion":"v1","kind":"Secret",
                "metadata":{"name":"alice-storage","namespace":"tenant-a","resourceVersion":"42"},
                "data":{"access_key_id":"QUtJQQ==","secret_access_key":"c2VjcmV0"}}),
    );
    let idg = api
        .expect(
            "GET",
            "/api/v1/namespaces/tenant-a/secrets/caravan-alice-identity",
        )
        .await;
    let b64 = |s: &str| data_encoding::BASE64.encode(s.as_bytes());
    respond(
        idg.send,
        200,
        &json!({"apiVersion":"v1","kind":"Secret",
                "metadata":{"name":"caravan-alice-identity","namespace":"tenant-a",
                  "ownerReferences":[{"apiVersion":"caravan.dev/v1alpha1","kind":"Agent",
                    "name":"alice","uid":"uid-alice","controller":true}]},
                "immutable":true,
                "data":{"identity.key": b64(&key().to_text()), "admin.token": b64("t0k3n")}}),
    );
}

async fn expect_lists(api: &mut ApiServer, shares: Vec<Value>) {
    let s = api.expect("GET", "/apis/caravan.dev/v1alpha1/shares").await;
    respond(s.send, 200, &list("ShareList", shares));
    let g = api
        .expect(
            "GET",
            "/apis/caravan.dev/v1alpha1/namespaces/tenant-a/trustgrants",
        )
        .await;
    respond(g.send, 200, &list("TrustGrantList", vec![]));
}

/// The four applies; returns the Deployment's `spec.replicas`.
async fn expect_children(api: &mut ApiServer) -> Value {
    let svc = api
        .expect(
            "PATCH",
            "/api/v1/namespaces/tenant-a/services/caravan-alice",
        )
        .await;
    let mut answered = svc.body.clone();
    answered["spec"]["clusterIP"] = json!("10.233.0.44");
    respond(svc.send, 200, &answered);
    api.expect(
        "PATCH",
        "/api/v1/namespaces/tenant-a/configmaps/caravan-alice-config",
    )
    .await
    .echo();
    let dep = api
        .expect(
            "PATCH",
            "/apis/apps/v1/namespaces/tenant-a/deployments/caravan-alice",
        )
        .await;
    assert!(dep.query.contains("fieldManager=caravan-operator"));
    let replicas = dep.body["spec"]["replicas"].clone();
    dep.echo();
    api.expect(
        "PATCH",
        "/apis/networking.k8s.io/v1/namespaces/tenant-a/networkpolicies/caravan-alice",
    )
    .await
    .echo();
    if replicas == json!(1) {
        // Awake and rolling out: the new pod is asked whether it is only
        // slow (status::pod_trouble); a sleeping agent has none.
        let pods = api.expect("GET", "/api/v1/namespaces/tenant-a/pods").await;
        respond(pods.send, 200, &list("PodList", vec![]));
    }
    replicas
}

async fn expect_status(api: &mut ApiServer) -> Value {
    let st = api
        .expect(
            "PATCH",
            "/apis/caravan.dev/v1alpha1/namespaces/tenant-a/agents/alice/status",
        )
        .await;
    let status = st.body["status"].clone();
    let mut whole = serde_json::to_value(s3_agent("alice", "tenant-a")).unwrap();
    whole["status"] = status.clone();
    respond(st.send, 200, &whole);
    status
}

async fn expect_event(api: &mut ApiServer, reason: &str) -> Value {
    let ev = api
        .expect("POST", "/apis/events.k8s.io/v1/namespaces/tenant-a/events")
        .await;
    assert_eq!(ev.body["reason"], reason, "{}", ev.body);
    ev.echo()
}

fn condition<'a>(status: &'a Value, ty: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == ty)
        .unwrap_or_else(|| panic!("no {ty} condition in {status}"))
}

#[tokio::test]
async fn an_idle_agent_is_scaled_to_zero() {
    let report = ActivityReport {
        uptime_secs: 600,
        idle_secs: Some(25),
        last_activity: Some("serve".into()),
        next_wake_unix: Some(NOW as u64 + 280),
        next_wake_reason: Some("rescan of share photos".into()),
        ..Default::default()
    };
    let (ctx, fake, mut api) = context(report);
    let agent = sleepy_alice(false);
    let c = ctx.clone();
    let task = tokio::spawn(async move { controller::reconcile_agent(&agent, &c).await });

    expect_secrets(&mut api).await;
    let settled = serde_json::to_value(photos(1, 1)).unwrap();
    expect_lists(&mut api, vec![settled]).await;
    let pods = api.expect("GET", "/api/v1/namespaces/tenant-a/pods").await;
    assert!(
        pods.query
            .contains("labelSelector=caravan.dev%2Fagent%3Dalice"),
        "{}",
        pods.query
    );
    respond(
        pods.send,
        200,
        &json!({"apiVersion":"v1","kind":"PodList","metadata":{},"items":[{
            "metadata":{"name":"caravan-alice-1","namespace":"tenant-a",
                        "creationTimestamp":"2027-01-15T08:00:00Z"},
            "status":{"phase":"Running","podIP":"10.0.0.9",
                      "conditions":[{"type":"Ready","status":"True"}]}}]}),
    );
    assert_eq!(expect_children(&mut api).await, json!(0), "scaled to zero");
    let status = expect_status(&mut api).await;
    assert_eq!(status["phase"], "Sleeping");
    let awake = condition(&status, "Awake");
    assert_eq!(
        (&awake["status"], &awake["reason"]),
        (&json!("False"), &json!("Idle"))
    );
    assert!(
        awake["message"]
            .as_str()
            .unwrap()
            .contains("no fetch, serve or pending work for 20s"),
        "{awake}"
    );
    assert_eq!(condition(&status, "Ready")["reason"], "Sleeping");
    assert_eq!(condition(&status, "Degraded")["status"], "False");
    let wake_at: Timestamp = status["wakeAt"].as_str().unwrap().parse().unwrap();
    assert_eq!(wake_at, Timestamp::from_second(NOW + 280).unwrap());
    let ev = expect_event(&mut api, "Sleeping").await;
    assert!(ev["note"].as_str().unwrap().starts_with("Idle: "), "{ev}");

    let outcome = task.await.unwrap().unwrap();
    let Outcome::Healthy(requeue) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(requeue, Duration::from_secs(280), "woken for the rescan");
    assert_eq!(
        *fake.asked.lock().unwrap(),
        ["http://10.0.0.9:7401 t0k3n"],
        "the ready pod's admin API, with the Agent's token"
    );
    drop(ctx);
    api.done().await;
}

#[tokio::test]
async fn a_changed_share_wakes_a_sleeping_agent_without_asking_it() {
    let (ctx, fake, mut api) = context(ActivityReport::default());
    let mut agent = sleepy_alice(true);
    agent.status.as_mut().unwrap().wake_at =
        Some(Time(Timestamp::from_second(NOW + 3000).unwrap()));
    let c = ctx.clone();
    let task = tokio::spawn(async move { controller::reconcile_agent(&agent, &c).await });

    expect_secrets(&mut api).await;
    let changed = serde_json::to_value(photos(2, 1)).unwrap();
    expect_lists(&mut api, vec![changed]).await;
    // No activity call (nor a pod list for it): the cluster already says
    // there is work.
    assert_eq!(expect_children(&mut api).await, json!(1), "woken up");
    let status = expect_status(&mut api).await;
    assert_eq!(status["phase"], "Pending", "rolling out the pod again");
    let awake = condition(&status, "Awake");
    assert_eq!(
        (&awake["status"], &awake["reason"], &awake["message"]),
        (
            &json!("True"),
            &json!("ShareChanged"),
            &json!("Share photos changed")
        )
    );
    assert!(status.get("wakeAt").is_none(), "{status}");
    expect_event(&mut api, "RollingOut").await;
    let ev = expect_event(&mut api, "WokenUp").await;
    assert_eq!(ev["note"], "ShareChanged: Share photos changed");

    // Looked at again soon: the pod rolling out is watched for a crash.
    let outcome = task.await.unwrap().unwrap();
    assert!(
        matches!(outcome, Outcome::Healthy(d) if d == controller::SHORT_RESYNC.min(sleep::BUSY_POLL)),
        "{outcome:?}"
    );
    assert!(fake.asked.lock().unwrap().is_empty());
    drop(ctx);
    api.done().await;
}

#[tokio::test]
async fn a_sleeping_agent_with_nothing_to_do_sleeps_on_without_a_status_patch() {
    let (ctx, fake, mut api) = context(ActivityReport::default());
    let agent = sleepy_alice(true);
    let c = ctx.clone();
    let task = tokio::spawn(async move { controller::reconcile_agent(&agent, &c).await });
    expect_secrets(&mut api).await;
    expect_lists(&mut api, vec![serde_json::to_value(photos(1, 1)).unwrap()]).await;
    assert_eq!(expect_children(&mut api).await, json!(0), "stays at zero");
    let outcome = task.await.unwrap().unwrap();
    assert!(
        matches!(outcome, Outcome::Healthy(d) if d == sleep::SLEEP_RESYNC),
        "{outcome:?}"
    );
    assert!(
        fake.asked.lock().unwrap().is_empty(),
        "a sleeping agent is not called"
    );
    drop(ctx);
    api.done().await;
}

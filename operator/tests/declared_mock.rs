//! Share and TrustGrant reconciles against a mocked API server (tower-test)
//! and a fake agent admin API, asserting the exact sequence of Kubernetes
//! requests and of agent calls.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use caravan_agent::identity::SecretKey;
use caravan_agent::ticket::{ShareId, Ticket};
use caravan_operator::agent_api::{
    AgentApi, AgentEndpoint, CallError, DeclaredGrant, DeclaredGrantStatus, DeclaredShare,
    DeclaredShareStatus, DeclaredState, RecipientTicket, RevocationStatus,
};
use caravan_operator::crd::share::{PublishSpec, RecipientsSpec, ShareSpec, SubscribeSpec};
use caravan_operator::crd::{Share, TrustGrant, TrustGrantSpec};
use caravan_operator::declared::{Context, Error};
use caravan_operator::metrics::Metrics;
use caravan_operator::{grants, shares};
use futures::future::BoxFuture;
use http::{Request, Response};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;
type Send = tower_test::mock::SendResponse<Response<Body>>;

const NS: &str = "tenant-a";

fn fixed_now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn id(seed: u8) -> String {
    SecretKey::from_seed([seed; 32]).agent_id().to_string()
}

struct ApiServer(Handle);

struct Seen {
    body: Value,
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
        let bytes = req.into_body().collect_bytes().await.unwrap();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        Seen { body, send }
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

fn not_found(send: Send) {
    respond(
        send,
        404,
        &json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404,"message":"not found"}),
    );
}

/// A scripted agent: answers in order, records every call.
#[derive(Default)]
struct FakeAgent {
    calls: Mutex<Vec<String>>,
    shares: Mutex<VecDeque<Result<DeclaredShareStatus, CallError>>>,
    grants: Mutex<VecDeque<Result<DeclaredGrantStatus, CallError>>>,
    revocations: Mutex<VecDeque<Result<RevocationStatus, CallError>>>,
    declared: Mutex<Vec<DeclaredShare>>,
}

impl FakeAgent {
    fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
    fn record(&self, ep: &AgentEndpoint, what: String) {
        assert_eq!(ep.base, "http://10.232.0.7:7401");
        assert_eq!(ep.token, "tok-1234567890abcdef");
        self.calls.lock().unwrap().push(what);
    }
}

impl AgentApi for FakeAgent {
    fn put_share<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        name: &'a str,
        share: &'a DeclaredShare,
    ) -> BoxFuture<'a, Result<DeclaredShareStatus, CallError>> {
        self.record(ep, format!("PUT share {name}"));
        self.declared.lock().unwrap().push(share.clone());
        let r = self
            .shares
            .lock()
            .unwrap()
            .pop_front()
            .expect("no scripted share answer");
        Box::pin(async move { r })
    }
    fn delete_share<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        name: &'a str,
    ) -> BoxFuture<'a, Result<(), CallError>> {
        self.record(ep, format!("DELETE share {name}"));
        Box::pin(async { Ok(()) })
    }
    fn put_grant<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        key: &'a str,
        _grant: &'a DeclaredGrant,
    ) -> BoxFuture<'a, Result<DeclaredGrantStatus, CallError>> {
        self.record(ep, format!("PUT grant {key}"));
        let r = self
            .grants
            .lock()
            .unwrap()
            .pop_front()
            .expect("no scripted grant answer");
        Box::pin(async move { r })
    }
    fn delete_grant<'a>(
        &'a self,
        ep: &'a AgentEndpoint,
        key: &'a str,
    ) -> BoxFuture<'a, Result<RevocationStatus, CallError>> {
        self.record(ep, format!("DELETE grant {key}"));
        let r = self
            .revocations
            .lock()
            .unwrap()
            .pop_front()
            .expect("no scripted revocation answer");
        Box::pin(async move { r })
    }
}

fn context(fake: Arc<FakeAgent>) -> (Arc<Context>, ApiServer) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(svc, "default");
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "caravan-operator".into(),
            instance: Some("test".into()),
        },
    );
    let mut ctx = Context::new(client, fake, recorder, Metrics::new().unwrap());
    ctx.clock = fixed_now;
    (Arc::new(ctx), ApiServer(handle))
}

fn agent_json(name: &str, agent_id: &str, ready: bool) -> Value {
    json!({"apiVersion":"caravan.dev/v1alpha1","kind":"Agent",
           "metadata":{"name":name,"namespace":NS,"uid":format!("uid-{name}"),"generation":1},
           "spec":{"storage":{"scheme":"fs"}},
           "status":{"agentId":agent_id,"phase": if ready {"Ready"} else {"Pending"}}})
}

fn identity_json(name: &str) -> Value {
    let b64 = |s: &str| data_encoding::BASE64.encode(s.as_bytes());
    json!({"apiVersion":"v1","kind":"Secret",
           "metadata":{"name":format!("caravan-{name}-identity"),"namespace":NS},
           "data":{"identity.key": b64("unused"), "admin.token": b64("tok-1234567890abcdef\n")}})
}

fn pods_json(name: &str) -> Value {
    json!({"apiVersion":"v1","kind":"PodList","metadata":{},
           "items":[{"metadata":{"name":format!("caravan-{name}-x"),"namespace":NS},
                     "status":{"phase":"Running","podIP":"10.232.0.7",
                               "conditions":[{"type":"Ready","status":"True"}]}}]})
}

/// Serves GET Agent, GET identity Secret, LIST pods for a Ready agent.
async fn expect_ready_agent(api: &mut ApiServer, name: &str, agent_id: &str) {
    let a = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents/{name}"),
        )
        .await;
    respond(a.send, 200, &agent_json(name, agent_id, true));
    expect_endpoint(api, name).await;
}

async fn expect_endpoint(api: &mut ApiServer, name: &str) {
    let s = api
        .expect(
            "GET",
            &format!("/api/v1/namespaces/{NS}/secrets/caravan-{name}-identity"),
        )
        .await;
    respond(s.send, 200, &identity_json(name));
    let p = api
        .expect("GET", &format!("/api/v1/namespaces/{NS}/pods"))
        .await;
    respond(p.send, 200, &pods_json(name));
}

async fn expect_status(api: &mut ApiServer, plural: &str, name: &str, whole: Value) -> Value {
    let st = api
        .expect(
            "PATCH",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/{plural}/{name}/status"),
        )
        .await;
    let status = st.body["status"].clone();
    let mut whole = whole;
    whole["status"] = status.clone();
    respond(st.send, 200, &whole);
    status
}

async fn expect_event(api: &mut ApiServer, reason: &str, type_: &str) {
    let ev = api
        .expect(
            "POST",
            &format!("/apis/events.k8s.io/v1/namespaces/{NS}/events"),
        )
        .await;
    assert_eq!(ev.body["reason"], reason, "{}", ev.body);
    assert_eq!(ev.body["type"], type_, "{}", ev.body);
    let b = ev.body.clone();
    respond(ev.send, 200, &b);
}

/// The status patch that records which Agent holds the share or grant,
/// before the first call to that Agent (`field`: `agent` or `issuer`).
async fn expect_holder(
    api: &mut ApiServer,
    fake: &FakeAgent,
    plural: &str,
    name: &str,
    field: &str,
    agent: &str,
    whole: Value,
) {
    let st = api
        .expect(
            "PATCH",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/{plural}/{name}/status"),
        )
        .await;
    assert_eq!(st.body["status"][field], agent, "{}", st.body);
    assert!(
        fake.calls().is_empty(),
        "recorded before the agent is asked: {:?}",
        fake.calls()
    );
    let mut whole = whole;
    whole["status"] = st.body["status"].clone();
    respond(st.send, 200, &whole);
}

fn condition<'a>(status: &'a Value, ty: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == ty)
        .unwrap()
}

fn with_finalizer<K: kube::Resource>(mut o: K, f: &str) -> K {
    o.meta_mut().finalizers = Some(vec![f.to_string()]);
    o.meta_mut().namespace = Some(NS.into());
    o.meta_mut().uid = Some("uid-obj".into());
    o.meta_mut().generation = Some(1);
    o.meta_mut().resource_version = Some("7".into());
    o
}

fn publish_share() -> Share {
    let s = Share::new(
        "photos",
        ShareSpec {
            agent: "alice".into(),
            publish: Some(PublishSpec {
                path: "photos/".into(),
                recipients: RecipientsSpec {
                    agent_ids: vec![id(4)],
                    trusted_within_depth: Some(2),
                },
                offline_seeding: false,
                rescan_interval: "15s".into(),
            }),
            subscribe: None,
        },
    );
    with_finalizer(s, shares::FINALIZER)
}

fn subscribe_share(ticket: String) -> Share {
    let s = Share::new(
        "from-alice",
        ShareSpec {
            agent: "bob".into(),
            publish: None,
            subscribe: Some(SubscribeSpec {
                ticket: Some(ticket),
                ticket_secret_ref: None,
                share_id: None,
                publisher: None,
                destination: "inbox/".into(),
                poll_interval: "10s".into(),
            }),
        },
    );
    with_finalizer(s, shares::FINALIZER)
}

fn published_report() -> DeclaredShareStatus {
    DeclaredShareStatus {
        name: "photos".into(),
        generation: 1,
        state: DeclaredState::Ready,
        reason: None,
        message: None,
        share_id: Some(ShareId([5; 32]).to_string()),
        publisher: Some(id(1)),
        version: 1,
        files_done: 3,
        files_total: 3,
        bytes_done: 100,
        bytes_total: 100,
        chunks_done: 3,
        chunks_total: 3,
        bytes_received: 0,
        peers: 0,
        tickets: vec![RecipientTicket {
            agent_id: id(4),
            ticket: "caravan-ticket-v1:x".into(),
        }],
        keyless_ticket: Some("caravan-ticket-v1:y".into()),
    }
}

async fn run_share(share: Share, ctx: Arc<Context>) -> Result<Action, Error> {
    shares::reconcile_share(Arc::new(share), &ctx).await
}

#[tokio::test]
async fn a_new_share_gets_its_finalizer_first() {
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let mut share = publish_share();
    share.metadata.finalizers = None;
    let task = tokio::spawn(run_share(share.clone(), ctx));
    let p = api
        .expect(
            "PATCH",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/shares/photos"),
        )
        .await;
    assert!(p.body.to_string().contains(shares::FINALIZER), "{}", p.body);
    let mut whole = serde_json::to_value(&share).unwrap();
    whole["metadata"]["finalizers"] = json!([shares::FINALIZER]);
    respond(p.send, 200, &whole);
    task.await.unwrap().unwrap();
    api.done().await;
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn publish_declares_on_the_agent_and_reports_tickets() {
    let fake = Arc::new(FakeAgent::default());
    fake.shares
        .lock()
        .unwrap()
        .push_back(Ok(published_report()));
    let (ctx, mut api) = context(fake.clone());
    let share = publish_share();
    let task = tokio::spawn(run_share(share.clone(), ctx.clone()));
    expect_ready_agent(&mut api, "alice", &id(1)).await;
    expect_holder(
        &mut api,
        &fake,
        "shares",
        "photos",
        "agent",
        "alice",
        serde_json::to_value(&share).unwrap(),
    )
    .await;
    let status = expect_status(
        &mut api,
        "shares",
        "photos",
        serde_json::to_value(&share).unwrap(),
    )
    .await;
    expect_event(&mut api, "Published", "Normal").await;
    let action = task.await.unwrap().unwrap();
    assert_eq!(action, Action::requeue(shares::READY_REQUEUE));
    api.done().await;

    assert_eq!(fake.calls(), ["PUT share photos"]);
    let d = fake.declared.lock().unwrap()[0].clone();
    let p = d.publish.unwrap();
    assert_eq!(
        (p.path.as_str(), p.rescan_secs, p.trust_depth),
        ("photos", 15, Some(2))
    );
    assert_eq!(status["phase"], "Ready");
    assert_eq!(status["agent"], "alice", "the holder stays recorded");
    assert_eq!(status["version"], 1);
    assert_eq!(status["tickets"][0]["agentId"], id(4));
    assert_eq!(status["keylessTicket"], "caravan-ticket-v1:y");
    assert_eq!(condition(&status, "Ready")["reason"], "Published");

    // Steady state: same answer, no status patch, no Event.
    let mut again = share.clone();
    again.status = Some(serde_json::from_value(status).unwrap());
    fake.shares
        .lock()
        .unwrap()
        .push_back(Ok(published_report()));
    let (ctx, mut api) = context(fake.clone());
    let task = tokio::spawn(run_share(again, ctx));
    expect_ready_agent(&mut api, "alice", &id(1)).await;
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(fake.calls().len(), 2, "one idempotent PUT per reconcile");
}

#[tokio::test]
async fn a_share_naming_a_missing_agent_is_degraded_without_agent_calls() {
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let share = publish_share();
    let task = tokio::spawn(run_share(share.clone(), ctx));
    let a = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents/alice"),
        )
        .await;
    not_found(a.send);
    let status = expect_status(
        &mut api,
        "shares",
        "photos",
        serde_json::to_value(&share).unwrap(),
    )
    .await;
    expect_event(&mut api, "AgentNotFound", "Warning").await;
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(condition(&status, "Degraded")["reason"], "AgentNotFound");
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn a_ticket_for_another_agent_is_refused_before_any_agent_call() {
    let publisher = SecretKey::from_seed([1; 32]);
    let dave = SecretKey::from_seed([4; 32]).agent_id();
    let key = caravan_agent::crypto::Key::random().unwrap();
    let ticket = Ticket::issue(&publisher, ShareId([5; 32]), dave, &key, vec![], vec![]).unwrap();
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let share = subscribe_share(ticket);
    let task = tokio::spawn(run_share(share.clone(), ctx));
    let a = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents/bob"),
        )
        .await;
    respond(a.send, 200, &agent_json("bob", &id(2), true));
    let status = expect_status(
        &mut api,
        "shares",
        "from-alice",
        serde_json::to_value(&share).unwrap(),
    )
    .await;
    expect_event(&mut api, "NotARecipient", "Warning").await;
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(condition(&status, "Degraded")["reason"], "NotARecipient");
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn garbage_and_escaping_paths_are_refused_without_api_calls_beyond_status() {
    for (mutate, reason) in [
        (
            Box::new(|s: &mut Share| s.spec.subscribe.as_mut().unwrap().destination = "../x".into())
                as Box<dyn Fn(&mut Share)>,
            "InvalidPath",
        ),
        (
            Box::new(|s: &mut Share| {
                s.spec.publish = Some(PublishSpec {
                    path: "a".into(),
                    recipients: RecipientsSpec::default(),
                    offline_seeding: false,
                    rescan_interval: "5m".into(),
                })
            }),
            "InvalidSpec",
        ),
    ] {
        let fake = Arc::new(FakeAgent::default());
        let (ctx, mut api) = context(fake.clone());
        let mut share = subscribe_share("caravan-ticket-v1:AAAA".into());
        mutate(&mut share);
        let task = tokio::spawn(run_share(share.clone(), ctx));
        let status = expect_status(
            &mut api,
            "shares",
            "from-alice",
            serde_json::to_value(&share).unwrap(),
        )
        .await;
        expect_event(&mut api, reason, "Warning").await;
        task.await.unwrap().unwrap();
        api.done().await;
        assert_eq!(condition(&status, "Degraded")["reason"], reason);
    }
    // A truncated ticket needs the Agent (its id) and stops there.
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let share = subscribe_share("caravan-ticket-v1:AAAA".into());
    let task = tokio::spawn(run_share(share.clone(), ctx));
    let a = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents/bob"),
        )
        .await;
    respond(a.send, 200, &agent_json("bob", &id(2), true));
    let status = expect_status(
        &mut api,
        "shares",
        "from-alice",
        serde_json::to_value(&share).unwrap(),
    )
    .await;
    expect_event(&mut api, "TicketInvalid", "Warning").await;
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(condition(&status, "Degraded")["reason"], "TicketInvalid");
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn an_agent_that_is_not_ready_leaves_the_share_pending() {
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let share = publish_share();
    let task = tokio::spawn(run_share(share.clone(), ctx));
    let a = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents/alice"),
        )
        .await;
    respond(a.send, 200, &agent_json("alice", &id(1), false));
    let status = expect_status(
        &mut api,
        "shares",
        "photos",
        serde_json::to_value(&share).unwrap(),
    )
    .await;
    expect_event(&mut api, "WaitingForAgent", "Normal").await;
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(shares::WAIT_REQUEUE)
    );
    api.done().await;
    assert_eq!(status["phase"], "Pending");
}

#[tokio::test]
async fn agent_failures_become_conditions_with_the_agent_reason() {
    let fake = Arc::new(FakeAgent::default());
    let mut r = published_report();
    r.state = DeclaredState::Failed;
    r.reason = Some("TrustRevoked".into());
    r.message = Some("the publisher refused the key".into());
    fake.shares.lock().unwrap().push_back(Ok(r));
    fake.shares
        .lock()
        .unwrap()
        .push_back(Err(CallError::Unreachable("connection refused".into())));
    let (ctx, mut api) = context(fake.clone());
    let mut share = publish_share();
    share.status = Some(caravan_operator::crd::ShareStatus {
        agent: Some("alice".into()),
        ..Default::default()
    });
    let task = tokio::spawn(run_share(share.clone(), ctx.clone()));
    expect_ready_agent(&mut api, "alice", &id(1)).await;
    let status = expect_status(
        &mut api,
        "shares",
        "photos",
        serde_json::to_value(&share).unwrap(),
    )
    .await;
    expect_event(&mut api, "TrustRevoked", "Warning").await;
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(condition(&status, "Degraded")["reason"], "TrustRevoked");

    let (ctx, mut api) = context(fake.clone());
    let task = tokio::spawn(run_share(share.clone(), ctx));
    expect_ready_agent(&mut api, "alice", &id(1)).await;
    let status = expect_status(
        &mut api,
        "shares",
        "photos",
        serde_json::to_value(&share).unwrap(),
    )
    .await;
    expect_event(&mut api, "AgentUnreachable", "Normal").await;
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(shares::WAIT_REQUEUE)
    );
    api.done().await;
    assert_eq!(
        condition(&status, "Progressing")["reason"],
        "AgentUnreachable"
    );
}

#[tokio::test]
async fn deleting_a_share_stops_it_on_the_agent_then_drops_the_finalizer() {
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let mut share = publish_share();
    share.metadata.deletion_timestamp = Some(Time(fixed_now()));
    let task = tokio::spawn(run_share(share.clone(), ctx));
    expect_ready_agent(&mut api, "alice", &id(1)).await;
    expect_event(&mut api, "Stopped", "Normal").await;
    let p = api
        .expect(
            "PATCH",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/shares/photos"),
        )
        .await;
    assert!(
        p.body.to_string().contains("remove") || p.body.to_string().contains("replace"),
        "{}",
        p.body
    );
    let mut whole = serde_json::to_value(&share).unwrap();
    whole["metadata"]["finalizers"] = json!([]);
    respond(p.send, 200, &whole);
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(fake.calls(), ["DELETE share photos"]);
}

#[tokio::test]
async fn deleting_a_share_of_a_gone_agent_releases_it() {
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let mut share = publish_share();
    share.metadata.deletion_timestamp = Some(Time(fixed_now()));
    let task = tokio::spawn(run_share(share.clone(), ctx));
    let a = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents/alice"),
        )
        .await;
    not_found(a.send);
    let p = api
        .expect(
            "PATCH",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/shares/photos"),
        )
        .await;
    let whole = serde_json::to_value(&share).unwrap();
    respond(p.send, 200, &whole);
    task.await.unwrap().unwrap();
    api.done().await;
    assert!(fake.calls().is_empty());
}

fn grant(subject: String) -> TrustGrant {
    let g = TrustGrant::new(
        "trust-bob",
        TrustGrantSpec {
            issuer: "alice".into(),
            subject,
            depth: 1,
            scope: "all".into(),
            expires: None,
        },
    );
    with_finalizer(g, grants::FINALIZER)
}

fn grant_report(published: bool) -> DeclaredGrantStatus {
    DeclaredGrantStatus {
        grant_id: "ab12".into(),
        issuer: id(1),
        subject: id(2),
        depth: 1,
        not_after: 1_900_000_000,
        published,
        published_to: if published {
            vec!["http://repo:7500".into()]
        } else {
            vec![]
        },
    }
}

async fn run_grant(g: TrustGrant, ctx: Arc<Context>) -> Result<Action, Error> {
    grants::reconcile_grant(Arc::new(g), &ctx).await
}

#[tokio::test]
async fn a_grant_is_signed_once_per_uid_and_published() {
    let fake = Arc::new(FakeAgent::default());
    fake.grants
        .lock()
        .unwrap()
        .push_back(Ok(grant_report(true)));
    let (ctx, mut api) = context(fake.clone());
    let g = grant(id(2));
    let task = tokio::spawn(run_grant(g.clone(), ctx));
    expect_ready_agent(&mut api, "alice", &id(1)).await;
    expect_holder(
        &mut api,
        &fake,
        "trustgrants",
        "trust-bob",
        "issuer",
        "alice",
        serde_json::to_value(&g).unwrap(),
    )
    .await;
    let status = expect_status(
        &mut api,
        "trustgrants",
        "trust-bob",
        serde_json::to_value(&g).unwrap(),
    )
    .await;
    expect_event(&mut api, "Published", "Normal").await;
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(fake.calls(), ["PUT grant uid-obj"], "keyed by the uid");
    assert_eq!(status["grantId"], "ab12");
    assert_eq!(status["published"], true);
    assert_eq!(status["issuerId"], id(1));
    assert_eq!(status["issuer"], "alice", "the holder stays recorded");
}

#[tokio::test]
async fn bad_grants_are_reported_without_agent_calls() {
    // Malformed subject: refused before any API read.
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let g = grant("cv1-not-an-id".into());
    let task = tokio::spawn(run_grant(g.clone(), ctx));
    let status = expect_status(
        &mut api,
        "trustgrants",
        "trust-bob",
        serde_json::to_value(&g).unwrap(),
    )
    .await;
    expect_event(&mut api, "InvalidSubject", "Warning").await;
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(condition(&status, "Degraded")["reason"], "InvalidSubject");

    // Depth out of range.
    let (ctx, mut api) = context(fake.clone());
    let mut g = grant(id(2));
    g.spec.depth = 12;
    let task = tokio::spawn(run_grant(g.clone(), ctx));
    let status = expect_status(
        &mut api,
        "trustgrants",
        "trust-bob",
        serde_json::to_value(&g).unwrap(),
    )
    .await;
    expect_event(&mut api, "DepthOutOfRange", "Warning").await;
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(condition(&status, "Degraded")["reason"], "DepthOutOfRange");

    // Issuer not Ready: waiting, not degraded.
    let (ctx, mut api) = context(fake.clone());
    let g = grant(id(2));
    let task = tokio::spawn(run_grant(g.clone(), ctx));
    let a = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents/alice"),
        )
        .await;
    respond(a.send, 200, &agent_json("alice", &id(1), false));
    let status = expect_status(
        &mut api,
        "trustgrants",
        "trust-bob",
        serde_json::to_value(&g).unwrap(),
    )
    .await;
    expect_event(&mut api, "IssuerNotReady", "Normal").await;
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(
        condition(&status, "Progressing")["reason"],
        "IssuerNotReady"
    );
    assert_eq!(condition(&status, "Degraded")["status"], "False");

    // A grant to the issuer itself.
    let (ctx, mut api) = context(fake.clone());
    let g = grant(id(1));
    let task = tokio::spawn(run_grant(g.clone(), ctx));
    let a = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents/alice"),
        )
        .await;
    respond(a.send, 200, &agent_json("alice", &id(1), true));
    let status = expect_status(
        &mut api,
        "trustgrants",
        "trust-bob",
        serde_json::to_value(&g).unwrap(),
    )
    .await;
    expect_event(&mut api, "InvalidSubject", "Warning").await;
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(condition(&status, "Degraded")["reason"], "InvalidSubject");
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn deleting_a_grant_waits_for_a_published_revocation() {
    let fake = Arc::new(FakeAgent::default());
    fake.revocations
        .lock()
        .unwrap()
        .push_back(Ok(RevocationStatus {
            revoked: vec!["ab12".into()],
            published: false,
        }));
    fake.revocations
        .lock()
        .unwrap()
        .push_back(Ok(RevocationStatus {
            revoked: vec!["ab12".into()],
            published: true,
        }));
    let mut g = grant(id(2));
    g.metadata.deletion_timestamp = Some(Time(fixed_now()));

    // Not yet in any repository: the finalizer stays, the error retries.
    let (ctx, mut api) = context(fake.clone());
    let task = tokio::spawn(run_grant(g.clone(), ctx));
    expect_ready_agent(&mut api, "alice", &id(1)).await;
    let err = task.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::CleanupPending(_)), "{err}");
    api.done().await;

    // Published: Event, then the finalizer goes.
    let (ctx, mut api) = context(fake.clone());
    let task = tokio::spawn(run_grant(g.clone(), ctx));
    expect_ready_agent(&mut api, "alice", &id(1)).await;
    expect_event(&mut api, "Revoked", "Normal").await;
    let p = api
        .expect(
            "PATCH",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/trustgrants/trust-bob"),
        )
        .await;
    respond(p.send, 200, &serde_json::to_value(&g).unwrap());
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(
        fake.calls(),
        ["DELETE grant uid-obj", "DELETE grant uid-obj"]
    );
}

#[tokio::test]
async fn deleting_a_grant_whose_issuer_is_gone_warns_and_releases() {
    let fake = Arc::new(FakeAgent::default());
    let mut g = grant(id(2));
    g.metadata.deletion_timestamp = Some(Time(fixed_now()));
    g.status = Some(caravan_operator::crd::TrustGrantStatus {
        grant_id: Some("ab12".into()),
        ..Default::default()
    });
    let (ctx, mut api) = context(fake.clone());
    let task = tokio::spawn(run_grant(g.clone(), ctx));
    let a = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents/alice"),
        )
        .await;
    not_found(a.send);
    expect_event(&mut api, "IssuerGone", "Warning").await;
    let p = api
        .expect(
            "PATCH",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/trustgrants/trust-bob"),
        )
        .await;
    respond(p.send, 200, &serde_json::to_value(&g).unwrap());
    task.await.unwrap().unwrap();
    api.done().await;
    assert!(fake.calls().is_empty());
}

fn sleeping_agent_json(name: &str, agent_id: &str) -> Value {
    let mut a = agent_json(name, agent_id, true);
    a["status"]["phase"] = json!("Sleeping");
    a
}

#[tokio::test]
async fn a_settled_share_of_a_sleeping_agent_keeps_its_status() {
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let mut share = publish_share();
    share.status = Some(caravan_operator::crd::ShareStatus {
        phase: Some(caravan_operator::crd::SharePhase::Ready),
        version: Some(1),
        observed_generation: Some(1),
        ..Default::default()
    });
    let task = tokio::spawn(run_share(share, ctx));
    let a = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents/alice"),
        )
        .await;
    respond(a.send, 200, &sleeping_agent_json("alice", &id(1)));
    // No identity, no pods, no agent call, no status patch: it stays Ready.
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(shares::READY_REQUEUE)
    );
    api.done().await;
    assert!(fake.calls().is_empty());
}

#[tokio::test]
async fn a_subscription_whose_publisher_sleeps_stays_ready() {
    for (publisher_ns, named) in [
        (NS, "the publisher, Agent alice, is scaled to zero"),
        (
            "tenant-z",
            "the publisher, an Agent of another tenant of this cluster, is scaled to zero",
        ),
    ] {
        publisher_asleep_case(publisher_ns, named).await;
    }
}

async fn publisher_asleep_case(publisher_ns: &str, named: &str) {
    let publisher = SecretKey::from_seed([1; 32]);
    let bob = SecretKey::from_seed([2; 32]).agent_id();
    let key = caravan_agent::crypto::Key::random().unwrap();
    let ticket = Ticket::issue(&publisher, ShareId([5; 32]), bob, &key, vec![], vec![]).unwrap();
    let fake = Arc::new(FakeAgent::default());
    let mut r = published_report();
    r.name = "from-alice".into();
    r.state = DeclaredState::Failed;
    r.reason = Some("PublisherUnreachable".into());
    r.message = Some("no peer reachable for share x (Connection refused)".into());
    r.tickets = vec![];
    r.keyless_ticket = None;
    fake.shares.lock().unwrap().push_back(Ok(r));
    let (ctx, mut api) = context(fake.clone());
    let share = subscribe_share(ticket);
    let task = tokio::spawn(run_share(share.clone(), ctx));
    expect_ready_agent(&mut api, "bob", &bob.to_string()).await;
    expect_holder(
        &mut api,
        &fake,
        "shares",
        "from-alice",
        "agent",
        "bob",
        serde_json::to_value(&share).unwrap(),
    )
    .await;
    let mut alice = sleeping_agent_json("alice", &id(1));
    alice["metadata"]["namespace"] = json!(publisher_ns);
    // The publisher is looked up among the cluster's Agents: asleep.
    let list = api.expect("GET", "/apis/caravan.dev/v1alpha1/agents").await;
    respond(
        list.send,
        200,
        &json!({"apiVersion":"caravan.dev/v1alpha1","kind":"AgentList","metadata":{},
        "items":[agent_json("bob", &bob.to_string(), true),
                 alice]}),
    );
    let status = expect_status(
        &mut api,
        "shares",
        "from-alice",
        serde_json::to_value(&share).unwrap(),
    )
    .await;
    expect_event(&mut api, "PublisherAsleep", "Normal").await;
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(shares::READY_REQUEUE)
    );
    api.done().await;
    assert_eq!(status["phase"], "Ready");
    let ready = condition(&status, "Ready");
    assert_eq!(ready["reason"], "PublisherAsleep");
    assert!(
        ready["message"].as_str().unwrap().contains(named),
        "{ready}"
    );
    assert_eq!(condition(&status, "Degraded")["status"], "False");
}

/// A grant whose issuer holds it, with `spec.issuer` edited to another Agent
/// (no CEL below Kubernetes 1.25).
fn grant_moved_to(issuer: &str) -> TrustGrant {
    let mut g = grant(id(2));
    g.spec.issuer = issuer.into();
    g.metadata.generation = Some(2);
    g.status = Some(caravan_operator::crd::TrustGrantStatus {
        issuer: Some("alice".into()),
        grant_id: Some("ab12".into()),
        issuer_id: Some(id(1)),
        published: true,
        observed_generation: Some(1),
        ..Default::default()
    });
    g
}

#[tokio::test]
async fn an_issuer_change_is_refused_and_delete_revokes_on_the_original_issuer() {
    // The edit: refused before any read, the original grant stays managed.
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let g = grant_moved_to("bob");
    let task = tokio::spawn(run_grant(g.clone(), ctx));
    let status = expect_status(
        &mut api,
        "trustgrants",
        "trust-bob",
        serde_json::to_value(&g).unwrap(),
    )
    .await;
    expect_event(&mut api, "InvalidSpec", "Warning").await;
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(grants::BAD_INPUT_REQUEUE)
    );
    api.done().await;
    assert!(fake.calls().is_empty(), "bob is never asked to sign");
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["reason"], "InvalidSpec");
    let msg = degraded["message"].as_str().unwrap();
    assert!(
        msg.contains("spec.issuer cannot change") && msg.contains("alice"),
        "{msg}"
    );
    assert_eq!(status["issuer"], "alice");
    assert_eq!(
        status["grantId"], "ab12",
        "alice's grant is still described"
    );

    // Delete: alice (the holder), not bob, signs and publishes the revocation.
    fake.revocations
        .lock()
        .unwrap()
        .push_back(Ok(RevocationStatus {
            revoked: vec!["ab12".into()],
            published: true,
        }));
    let mut g = grant_moved_to("bob");
    g.metadata.deletion_timestamp = Some(Time(fixed_now()));
    let (ctx, mut api) = context(fake.clone());
    let task = tokio::spawn(run_grant(g.clone(), ctx));
    expect_ready_agent(&mut api, "alice", &id(1)).await;
    expect_event(&mut api, "Revoked", "Normal").await;
    let p = api
        .expect(
            "PATCH",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/trustgrants/trust-bob"),
        )
        .await;
    respond(p.send, 200, &serde_json::to_value(&g).unwrap());
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(fake.calls(), ["DELETE grant uid-obj"]);
}

fn share_moved_to(agent: &str) -> Share {
    let mut s = publish_share();
    s.spec.agent = agent.into();
    s.metadata.generation = Some(2);
    s.status = Some(caravan_operator::crd::ShareStatus {
        agent: Some("alice".into()),
        share_id: Some(ShareId([5; 32]).to_string()),
        version: Some(3),
        bytes_total: Some(100),
        phase: Some(caravan_operator::crd::SharePhase::Ready),
        observed_generation: Some(1),
        ..Default::default()
    });
    s
}

#[tokio::test]
async fn an_agent_change_is_refused_and_delete_stops_the_share_on_the_holder() {
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let s = share_moved_to("alice2");
    let task = tokio::spawn(run_share(s.clone(), ctx));
    let status = expect_status(
        &mut api,
        "shares",
        "photos",
        serde_json::to_value(&s).unwrap(),
    )
    .await;
    expect_event(&mut api, "InvalidSpec", "Warning").await;
    assert_eq!(
        task.await.unwrap().unwrap(),
        Action::requeue(shares::BAD_INPUT_REQUEUE)
    );
    api.done().await;
    assert!(fake.calls().is_empty(), "alice2 is never asked to publish");
    let degraded = condition(&status, "Degraded");
    assert_eq!(degraded["reason"], "InvalidSpec");
    let msg = degraded["message"].as_str().unwrap();
    assert!(
        msg.contains("spec.agent cannot change") && msg.contains("alice"),
        "{msg}"
    );
    // The status still describes alice's share, and only it.
    assert_eq!(status["agent"], "alice");
    assert_eq!(status["version"], 3);

    let mut s = share_moved_to("alice2");
    s.metadata.deletion_timestamp = Some(Time(fixed_now()));
    let (ctx, mut api) = context(fake.clone());
    let task = tokio::spawn(run_share(s.clone(), ctx));
    expect_ready_agent(&mut api, "alice", &id(1)).await;
    expect_event(&mut api, "Stopped", "Normal").await;
    let p = api
        .expect(
            "PATCH",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/shares/photos"),
        )
        .await;
    respond(p.send, 200, &serde_json::to_value(&s).unwrap());
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(
        fake.calls(),
        ["DELETE share photos"],
        "on alice, the holder"
    );
}

#[tokio::test]
async fn names_that_are_not_object_names_never_reach_an_api_path() {
    for bad in ["x/y", "bob?x=1", "..", "a/../b"] {
        // Share: InvalidSpec without a single read.
        let fake = Arc::new(FakeAgent::default());
        let (ctx, mut api) = context(fake.clone());
        let mut s = publish_share();
        s.spec.agent = bad.into();
        let task = tokio::spawn(run_share(s.clone(), ctx));
        let status = expect_status(
            &mut api,
            "shares",
            "photos",
            serde_json::to_value(&s).unwrap(),
        )
        .await;
        expect_event(&mut api, "InvalidSpec", "Warning").await;
        task.await.unwrap().unwrap();
        api.done().await;
        assert_eq!(condition(&status, "Degraded")["reason"], "InvalidSpec");
        assert!(status.get("agent").is_none(), "never recorded: {status}");

        // Its delete releases the finalizer at once: nothing was declared.
        s.metadata.deletion_timestamp = Some(Time(fixed_now()));
        let (ctx, mut api) = context(fake.clone());
        let task = tokio::spawn(run_share(s.clone(), ctx));
        let p = api
            .expect(
                "PATCH",
                &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/shares/photos"),
            )
            .await;
        respond(p.send, 200, &serde_json::to_value(&s).unwrap());
        task.await.unwrap().unwrap();
        api.done().await;

        // TrustGrant: the same.
        let mut g = grant(id(2));
        g.spec.issuer = bad.into();
        let (ctx, mut api) = context(fake.clone());
        let task = tokio::spawn(run_grant(g.clone(), ctx));
        let status = expect_status(
            &mut api,
            "trustgrants",
            "trust-bob",
            serde_json::to_value(&g).unwrap(),
        )
        .await;
        expect_event(&mut api, "InvalidSpec", "Warning").await;
        task.await.unwrap().unwrap();
        api.done().await;
        assert_eq!(condition(&status, "Degraded")["reason"], "InvalidSpec");
        g.metadata.deletion_timestamp = Some(Time(fixed_now()));
        let (ctx, mut api) = context(fake.clone());
        let task = tokio::spawn(run_grant(g.clone(), ctx));
        let p = api
            .expect(
                "PATCH",
                &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/trustgrants/trust-bob"),
            )
            .await;
        respond(p.send, 200, &serde_json::to_value(&g).unwrap());
        task.await.unwrap().unwrap();
        api.done().await;
        assert!(fake.calls().is_empty(), "{bad}");
    }
    // A ticket Secret name is an API path too.
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let mut s = subscribe_share("unused".into());
    let sub = s.spec.subscribe.as_mut().unwrap();
    sub.ticket = None;
    sub.ticket_secret_ref = Some(caravan_operator::crd::share::SecretKeyRef {
        name: "../../other-ns/secrets/x".into(),
        key: "ticket".into(),
    });
    let task = tokio::spawn(run_share(s.clone(), ctx));
    let status = expect_status(
        &mut api,
        "shares",
        "from-alice",
        serde_json::to_value(&s).unwrap(),
    )
    .await;
    expect_event(&mut api, "InvalidSpec", "Warning").await;
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(condition(&status, "Degraded")["reason"], "InvalidSpec");
}

#[tokio::test]
async fn an_unreachable_agent_is_asked_less_and_less_often() {
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let mut share = publish_share();
    share.status = Some(caravan_operator::crd::ShareStatus {
        agent: Some("alice".into()),
        ..Default::default()
    });
    let share = share;
    let mut requeues = Vec::new();
    for answer in [
        Err(CallError::Unreachable("timed out".into())),
        Err(CallError::Unreachable("timed out".into())),
        Err(CallError::Unreachable("timed out".into())),
        Err(CallError::Unreachable("timed out".into())),
        Ok(published_report()),
        Err(CallError::Unreachable("timed out".into())),
    ] {
        fake.shares.lock().unwrap().push_back(answer);
        // The same Context (and its per-object memory) throughout, as in
        // the controller.
        let task = tokio::spawn(run_share(share.clone(), ctx.clone()));
        expect_ready_agent(&mut api, "alice", &id(1)).await;
        expect_status(
            &mut api,
            "shares",
            "photos",
            serde_json::to_value(&share).unwrap(),
        )
        .await;
        // An Event (the recorder patches a repeated one: either is fine).
        let (req, send) = api.0.next_request().await.unwrap();
        assert!(req.uri().path().contains("/events"), "{}", req.uri());
        respond(send, 200, &json!({}));
        requeues.push(task.await.unwrap().unwrap());
    }
    api.done().await;
    let secs = |n: u64| Action::requeue(Duration::from_secs(n));
    assert_eq!(
        requeues,
        [
            secs(5),
            secs(10),
            secs(20),
            secs(40),
            Action::requeue(shares::READY_REQUEUE),
            secs(5)
        ]
    );
}

#[tokio::test]
async fn a_grant_signed_before_holders_were_recorded_is_revoked_by_its_signer() {
    // Signed by alice (id 1) under an older operator (no status.issuer);
    // spec.issuer was edited to bob (id 3) meanwhile.
    let legacy = || {
        let mut g = grant(id(2));
        g.spec.issuer = "bob".into();
        g.status = Some(caravan_operator::crd::TrustGrantStatus {
            grant_id: Some("ab12".into()),
            issuer_id: Some(id(1)),
            published: true,
            observed_generation: Some(1),
            ..Default::default()
        });
        g
    };
    // Apply: bob is not the signer; refused, bob never asked, not recorded.
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let g = legacy();
    let task = tokio::spawn(run_grant(g.clone(), ctx));
    let a = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents/bob"),
        )
        .await;
    respond(a.send, 200, &agent_json("bob", &id(3), true));
    let status = expect_status(
        &mut api,
        "trustgrants",
        "trust-bob",
        serde_json::to_value(&g).unwrap(),
    )
    .await;
    expect_event(&mut api, "InvalidSpec", "Warning").await;
    task.await.unwrap().unwrap();
    api.done().await;
    assert!(fake.calls().is_empty());
    assert!(status.get("issuer").is_none(), "{status}");
    let msg = condition(&status, "Degraded")["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("is not the Agent that signed"), "{msg}");

    // Delete: the signer is found by its id and revokes.
    fake.revocations
        .lock()
        .unwrap()
        .push_back(Ok(RevocationStatus {
            revoked: vec!["ab12".into()],
            published: true,
        }));
    let mut g = legacy();
    g.metadata.deletion_timestamp = Some(Time(fixed_now()));
    let (ctx, mut api) = context(fake.clone());
    let task = tokio::spawn(run_grant(g.clone(), ctx));
    let a = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents/bob"),
        )
        .await;
    respond(a.send, 200, &agent_json("bob", &id(3), true));
    let list = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents"),
        )
        .await;
    respond(
        list.send,
        200,
        &json!({"apiVersion":"caravan.dev/v1alpha1","kind":"AgentList","metadata":{},
                "items":[agent_json("alice", &id(1), true), agent_json("bob", &id(3), true)]}),
    );
    expect_endpoint(&mut api, "alice").await;
    expect_event(&mut api, "Revoked", "Normal").await;
    let p = api
        .expect(
            "PATCH",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/trustgrants/trust-bob"),
        )
        .await;
    respond(p.send, 200, &serde_json::to_value(&g).unwrap());
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(fake.calls(), ["DELETE grant uid-obj"]);
}

#[tokio::test]
async fn a_share_published_before_holders_were_recorded_is_stopped_by_its_publisher() {
    // Published by alice (id 1) under an older operator (no status.agent);
    // spec.agent was edited to dave (id 3) meanwhile.
    let legacy = || {
        let mut s = publish_share();
        s.spec.agent = "dave".into();
        s.status = Some(caravan_operator::crd::ShareStatus {
            publisher: Some(id(1)),
            share_id: Some(ShareId([5; 32]).to_string()),
            version: Some(2),
            phase: Some(caravan_operator::crd::SharePhase::Ready),
            observed_generation: Some(1),
            ..Default::default()
        });
        s
    };
    let fake = Arc::new(FakeAgent::default());
    let (ctx, mut api) = context(fake.clone());
    let s = legacy();
    let task = tokio::spawn(run_share(s.clone(), ctx));
    let a = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents/dave"),
        )
        .await;
    respond(a.send, 200, &agent_json("dave", &id(3), true));
    let status = expect_status(
        &mut api,
        "shares",
        "photos",
        serde_json::to_value(&s).unwrap(),
    )
    .await;
    expect_event(&mut api, "InvalidSpec", "Warning").await;
    task.await.unwrap().unwrap();
    api.done().await;
    assert!(fake.calls().is_empty(), "dave is never asked to publish");
    assert!(status.get("agent").is_none(), "{status}");

    let mut s = legacy();
    s.metadata.deletion_timestamp = Some(Time(fixed_now()));
    let (ctx, mut api) = context(fake.clone());
    let task = tokio::spawn(run_share(s.clone(), ctx));
    let a = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents/dave"),
        )
        .await;
    respond(a.send, 200, &agent_json("dave", &id(3), true));
    let list = api
        .expect(
            "GET",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/agents"),
        )
        .await;
    respond(
        list.send,
        200,
        &json!({"apiVersion":"caravan.dev/v1alpha1","kind":"AgentList","metadata":{},
                "items":[agent_json("alice", &id(1), true), agent_json("dave", &id(3), true)]}),
    );
    expect_endpoint(&mut api, "alice").await;
    expect_event(&mut api, "Stopped", "Normal").await;
    let p = api
        .expect(
            "PATCH",
            &format!("/apis/caravan.dev/v1alpha1/namespaces/{NS}/shares/photos"),
        )
        .await;
    respond(p.send, 200, &serde_json::to_value(&s).unwrap());
    task.await.unwrap().unwrap();
    api.done().await;
    assert_eq!(
        fake.calls(),
        ["DELETE share photos"],
        "on alice, the publisher"
    );
}

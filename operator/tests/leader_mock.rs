//! Leader election rounds against a mocked API server: who writes what.

use std::time::Duration;

use caravan_operator::leader::{Elector, Timing};
use http::{Request, Response};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::client::Body;
use kube::{Api, Client};
use serde_json::{Value, json};

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/caravan-system/leases/caravan-operator";

fn elector() -> (Elector, Handle) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let api: Api<Lease> = Api::namespaced(Client::new(svc, "default"), "caravan-system");
    (
        Elector::new(api, "caravan-operator", "me", Timing::default()),
        handle,
    )
}

async fn next(h: &mut Handle, method: &str, path: &str, code: u16, reply: Value) -> Value {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), h.next_request())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((req.method().as_str(), req.uri().path()), (method, path));
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    let reply = if reply.is_null() { body.clone() } else { reply };
    send.send_response(
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    body
}

fn lease(holder: &str, renewed_ago: i64, transitions: i32) -> Value {
    let t = Timestamp::now() - SignedDuration::from_secs(renewed_ago);
    json!({"apiVersion":"coordination.k8s.io/v1","kind":"Lease",
           "metadata":{"name":"caravan-operator","namespace":"caravan-system","resourceVersion":"7"},
           "spec":{"holderIdentity":holder,"leaseDurationSeconds":15,"renewTime":t.to_string(),
                   "acquireTime":t.to_string(),"leaseTransitions":transitions}})
}

fn not_found() -> Value {
    json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404})
}

#[tokio::test]
async fn creates_a_missing_lease() {
    let (e, mut h) = elector();
    let round = tokio::spawn(async move { e.try_acquire_or_renew().await.unwrap() });
    next(&mut h, "GET", PATH, 404, not_found()).await;
    let created = next(
        &mut h,
        "POST",
        "/apis/coordination.k8s.io/v1/namespaces/caravan-system/leases",
        201,
        Value::Null,
    )
    .await;
    assert_eq!(created["spec"]["holderIdentity"], "me");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    assert!(round.await.unwrap());
}

#[tokio::test]
async fn waits_while_another_holder_is_fresh() {
    let (e, mut h) = elector();
    let round = tokio::spawn(async move { e.try_acquire_or_renew().await.unwrap() });
    next(&mut h, "GET", PATH, 200, lease("other", 3, 0)).await;
    assert!(
        !round.await.unwrap(),
        "must not write a Lease someone else holds"
    );
}

#[tokio::test]
async fn takes_over_an_expired_lease_with_its_resource_version() {
    let (e, mut h) = elector();
    let round = tokio::spawn(async move { e.try_acquire_or_renew().await.unwrap() });
    next(&mut h, "GET", PATH, 200, lease("other", 60, 4)).await;
    let put = next(&mut h, "PUT", PATH, 200, Value::Null).await;
    assert_eq!(
        put["metadata"]["resourceVersion"], "7",
        "optimistic concurrency"
    );
    assert_eq!(put["spec"]["holderIdentity"], "me");
    assert_eq!(put["spec"]["leaseTransitions"], 5);
    assert!(round.await.unwrap());
}

#[tokio::test]
async fn a_lost_race_is_not_leadership() {
    let (e, mut h) = elector();
    let round = tokio::spawn(async move { e.try_acquire_or_renew().await.unwrap() });
    next(&mut h, "GET", PATH, 200, lease("other", 60, 4)).await;
    next(&mut h, "PUT", PATH, 409, json!({"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Conflict","code":409})).await;
    assert!(!round.await.unwrap());
}

#[tokio::test]
async fn release_clears_the_holder() {
    let (e, mut h) = elector();
    let round = tokio::spawn(async move { e.release().await });
    next(&mut h, "GET", PATH, 200, lease("me", 1, 2)).await;
    let put = next(&mut h, "PUT", PATH, 200, Value::Null).await;
    assert!(
        put["spec"].get("holderIdentity").is_none_or(Value::is_null),
        "{put}"
    );
    assert_eq!(put["spec"]["leaseDurationSeconds"], 1);
    round.await.unwrap();
}

//! /livez, /readyz and /metrics answer as the kubelet and Prometheus expect.

use axum::body::Body;
use caravan_operator::http::{Health, router};
use caravan_operator::metrics::Metrics;
use http::{Request, StatusCode};
use tower::ServiceExt;

async fn get(health: &Health, metrics: &Metrics, path: &str) -> (StatusCode, String) {
    let resp = router(metrics.clone(), health.clone())
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn health_and_metrics() {
    let metrics = Metrics::new().unwrap();
    let health = Health::default();
    assert_eq!(get(&health, &metrics, "/livez").await.0, StatusCode::OK);
    assert_eq!(
        get(&health, &metrics, "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    health.set_ready(true);
    assert_eq!(get(&health, &metrics, "/readyz").await.0, StatusCode::OK);
    metrics.reconciles.with_label_values(&["agent", "ok"]).inc();
    metrics.duration.with_label_values(&["agent"]).observe(0.01);
    let (code, text) = get(&health, &metrics, "/metrics").await;
    assert_eq!(code, StatusCode::OK);
    assert!(
        text.contains(r#"caravan_operator_reconciles_total{controller="agent",result="ok"} 1"#),
        "{text}"
    );
    assert!(
        text.contains("caravan_operator_reconcile_duration_seconds_bucket"),
        "{text}"
    );
}

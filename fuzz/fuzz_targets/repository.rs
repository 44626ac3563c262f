//! The repository's HTTP request handlers, through its real router on a
//! memory store: the first byte picks a route, the rest is the path
//! parameter, query or body. Must never panic, whatever the request.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::Request;
use caravan_agent::repository::{Repository, RepositoryConfig};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct Env {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let router = rt.block_on(async {
            opendal::install_default();
            let op = opendal::Operator::via_iter("memory", Vec::<(String, String)>::new())
                .expect("memory");
            let cfg = RepositoryConfig {
                rate_per_second: 1e9,
                rate_burst: u32::MAX,
                ..RepositoryConfig::default()
            };
            Repository::open(op, cfg).await.expect("repository").router()
        });
        Env { rt, router }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let text: String = String::from_utf8_lossy(rest)
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(200)
        .collect();
    let (method, uri, body) = match sel % 8 {
        0 => ("POST", "/v1/records".to_string(), rest.to_vec()),
        1 => ("GET", format!("/v1/announcements/{text}"), vec![]),
        2 => ("GET", format!("/v1/locators/{text}"), vec![]),
        3 => ("GET", format!("/v1/grants/by-issuer/{text}"), vec![]),
        4 => ("GET", format!("/v1/grants/by-subject/{text}"), vec![]),
        5 => ("GET", format!("/v1/revocations/by-issuer/{text}"), vec![]),
        6 => ("GET", format!("/v1/revocations?{text}"), vec![]),
        _ => ("POST", format!("/v1/{text}"), rest.to_vec()),
    };
    let Ok(mut req) = Request::builder().method(method).uri(uri).body(Body::from(body)) else {
        return;
    };
    req.extensions_mut()
        .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 9))));
    let e = env();
    let Ok(r) = e.rt.block_on(e.router.clone().oneshot(req));
    assert!(r.status().as_u16() < 500 || r.status().as_u16() == 503);
});

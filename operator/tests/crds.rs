//! CI guard: the committed `crds/*.yaml` (and the chart's copies) must equal
//! what `caravan-operator crdgen` renders from the Rust types.

use std::path::PathBuf;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_crds_match_the_rust_types() {
    let drifted = caravan_operator::crdgen::drifted(&repo().join("crds")).unwrap();
    assert!(
        drifted.is_empty(),
        "CRDs drifted: {drifted:?}; run `cargo run -p caravan-operator -- crdgen --out crds` \
         and `cargo run -p caravan-operator -- crdgen --out charts/caravan/files/crds`"
    );
}

#[test]
fn chart_crds_match_the_rust_types() {
    let dir = repo().join("charts/caravan/files/crds");
    let drifted = caravan_operator::crdgen::drifted(&dir).unwrap();
    assert!(drifted.is_empty(), "chart CRDs drifted: {drifted:?}");
}

#[test]
fn crd_yaml_parses_back() {
    for (name, yaml) in caravan_operator::crdgen::render_all().unwrap() {
        let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition =
            serde_saphyr::from_str(&yaml).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(crd.spec.group, "caravan.dev");
    }
}

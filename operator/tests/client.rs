//! Guards against the rustls CryptoProvider trap: building a kube client
//! with TLS must not panic with two crypto providers in the dependency tree.

use kube::config::{KubeConfigOptions, Kubeconfig};

const KUBECONFIG: &str = r#"
apiVersion: v1
kind: Config
clusters:
- name: c
  cluster:
    server: https://127.0.0.1:1
    insecure-skip-tls-verify: true
users:
- name: u
  user:
    token: t
contexts:
- name: x
  context:
    cluster: c
    user: u
current-context: x
"#;

#[tokio::test]
async fn tls_client_builds_without_panicking() {
    caravan_operator::install_crypto_provider();
    let kubeconfig = Kubeconfig::from_yaml(KUBECONFIG).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap();
    let client = kube::Client::try_from(config).expect("TLS client must build");
    // Nothing listens on port 1: the request fails, but through rustls, not a panic.
    assert!(client.apiserver_version().await.is_err());
}

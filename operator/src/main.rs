//! `caravan-operator`: runs the Agent, Share and TrustGrant controllers
//! (`run`, the default) or writes the CRDs (`crdgen`).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use caravan_operator::agent_api::{CircuitBreaker, HttpAgentApi};
use caravan_operator::config::{
    OperatorConfig, TenantExposure, TenantScheduling, default_agent_resources,
};
use caravan_operator::controller::{self, Context, RunOptions};
use caravan_operator::crd::agent::{LogFormat, SchedulingSpec};
use caravan_operator::http::{self, Health};
use caravan_operator::leader::{Elector, Timing};
use caravan_operator::metrics::Metrics;
use caravan_operator::{declared, grants, shares};
use clap::{Args, Parser, Subcommand};
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client};
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(
    name = "caravan-operator",
    version,
    about = "Kubernetes operator for Caravan agents, shares and trust grants"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller (the default).
    Run(Box<RunArgs>),
    /// Write the CRDs as YAML, one file per CRD.
    Crdgen {
        /// Directory to write into.
        #[arg(long, default_value = "crds")]
        out: PathBuf,
        /// Only check that the files are up to date; exit 1 if not.
        #[arg(long)]
        check: bool,
    },
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Image of the agent containers.
    #[arg(long, env = "CARAVAN_AGENT_IMAGE", default_value = "caravan/agent:dev")]
    agent_image: String,
    /// Pull policy of the agent image: Always, IfNotPresent or Never.
    #[arg(long, env = "CARAVAN_AGENT_IMAGE_PULL_POLICY", default_value = "IfNotPresent",
          value_parser = ["Always", "IfNotPresent", "Never"])]
    agent_image_pull_policy: String,
    /// Default resources of agent containers, as JSON ResourceRequirements.
    #[arg(long, env = "CARAVAN_AGENT_RESOURCES")]
    agent_resources: Option<String>,
    /// Log format of agents whose Agent sets none: text or json.
    #[arg(long, env = "CARAVAN_AGENT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    agent_log_format: String,
    /// Default scheduling of agent pods, as JSON with any of nodeSelector,
    /// tolerations, affinity, topologySpreadConstraints, priorityClassName.
    #[arg(long, env = "CARAVAN_AGENT_SCHEDULING")]
    agent_scheduling: Option<String>,
    /// Priority classes tenants may set in spec.scheduling.priorityClassName
    /// (comma-separated). Empty (the default): none.
    #[arg(long, env = "CARAVAN_TENANT_PRIORITY_CLASSES", value_delimiter = ',')]
    tenant_priority_classes: Vec<String>,
    /// Tolerations tenants may set in spec.scheduling.tolerations, as a JSON
    /// list of Tolerations. Empty (the default): none.
    #[arg(long, env = "CARAVAN_TENANT_TOLERATIONS")]
    tenant_tolerations: Option<String>,
    /// Service types tenants may set in spec.exposure.serviceType
    /// (comma-separated: ClusterIP, NodePort, LoadBalancer).
    #[arg(
        long,
        env = "CARAVAN_TENANT_SERVICE_TYPES",
        value_delimiter = ',',
        default_value = "ClusterIP"
    )]
    tenant_service_types: Vec<String>,
    /// Prefixes a key of spec.exposure.serviceAnnotations must start with
    /// (comma-separated). Empty (the default): tenants set no annotation.
    #[arg(
        long,
        env = "CARAVAN_TENANT_SERVICE_ANNOTATION_PREFIXES",
        value_delimiter = ','
    )]
    tenant_service_annotation_prefixes: Vec<String>,
    /// Secrets used to pull the agent image (comma-separated names; each
    /// must exist in the tenant's namespace).
    #[arg(long, env = "CARAVAN_AGENT_IMAGE_PULL_SECRETS", value_delimiter = ',')]
    agent_image_pull_secrets: Vec<String>,
    /// Labels (k=v, comma-separated) of namespaces whose pods may scrape the
    /// agents' metrics port, e.g. the Prometheus namespace's.
    #[arg(long, env = "CARAVAN_METRICS_NAMESPACE_LABELS", value_delimiter = ',')]
    metrics_namespace_labels: Vec<String>,
    /// Repository URLs given to Agents that list none (comma-separated).
    #[arg(long, env = "CARAVAN_DEFAULT_REPOSITORIES", value_delimiter = ',')]
    default_repositories: Vec<String>,
    /// Namespace the operator runs in (for its Lease and NetworkPolicies).
    #[arg(long, env = "POD_NAMESPACE", default_value = "caravan-system")]
    namespace: String,
    /// Name of this replica (Lease holder, Event reporter).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Watch Agents in this namespace only (default: all namespaces).
    #[arg(long, env = "CARAVAN_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Run leader election on a Lease (turn off only with one replica).
    #[arg(long, env = "CARAVAN_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Name of the leader-election Lease.
    #[arg(long, env = "CARAVAN_LEASE_NAME", default_value = "caravan-operator")]
    lease_name: String,
    /// Agents reconciled at the same time, at most.
    #[arg(long, env = "CARAVAN_CONCURRENCY", default_value_t = 8)]
    concurrency: u16,
    /// Coalesce triggers of one Agent within this many milliseconds.
    #[arg(long, env = "CARAVAN_DEBOUNCE_MS", default_value_t = 500)]
    debounce_ms: u64,
    /// Address of /metrics, /livez and /readyz.
    #[arg(long, env = "CARAVAN_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Log format: text or json.
    #[arg(long, env = "CARAVAN_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Destinations outside the cluster agent pods may reach (CIDRs).
    #[arg(
        long,
        env = "CARAVAN_AGENT_EGRESS_CIDRS",
        value_delimiter = ',',
        default_value = "0.0.0.0/0,::/0"
    )]
    agent_egress_cidrs: Vec<String>,
    /// Ranges agent pods may never reach (private ranges by default).
    #[arg(
        long,
        env = "CARAVAN_AGENT_EGRESS_EXCEPT",
        value_delimiter = ',',
        default_value = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,fc00::/7"
    )]
    agent_egress_except: Vec<String>,
    /// Let agents use the node's cloud identity (instance metadata, assumed
    /// roles). Off by default: tenants must bring their own credentials.
    #[arg(long, env = "CARAVAN_ALLOW_NODE_CREDENTIALS", default_value_t = false, action = clap::ArgAction::Set)]
    allow_node_credentials: bool,
    /// Labels of the operator's pods (k=v,k=v): only they reach agents' admin and metrics ports.
    #[arg(
        long,
        env = "CARAVAN_OPERATOR_POD_LABELS",
        value_delimiter = ',',
        default_value = "app.kubernetes.io/name=caravan-operator"
    )]
    operator_pod_labels: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crdgen { out, check }) => crdgen(&out, check),
        Some(Command::Run(args)) => run(*args),
        None => run(cli.run),
    }
}

fn crdgen(out: &std::path::Path, check: bool) -> anyhow::Result<()> {
    if check {
        let drifted = caravan_operator::crdgen::drifted(out)?;
        if !drifted.is_empty() {
            for p in &drifted {
                eprintln!("out of date: {}", p.display());
            }
            bail!(
                "CRDs drifted from the Rust types; run `caravan-operator crdgen --out {}`",
                out.display()
            );
        }
        println!("CRDs in {} are up to date", out.display());
    } else {
        for p in caravan_operator::crdgen::write(out)? {
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    // Colours only on a terminal: pod logs are read by log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // A line that cannot be written is dropped; reporting it with
        // `eprintln!` would panic the task that logged.
        .log_internal_errors(false)
        .with_ansi(ansi);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_tracing(&args.log_format);
    caravan_operator::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run_async(args))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// A comma-separated flag's values, trimmed, empty ones left out.
fn listed(values: &[String]) -> Vec<String> {
    values
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

async fn run_async(args: RunArgs) -> anyhow::Result<()> {
    let default_resources = match &args.agent_resources {
        Some(json) if !json.trim().is_empty() => serde_json::from_str(json)
            .context("--agent-resources is not ResourceRequirements JSON")?,
        _ => default_agent_resources(),
    };
    let default_scheduling: SchedulingSpec = match &args.agent_scheduling {
        Some(json) if !json.trim().is_empty() => serde_json::from_str(json)
            .context("--agent-scheduling is not JSON with nodeSelector, tolerations, affinity, topologySpreadConstraints, priorityClassName")?,
        _ => SchedulingSpec::default(),
    };
    let tenant_scheduling = TenantScheduling {
        priority_class_names: listed(&args.tenant_priority_classes),
        tolerations: match &args.tenant_tolerations {
            Some(json) if !json.trim().is_empty() => serde_json::from_str(json)
                .context("--tenant-tolerations is not a JSON list of Tolerations")?,
            _ => Vec::new(),
        },
    };
    let tenant_exposure = TenantExposure {
        // None listed is the default (ClusterIP), not "no Service at all".
        service_types: match listed(&args.tenant_service_types) {
            l if l.is_empty() => TenantExposure::default().service_types,
            l => l
                .into_iter()
                .map(|s| {
                    serde_json::from_value(serde_json::Value::String(s.clone())).with_context(
                        || {
                            format!(
                                "--tenant-service-types: {s:?} is not ClusterIP, NodePort or LoadBalancer"
                            )
                        },
                    )
                })
                .collect::<anyhow::Result<_>>()?,
        },
        annotation_prefixes: listed(&args.tenant_service_annotation_prefixes),
    };
    let mut metrics_namespace_labels = std::collections::BTreeMap::new();
    for kv in args
        .metrics_namespace_labels
        .iter()
        .filter(|s| !s.trim().is_empty())
    {
        let (k, v) = kv.split_once('=').with_context(|| {
            format!("--metrics-namespace-labels: expected key=value, got {kv:?}")
        })?;
        metrics_namespace_labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    let cfg = OperatorConfig {
        agent_image: args.agent_image.clone(),
        agent_image_pull_policy: args.agent_image_pull_policy.clone(),
        operator_namespace: args.namespace.clone(),
        default_repositories: args
            .default_repositories
            .iter()
            .filter(|r| !r.is_empty())
            .cloned()
            .collect(),
        default_resources,
        operator_pod_labels: parse_labels(&args.operator_pod_labels)?,
        egress: egress_config(&args.agent_egress_cidrs, &args.agent_egress_except)?,
        allow_node_credentials: args.allow_node_credentials,
        default_log_format: match args.agent_log_format.as_str() {
            "json" => LogFormat::Json,
            _ => LogFormat::Text,
        },
        default_scheduling,
        tenant_scheduling,
        tenant_exposure,
        image_pull_secrets: listed(&args.agent_image_pull_secrets),
        metrics_namespace_labels,
    };
    let identity = args
        .pod_name
        .clone()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("caravan-operator-{}", std::process::id()));

    let metrics = Metrics::new().context("cannot register metrics")?;
    let health = Health::default();
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // Health and metrics first, so the kubelet sees a live process at once.
    let server = tokio::spawn(http::serve(
        args.http_addr,
        metrics.clone(),
        health.clone(),
        stopped(stop_rx.clone()),
    ));
    let signal_tx = stop_tx.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested");
        let _ = signal_tx.send(true);
    });

    let client = Client::try_default()
        .await
        .context("cannot build a Kubernetes client")?;
    let version = client
        .apiserver_version()
        .await
        .context("cannot reach the Kubernetes API server")?;
    tracing::info!(server = %version.git_version, identity = %identity, "connected");
    health.set_ready(true);

    let elector = args.leader_elect.then(|| {
        Elector::new(
            Api::<Lease>::namespaced(client.clone(), &args.namespace),
            &args.lease_name,
            &identity,
            Timing::default(),
        )
    });
    if let Some(e) = &elector {
        tokio::select! {
            _ = e.acquire() => {},
            _ = stopped(stop_rx.clone()) => {
                let _ = server.await;
                return Ok(());
            }
        }
    }
    metrics.leader.set(1);

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "caravan-operator".into(),
            instance: Some(identity.clone()),
        },
    );
    // One client and one circuit breaker for every controller: an agent
    // that stops answering costs one timed-out call per minute, whichever
    // controller asks.
    let agent_api = Arc::new(CircuitBreaker::new(
        HttpAgentApi::new().context("cannot build the agent API client")?,
    ));
    let declared_ctx = Arc::new(declared::Context::new(
        client.clone(),
        agent_api.clone(),
        recorder.clone(),
        metrics.clone(),
    ));
    let ctx = Arc::new(
        Context::new(client.clone(), cfg, recorder, metrics.clone())
            .with_agent_api(agent_api, args.watch_namespace.clone()),
    );
    let opts = RunOptions {
        concurrency: args.concurrency.max(1),
        namespace: args.watch_namespace.clone(),
        debounce: std::time::Duration::from_millis(args.debounce_ms),
    };
    let declared_opts = declared::RunOptions {
        concurrency: args.concurrency.max(1),
        namespace: args.watch_namespace.clone(),
        debounce: std::time::Duration::from_millis(args.debounce_ms),
    };
    let mut lost = false;
    {
        let ctrl = async {
            tokio::join!(
                controller::run(ctx, opts, stopped(stop_rx.clone())),
                shares::run(
                    declared_ctx.clone(),
                    declared_opts.clone(),
                    stopped(stop_rx.clone())
                ),
                grants::run(declared_ctx, declared_opts, stopped(stop_rx.clone())),
            );
        };
        tokio::pin!(ctrl);
        match &elector {
            Some(e) => {
                tokio::select! {
                    _ = &mut ctrl => {},
                    _ = e.hold() => {
                        lost = true;
                    }
                }
            }
            None => ctrl.await,
        }
    }
    metrics.leader.set(0);
    if let Some(e) = &elector
        && !lost
    {
        e.release().await;
    }
    let _ = stop_tx.send(true);
    let _ = server.await;
    if lost {
        bail!("lost leadership; exiting so a fresh start can stand by as a follower");
    }
    tracing::info!("stopped");
    Ok(())
}

/// `k=v` labels (empty entries skipped).
fn parse_labels(items: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for i in items.iter().map(|i| i.trim()).filter(|i| !i.is_empty()) {
        let (k, v) = i
            .split_once('=')
            .with_context(|| format!("--operator-pod-labels entry {i:?} is not key=value"))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// Checks the egress ranges at start, so a typo fails loudly instead of
/// producing NetworkPolicies the API server refuses.
fn egress_config(
    cidrs: &[String],
    except: &[String],
) -> anyhow::Result<caravan_operator::config::EgressConfig> {
    let clean = |v: &[String], what: &str| -> anyhow::Result<Vec<String>> {
        let mut out = Vec::new();
        for c in v.iter().map(|c| c.trim()).filter(|c| !c.is_empty()) {
            if !caravan_operator::children::cidr_strictly_contains("0.0.0.0/0", c)
                && !caravan_operator::children::cidr_strictly_contains("::/0", c)
                && c != "0.0.0.0/0"
                && c != "::/0"
            {
                bail!("{what} entry {c:?} is not a CIDR");
            }
            out.push(c.to_string());
        }
        Ok(out)
    };
    Ok(caravan_operator::config::EgressConfig {
        cidrs: clean(cidrs, "--agent-egress-cidrs")?,
        except: clean(except, "--agent-egress-except")?,
    })
}

//! Running the agent: listeners, the metrics and health endpoints, the
//! key and token files, and the run loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::conn_limits::{CappedListener, HttpLimits};
use crate::daemon::admin::{AdminGate, admin_router_with};
use crate::error::{Context, Error, Result};
use crate::identity::SecretKey;
use crate::node::{Agent, AgentOptions, AgentTrust, tuning};
use crate::{store, wire};

/// `/metrics`, `/livez` and `/readyz`.
///
/// Served from the start, before the agent is open (`agent` is set then):
/// while the daemon waits for its storage, `/livez` answers and `/readyz`
/// says "starting" (a liveness probe does not kill a pod that waits for a
/// bucket), and `/metrics` is empty.
pub fn metrics_router(
    agent: Arc<std::sync::OnceLock<Arc<Agent>>>,
    ready: Arc<AtomicBool>,
) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let a = agent.get().cloned();
                async move { a.map(|a| a.metrics.render()).unwrap_or_default() }
            }),
        )
        .route("/livez", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let r = ready.clone();
                async move {
                    if r.load(Ordering::SeqCst) {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "starting")
                    }
                }
            }),
        )
}

/// Reads the secret key file, refusing files others can read.
pub fn read_identity(path: &std::path::Path) -> Result<SecretKey> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)
            .map_err(|e| Error::Config(format!("identity file {}: {e}", path.display())))?;
        let mode = m.mode() & 0o777;
        // Group bits are fine only for the agent's own group (a Kubernetes
        // Secret volume with fsGroup mounts the key 0440).
        let own_group = m.gid() == rustix::process::getegid().as_raw();
        if mode & 0o007 != 0 || (mode & 0o070 != 0 && !own_group) {
            return Err(Error::Config(format!(
                "identity file {} is readable by others (mode {mode:o}); \
                 restrict it with `chmod 600 {}`",
                path.display(),
                path.display()
            )));
        }
    }
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("identity file {}: {e}", path.display())))?;
    SecretKey::from_text(&text)
        .map_err(|e| Error::Config(format!("identity file {}: {e}", path.display())))
}

/// Reads the admin token file.
pub fn read_token(path: &std::path::Path) -> Result<String> {
    let t = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("admin token file {}: {e}", path.display())))?;
    let t = t.trim().to_string();
    if t.len() < 16 {
        return Err(Error::Config(format!(
            "admin token in {} is too short (at least 16 characters)",
            path.display()
        )));
    }
    Ok(t)
}

async fn bind(addr: &str, what: &str) -> Result<TcpListener> {
    match TcpListener::bind(addr).await {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(Error::Config(format!(
            "the {what} address {addr} is taken (by a daemon already running with this \
             config? `caravan-agent status` says; or another program): stop it, or set \
             another port in the config"
        ))),
        r => r.context(|| format!("binding the {what} on {addr}")),
    }
}

/// Takes the storage for this daemon alone (an exclusive `flock` on
/// `<state>/daemon.lock`, released by the kernel when the process ends,
/// however it ends). Two daemons on one storage (a copied config with
/// other ports) would resume the same fetches and write the same part
/// files: both failed, moving files the other had already moved.
/// A lock file that cannot be opened (a state folder another user made)
/// is said in the log, not fatal: the daemon runs unguarded, as before.
fn lock_storage(root: &std::path::Path, state_prefix: &str) -> Result<Option<std::fs::File>> {
    use std::io::{Read, Seek, Write};
    let path = lock_path(root, state_prefix);
    let dir = path.parent().unwrap_or(root).to_path_buf();
    let opened = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
    });
    let mut f = match opened {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot open the daemon's lock file; not guarding against a second daemon on this storage");
            return Ok(None);
        }
    };
    if rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut holder = String::new();
        let _ = f.read_to_string(&mut holder);
        return Err(Error::Config(format!(
            "another caravan-agent daemon (pid {}) already runs on the storage at {}: one \
             storage, one daemon",
            holder.trim(),
            root.display()
        )));
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = write!(f, "{}", std::process::id());
    Ok(Some(f))
}

/// `<root>/<state>/daemon.lock`: the lock a daemon holds on its local
/// storage for as long as it runs ([`lock_storage`]).
pub fn lock_path(root: &std::path::Path, state_prefix: &str) -> std::path::PathBuf {
    root.join(state_prefix.trim_matches('/'))
        .join("daemon.lock")
}

/// Whether a daemon holds the lock at `path` now (one is running, maybe
/// still starting): the lock cannot be shared.
pub fn lock_held(path: &std::path::Path) -> bool {
    std::fs::File::open(path).is_ok_and(|f| {
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockShared).is_err()
    })
}

/// How long a starting daemon waits for its storage to answer before it
/// exits with the last error (a pod is then restarted): each probe is one
/// request, tried every 0.2 s doubling to 10 s.
const STORAGE_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Runs the agent until `shutdown` is cancelled.
pub async fn run(cfg: AgentConfig, shutdown: CancellationToken) -> Result<()> {
    let key = read_identity(&cfg.identity_file)?;
    let token = read_token(&cfg.admin_token_file)?;
    let op = store::open_agent_storage(&cfg.storage, &cfg.state_prefix)?;
    let ready = Arc::new(AtomicBool::new(false));
    // aws-lc seeds its random generator on first use, from a CPU-jitter
    // entropy source that takes about 25 ms of CPU: done now, in the
    // background, rather than in the first fetch's TLS handshake.
    tokio::task::spawn_blocking(|| {
        let mut seed = [0u8; 16];
        aws_lc_rs::rand::fill(&mut seed)
    });

    let fs_root = cfg.storage.fs_root();
    // Held until the process ends; taken first, so a second daemon on the
    // same storage is told so (with the first one's pid), and a command
    // run right after `run` sees a daemon starting before its ports are
    // bound (`cli::client`).
    let _lock = match &fs_root {
        Some(root) => lock_storage(root, &cfg.state_prefix)?,
        None => None,
    };
    let peer_listener = bind(&cfg.listen, "peer listener").await?;
    let admin_listener = bind(&cfg.admin_listen, "admin API").await?;
    // Bound now with the others: a port taken is reported at once, and no
    // connection this daemon opens while it starts (to its storage, its
    // repositories) can be given the port as its local one in between.
    let metrics_listener = match cfg.metrics_listen.is_empty() {
        true => None,
        false => Some(bind(&cfg.metrics_listen, "metrics endpoint").await?),
    };
    // The admin API answers from now on ("starting" until the agent is
    // open), health too; metrics once the agent is open.
    let gate = AdminGate::new(token.clone());
    {
        let router = gate.router();
        let sd = shutdown.clone();
        tokio::spawn(async move {
            // Caps, but no idle cut: a publish is answered when its pass ends.
            let limits = HttpLimits {
                idle: None,
                ..HttpLimits::from_env()
            };
            let capped = CappedListener::new(admin_listener, limits);
            let _ = axum::serve(capped, router)
                .with_graceful_shutdown(sd.cancelled_owned())
                .await;
        });
    }
    let opened: Arc<std::sync::OnceLock<Arc<Agent>>> = Arc::default();
    if let Some(l) = metrics_listener {
        let r = metrics_router(opened.clone(), ready.clone());
        let sd = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(CappedListener::new(l, HttpLimits::from_env()), r)
                .with_graceful_shutdown(sd.cancelled_owned())
                .await;
        });
    }
    let peer_addr: SocketAddr = peer_listener
        .local_addr()
        .context(|| "peer address".into())?;
    let advertise = if cfg.advertise.is_empty() && !peer_addr.ip().is_unspecified() {
        vec![peer_addr.to_string()]
    } else {
        cfg.advertise.clone()
    };
    // Storage may be briefly unavailable at start (a bucket being created):
    // report not-ready and retry with backoff rather than crash-looping.
    let mut delay = std::time::Duration::from_millis(200);
    let mut attempt = 0;
    let probing = store::open_for_probe(&cfg.storage)?;
    let waiting_since = std::time::Instant::now();
    while let Err(e) = store::probe(&probing).await {
        // A storage that answers "no" (no such bucket, bad credentials) will
        // not change its mind: said at once as a configuration error (exit
        // code 3), not after minutes of retries.
        if let Error::Storage { source, .. } = &e
            && matches!(
                source.kind(),
                opendal::ErrorKind::ConfigInvalid | opendal::ErrorKind::PermissionDenied
            )
        {
            return Err(Error::Config(format!(
                "the storage refuses this configuration: {e} (check the bucket, its \
                 credentials and the endpoint in [storage])"
            )));
        }
        // No credentials at all (none in the config, the credentials file
        // or the environment): said as such. Only an instance role could
        // still bring some; with the metadata service switched off nothing
        // can, so that is a configuration error at once.
        let e = match no_credentials(&cfg.storage, &e) {
            Some(said) if metadata_off(&cfg.storage) => return Err(Error::Config(said)),
            Some(said) => Error::Config(said),
            None => e,
        };
        attempt += 1;
        tracing::warn!(error = %e, attempt, "storage not reachable yet");
        gate.waiting(format!(
            "{} (attempt {attempt}, for up to \
             {} min): {e}",
            crate::daemon::admin::WAITING_FOR_STORAGE,
            STORAGE_WAIT.as_secs() / 60
        ));
        if waiting_since.elapsed() >= STORAGE_WAIT {
            return Err(e);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(std::time::Duration::from_secs(10));
    }
    gate.waiting("loading its state from the storage".into());
    let agent = Agent::open(
        key,
        op,
        AgentOptions {
            state_prefix: cfg.state_prefix.clone(),
            advertise,
            repositories: cfg.repositories.clone(),
            size_limit: fs_root.as_ref().and(cfg.storage.size_limit),
            fs_root,
            corrupt_chunks: tuning::fault_corrupt_chunks(),
            azblob_signer: store::sas::AzblobSigner::from_config(&cfg.storage)?,
        },
    )
    .await?;

    let trust = AgentTrust::open(
        agent.secret_key(),
        agent.storage().clone(),
        agent.state_prefix(),
        &cfg.repositories,
    )
    .await?;
    agent.set_trust(trust);
    let interval = tuning::trust_sync_interval().unwrap_or_else(|| {
        std::time::Duration::from_secs(
            cfg.sync_interval_secs
                .unwrap_or(crate::config::DEFAULT_SYNC_INTERVAL_SECS)
                .max(1),
        )
    });
    tokio::spawn(agent.clone().run_trust_sync(interval, shutdown.clone()));
    tokio::spawn(run_seed_refresh(agent.clone(), shutdown.clone()));
    tokio::spawn(crate::node::fetch::leftovers::run_sweeps(
        agent.clone(),
        shutdown.clone(),
    ));

    // Before peers are served: a recipient reconnecting finds the pass.
    match agent.resume_publishes().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(publishes = n, "resumed unfinished publishes"),
        Err(e) => tracing::warn!(error = %e, "could not read unfinished publishes"),
    }
    let tls = wire::tls::server_config(agent.secret_key())?;
    tokio::spawn(wire::server::serve(
        peer_listener,
        tls,
        agent.clone(),
        shutdown.clone(),
    ));
    let declared = crate::node::Declarations::open(agent.clone(), shutdown.clone()).await?;
    gate.open(admin_router_with(agent.clone(), token, Some(declared)));
    if agent.advertise().is_empty() {
        tracing::warn!(
            listen = %peer_addr,
            "this agent advertises no address (it listens on every address): its \
             tickets and announcements carry none, so peers find it only through \
             `--peer`; set `advertise` in the config"
        );
    }
    let _ = opened.set(agent.clone());
    let resumed = agent.resume_fetches().await?;
    ready.store(true, Ordering::SeqCst);
    tracing::info!(
        agent_id = %agent.id,
        listen = %peer_addr,
        admin = %cfg.admin_listen,
        metrics = %cfg.metrics_listen,
        shares = agent.held_shares().len(),
        resumed,
        "agent running"
    );
    shutdown.cancelled().await;
    tracing::info!("agent stopping");
    Ok(())
}

/// Renews the presigned URLs of offline-seeded shares before they expire
/// (and restages a share whose version changed). Presigning is local
/// computation; a failed round is retried at the next tick.
async fn run_seed_refresh(agent: Arc<crate::node::Agent>, shutdown: CancellationToken) {
    let every = crate::node::tuning::seed_refresh_interval();
    loop {
        match agent.refresh_seeds().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(renewed = n, "offline seeds refreshed"),
            Err(e) => {
                agent.metrics.error("seed_refresh");
                tracing::warn!(error = %e, "refreshing offline seeds failed; retrying later");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// The words for a storage probe that failed for want of any credentials
/// (OpenDAL's signer found none to load), if that is why.
fn no_credentials(storage: &crate::config::StorageConfig, e: &Error) -> Option<String> {
    let said = e.to_string();
    if !said.contains("failed to load signing credential") {
        return None;
    }
    Some(format!(
        "no credentials found for the {} storage: give them in the credentials file \
         ([storage] credentials, e.g. access_key_id and secret_access_key for s3) or as \
         CARAVAN_STORAGE_<OPTION> variables; only an instance role could provide them \
         otherwise ({said})",
        storage.scheme
    ))
}

/// Whether the config switches the instance-metadata service off (so no
/// instance role can bring credentials).
fn metadata_off(storage: &crate::config::StorageConfig) -> bool {
    ["disable_ec2_metadata", "disable_vm_metadata"]
        .iter()
        .any(|k| storage.options.get(*k).is_some_and(|v| v == "true"))
}

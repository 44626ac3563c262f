//! `keygen`, `init` and `run`: making an agent's files and running it.

use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use tokio_util::sync::CancellationToken;

use caravan_agent::config::{AgentConfig, StorageConfig};
use caravan_agent::daemon::{self};
use caravan_agent::identity::SecretKey;

use crate::cli::exit::Exit;

pub(crate) fn keygen(out: &std::path::Path, force: bool) -> Result<()> {
    if out.exists() && !force {
        return Err(Exit::Config(anyhow!(
            "{} already exists; refusing to replace an identity (use --force)",
            out.display()
        ))
        .into());
    }
    let key = SecretKey::generate()?;
    write_private(out, key.to_text().as_bytes())?;
    out!("{}", key.agent_id());
    Ok(())
}

pub(crate) fn write_private(path: &std::path::Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

pub(crate) fn init(
    dir: &std::path::Path,
    listen: String,
    admin: String,
    metrics: String,
) -> Result<()> {
    if dir.join("agent.toml").exists() {
        return Err(Exit::Config(anyhow!("{} already holds an agent", dir.display())).into());
    }
    let config_in = |dir: &Path| {
        let mut options = std::collections::BTreeMap::new();
        options.insert("root".into(), dir.join("data").display().to_string());
        AgentConfig {
            identity_file: dir.join("identity.key"),
            admin_token_file: dir.join("admin.token"),
            listen: listen.clone(),
            admin_listen: admin.clone(),
            metrics_listen: metrics.clone(),
            advertise: vec![],
            repositories: vec![],
            state_prefix: caravan_agent::config::DEFAULT_STATE_PREFIX.into(),
            sync_interval_secs: None,
            storage: StorageConfig {
                scheme: "fs".into(),
                options,
                credentials: None,
                size_limit: None,
            },
        }
    };
    // Checked before anything is written: a mistyped address leaves no
    // half-made agent behind.
    config_in(dir)
        .validate()
        .map_err(|e| Exit::Config(anyhow!(e)))?;
    std::fs::create_dir_all(dir.join("data"))
        .with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir).with_context(|| format!("resolving {}", dir.display()))?;
    let key = SecretKey::generate()?;
    write_private(&dir.join("identity.key"), key.to_text().as_bytes())?;
    let token: [u8; 24] = caravan_agent::crypto::random_bytes()?;
    let token: String = token.iter().map(|b| format!("{b:02x}")).collect();
    write_private(&dir.join("admin.token"), format!("{token}\n").as_bytes())?;
    let cfg = config_in(&dir);
    std::fs::write(dir.join("agent.toml"), cfg.to_toml()?).with_context(|| "writing agent.toml")?;
    out!("{}", key.agent_id());
    say!(
        "agent created in {}: run it with `caravan-agent run --config {}`",
        dir.display(),
        dir.join("agent.toml").display()
    );
    if cfg
        .listen
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_unspecified())
    {
        say!(
            "note: it listens on every address ({}), so it cannot tell peers which one \
             reaches it: set `advertise = [\"HOST:PORT\"]` in agent.toml, or its tickets \
             carry no address",
            cfg.listen
        );
    }
    Ok(())
}

pub(crate) fn load_config(path: &Path) -> Result<AgentConfig> {
    if !path.exists() {
        return Err(Exit::Config(anyhow!(
            "no agent configuration at {}: give --config FILE, set CARAVAN_CONFIG, \
             or create one with `caravan-agent init --dir DIR`",
            path.display()
        ))
        .into());
    }
    AgentConfig::load(path).map_err(|e| Exit::Config(anyhow!(e)).into())
}

pub(crate) async fn run(config: &Path) -> Result<()> {
    let cfg = load_config(config)?;
    let shutdown = CancellationToken::new();
    let sd = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        sd.cancel();
    });
    daemon::run(cfg, shutdown).await.map_err(|e| match e {
        caravan_agent::Error::Config(_) => Exit::Config(anyhow!(e)).into(),
        other => anyhow!(other),
    })
}

pub(crate) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

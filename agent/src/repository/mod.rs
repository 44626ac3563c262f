//! Repositories (the successors of BitTorrent trackers): an HTTP service that
//! stores and serves signed announcements, trust grants and revocations, and
//! the client agents use to talk to several of them at once.
//!
//! A repository verifies every record on write, so it cannot be used to forge
//! anything; readers verify again, so it is trusted for availability only.
//!
//! HTTP API (all under `/v1`):
//! - `POST /v1/records` — body: one raw [`crate::record::SignedRecord`]
//!   (`application/octet-stream`). 200 with a JSON receipt, or a 4xx with
//!   `{"error": reason, "detail": text}` (reasons: see
//!   [`crate::trust::Reason`]).
//! - `GET /v1/announcements/{agent}` — the agent's current announcement (raw record).
//! - `GET /v1/locators/{locator hex}` — unexpired announcements listing the locator.
//! - `GET /v1/grants/by-issuer/{agent}`, `GET /v1/grants/by-subject/{agent}` —
//!   unexpired grants.
//! - `GET /v1/revocations/by-issuer/{agent}` — every revocation by an agent.
//! - `GET /v1/revocations?cursor=N&limit=M` — the revocation feed from entry N;
//!   the `x-caravan-next-cursor` header says where to continue.
//! - `GET /metrics`, `GET /healthz`.
//!
//! Lists of records travel as [frames](encode_frames): a 4-byte big-endian
//! length before each record, content type [`FRAMES_CONTENT_TYPE`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::error::{Error, Result};

pub mod client;
pub mod server;

pub use client::{Outcome, PublishReport, RepositoryClient};
pub use server::{Receipt, Repository, RepositoryConfig, serve, serve_with};

/// Content type of a framed list of records.
pub const FRAMES_CONTENT_TYPE: &str = "application/vnd.caravan.records";
/// Response header carrying the next revocation-feed cursor.
pub const NEXT_CURSOR_HEADER: &str = "x-caravan-next-cursor";
/// Largest encoded record a repository accepts (an announcement at its body
/// limit plus header and signature).
pub const MAX_RECORD_BYTES: usize = (64 << 10) + 41 + 64;
/// Most records in one framed response (look-ups and feed pages).
pub const MAX_FRAMES: usize = 1000;

/// Encodes records as frames: for each, a u32 big-endian length, then the bytes.
pub fn encode_frames<'a>(records: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        out.extend_from_slice(&(r.len() as u32).to_be_bytes());
        out.extend_from_slice(r);
    }
    out
}

/// Splits a framed response (network input) into record byte slices,
/// refusing truncation, frames over [`MAX_RECORD_BYTES`] and more than
/// `max_items` frames. Never panics.
pub fn decode_frames(bytes: &[u8], max_items: usize) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        if out.len() >= max_items {
            return Err(Error::Protocol(format!(
                "more than {max_items} records in one response"
            )));
        }
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(Error::Protocol("truncated frame length".into()));
        };
        let len = u32::from_be_bytes(*len) as usize;
        if len > MAX_RECORD_BYTES {
            return Err(Error::Protocol(format!(
                "frame of {len} bytes exceeds {MAX_RECORD_BYTES}"
            )));
        }
        if tail.len() < len {
            return Err(Error::Protocol("truncated frame".into()));
        }
        let (rec, tail) = tail.split_at(len);
        out.push(rec);
        rest = tail;
    }
    Ok(out)
}

/// Command-line arguments of `caravan-agent repository`.
#[derive(Debug, Clone, clap::Args)]
pub struct RepositoryArgs {
    /// Address to listen on for HTTP (put TLS in front of it, e.g. an ingress).
    #[arg(
        long,
        default_value = "127.0.0.1:7480",
        env = "CARAVAN_REPOSITORY_LISTEN"
    )]
    pub listen: SocketAddr,

    /// OpenDAL scheme of the storage holding the repository's records
    /// (memory, fs, s3, gcs, azblob…). Use a bucket to run several replicas:
    /// they share everything through it. `memory` forgets on restart.
    #[arg(
        long,
        default_value = "memory",
        env = "CARAVAN_REPOSITORY_STORAGE_SCHEME"
    )]
    pub storage_scheme: String,

    /// A non-secret storage option, `key=value` (repeatable), e.g.
    /// `--storage-option root=/var/lib/caravan-repo` for fs or
    /// `--storage-option bucket=repo --storage-option region=eu-west-1` for s3.
    #[arg(long = "storage-option", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub storage_options: Vec<(String, String)>,

    /// Secret storage options: a directory with one file per option (a
    /// mounted Kubernetes Secret) or a file of `key=value` lines.
    /// `CARAVAN_STORAGE_<OPTION>` environment variables are read too.
    #[arg(long, value_name = "PATH")]
    pub storage_credentials: Option<PathBuf>,

    /// Requests per second allowed per client IP address (token bucket).
    #[arg(long, default_value_t = 50.0)]
    pub rate_per_second: f64,

    /// Burst of requests allowed per client IP above the steady rate.
    #[arg(long, default_value_t = 200)]
    pub rate_burst: u32,

    /// A proxy (address or CIDR range, repeatable) whose X-Forwarded-For
    /// names the real client, e.g. the ingress' pod range. Without one,
    /// every request behind an ingress shares the ingress' rate limit and
    /// its cap of 64 open connections per address (a trusted proxy is held
    /// only to the total of 1024).
    #[arg(
        long = "trusted-proxy",
        value_name = "CIDR",
        env = "CARAVAN_REPOSITORY_TRUSTED_PROXIES",
        value_delimiter = ','
    )]
    pub trusted_proxies: Vec<server::Cidr>,
}

fn parse_key_value(s: &str) -> std::result::Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    if k.trim().is_empty() {
        return Err(format!("empty option name in {s:?}"));
    }
    Ok((k.trim().to_string(), v.to_string()))
}

impl RepositoryArgs {
    /// The server configuration these arguments describe.
    pub fn config(&self) -> RepositoryConfig {
        RepositoryConfig {
            rate_per_second: self.rate_per_second,
            rate_burst: self.rate_burst,
            trusted_proxies: self.trusted_proxies.clone(),
            ..RepositoryConfig::default()
        }
    }

    /// Opens the storage the arguments name. For `fs`, writes go through a
    /// temporary directory beside the data (`atomic_write_dir`) unless set,
    /// so a reader never sees half a record.
    pub fn open_storage(&self) -> Result<opendal::Operator> {
        let mut options: BTreeMap<String, String> = self.storage_options.iter().cloned().collect();
        if self.storage_scheme == "fs"
            && let Some(root) = options.get("root").cloned()
        {
            options
                .entry("atomic_write_dir".into())
                .or_insert_with(|| format!("{}/.tmp", root.trim_end_matches('/')));
        }
        crate::store::open(&crate::config::StorageConfig {
            scheme: self.storage_scheme.clone(),
            options,
            credentials: self.storage_credentials.clone(),
            size_limit: None,
        })
    }
}

/// Runs `caravan-agent repository` as the arguments say until `shutdown`
/// resolves: opens the storage, binds the listener, serves. The CLI's whole
/// job is `repository::run(&args, shutdown_signal()).await`.
pub async fn run(
    args: &RepositoryArgs,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let op = args.open_storage()?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| Error::Io {
            context: format!("binding the repository listener on {}", args.listen),
            source,
        })?;
    serve_with(listener, op, args.config(), shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn client_and_repository_can_be_shared_across_tasks() {
        fn shareable<T: Send + Sync>() {}
        shareable::<RepositoryClient>();
        shareable::<Repository>();
    }

    #[test]
    fn frames_roundtrip() {
        let recs: Vec<Vec<u8>> = vec![vec![1, 2, 3], vec![], vec![9; 300]];
        let enc = encode_frames(recs.iter().map(|r| r.as_slice()));
        let dec = decode_frames(&enc, 10).unwrap();
        assert_eq!(dec, recs.iter().map(|r| r.as_slice()).collect::<Vec<_>>());
        assert!(decode_frames(&enc, 2).is_err());
        assert!(decode_frames(&enc[..enc.len() - 1], 10).is_err());
        assert!(decode_frames(&[0, 0], 10).is_err());
        assert!(decode_frames(&[255, 255, 255, 255], 10).is_err());
    }

    #[test]
    fn args_parse() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            repo: RepositoryArgs,
        }
        let c = Cli::try_parse_from([
            "x",
            "--listen",
            "127.0.0.1:0",
            "--storage-scheme",
            "fs",
            "--storage-option",
            "root=/tmp/x",
        ])
        .unwrap();
        assert_eq!(
            c.repo.storage_options,
            vec![("root".into(), "/tmp/x".into())]
        );
        assert!(Cli::try_parse_from(["x", "--storage-option", "novalue"]).is_err());
    }

    proptest! {
        #[test]
        fn decode_frames_never_panics(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_frames(&b, 100);
        }
    }
}

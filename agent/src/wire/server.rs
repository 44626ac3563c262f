//! Accepts peer connections and answers pipelined requests concurrently.

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{Frame, FrameType, MAX_REQUEST, read_frame, tls, write_frame};
use crate::chunk::ChunkId;
use crate::error::{Error, Result};
use crate::identity::AgentId;
use crate::manifest::ShareId;

/// Requests a connection may have in progress at once.
const PER_CONNECTION_CONCURRENCY: usize = 32;

/// What a server does with each request. `peer` is the authenticated caller.
pub trait Service: Send + Sync + 'static {
    /// The newest manifest record of a share newer than `have_seq`.
    fn manifest(
        &self,
        peer: AgentId,
        share: ShareId,
        have_seq: u64,
    ) -> impl Future<Output = Result<Vec<u8>>> + Send;
    /// The ciphertext of one chunk.
    fn chunk(
        &self,
        peer: AgentId,
        share: ShareId,
        chunk: ChunkId,
    ) -> impl Future<Output = Result<Vec<u8>>> + Send;
    /// The share key wrapped for the caller (a signed key-release record).
    fn key(
        &self,
        peer: AgentId,
        share: ShareId,
        proof: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Vec<u8>>> + Send;
    /// Called when a peer connects or disconnects (for metrics).
    fn peer_connected(&self, _peer: AgentId, _connected: bool) {}
}

fn parse_ids(p: &[u8]) -> Result<(ShareId, [u8; 32])> {
    if p.len() < 64 {
        return Err(Error::Protocol("request payload too short".into()));
    }
    let mut a = [0u8; 32];
    let mut b = [0u8; 32];
    a.copy_from_slice(&p[..32]);
    b.copy_from_slice(&p[32..64]);
    Ok((ShareId(a), b))
}

async fn handle<S: Service>(svc: &S, peer: AgentId, f: Frame) -> Result<Vec<u8>> {
    match f.typ {
        FrameType::Ping => Ok(Vec::new()),
        FrameType::GetManifest => {
            if f.payload.len() != 40 {
                return Err(Error::Protocol(
                    "GetManifest payload must be 40 bytes".into(),
                ));
            }
            let mut s = [0u8; 32];
            s.copy_from_slice(&f.payload[..32]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&f.payload[32..]);
            svc.manifest(peer, ShareId(s), u64::from_be_bytes(v)).await
        }
        FrameType::GetChunk => {
            if f.payload.len() != 64 {
                return Err(Error::Protocol("GetChunk payload must be 64 bytes".into()));
            }
            let (s, c) = parse_ids(&f.payload)?;
            svc.chunk(peer, s, ChunkId(c)).await
        }
        FrameType::GetKey => {
            if f.payload.len() < 32 {
                return Err(Error::Protocol("GetKey payload too short".into()));
            }
            let mut s = [0u8; 32];
            s.copy_from_slice(&f.payload[..32]);
            let proof: Vec<Vec<u8>> = postcard::from_bytes(&f.payload[32..])
                .map_err(|e| Error::Protocol(format!("GetKey proof: {e}")))?;
            svc.key(peer, ShareId(s), proof).await
        }
        other => Err(Error::Protocol(format!("{other:?} is not a request"))),
    }
}

/// Serves peers on `listener` until `shutdown` is cancelled.
pub async fn serve<S: Service>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    svc: Arc<S>,
    shutdown: CancellationToken,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let svc = svc.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let accepted =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                    .await;
            let stream = match accepted {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    debug!(%addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    debug!(%addr, "TLS handshake timed out");
                    return;
                }
            };
            let peer = match stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
            {
                Some(cert) => match tls::agent_id_of(cert) {
                    Ok(id) => id,
                    Err(e) => {
                        debug!(%addr, error = %e, "bad peer certificate");
                        return;
                    }
                },
                None => return,
            };
            svc.peer_connected(peer, true);
            debug!(%addr, peer = %peer.short(), "peer connected");
            if let Err(e) = connection(stream, peer, svc.clone(), shutdown).await {
                debug!(%addr, peer = %peer.short(), error = %e, "peer connection ended");
            }
            svc.peer_connected(peer, false);
        });
    }
}

async fn connection<S: Service>(
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: AgentId,
    svc: Arc<S>,
    shutdown: CancellationToken,
) -> Result<()> {
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<Frame>(PER_CONNECTION_CONCURRENCY);
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 << 10, wr);
        while let Some(f) = rx.recv().await {
            write_frame(&mut w, &f).await?;
            while let Ok(f) = rx.try_recv() {
                write_frame(&mut w, &f).await?;
            }
            w.flush()
                .await
                .map_err(|e| Error::Protocol(e.to_string()))?;
        }
        let _ = w.shutdown().await;
        Ok::<_, Error>(())
    });
    let limit = Arc::new(Semaphore::new(PER_CONNECTION_CONCURRENCY));
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break,
            f = read_frame(&mut rd, MAX_REQUEST) => match f? {
                Some(f) => f,
                None => break,
            },
        };
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Protocol("connection closing".into()))?;
        let svc = svc.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let id = frame.id;
            let reply = match handle(&*svc, peer, frame).await {
                Ok(payload) => Frame {
                    typ: FrameType::Ok,
                    id,
                    payload,
                },
                Err(Error::NotFound(m)) => Frame {
                    typ: FrameType::NotFound,
                    id,
                    payload: m.into_bytes(),
                },
                Err(e) => Frame {
                    typ: FrameType::Failed,
                    id,
                    payload: e.to_string().into_bytes(),
                },
            };
            let _ = tx.send(reply).await;
            drop(permit);
        });
    }
    drop(tx);
    match writer.await {
        Ok(r) => r,
        Err(e) => Err(Error::Protocol(format!("writer task: {e}"))),
    }
}

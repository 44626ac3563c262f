//! Accepts peer connections and answers pipelined requests concurrently.

use std::collections::VecDeque;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::channel::{self, Body, Outgoing};
use super::{Frame, FrameType, Request, parse_request, request_limit, tls};
use crate::chunk::ChunkId;
use crate::conn_limits::{Counter, Slot};
use crate::error::{Error, Result};
use crate::identity::AgentId;
use crate::manifest::ShareId;

/// Requests a connection may have in progress at once.
const PER_CONNECTION_CONCURRENCY: usize = 32;

/// Manifest and live answers one peer may have being sealed and written at
/// once, over all its connections. Sealing a frame takes a copy of its
/// body, and a manifest record or a live pass's file list may be up to
/// [`super::MAX_MANIFEST_RESPONSE`] bytes (tens of MiB for a share of many
/// files): an authorized peer asking for it on every request turn of every
/// connection it may open (32 x 64) held that many copies in this agent.
/// Answers wait for a turn, holding no copy ([`Body::Shared`]); only the
/// asker's own connections wait.
pub const MANIFESTS_PER_PEER: usize = 2;

/// The turns of each connected peer to seal a manifest answer
/// ([`MANIFESTS_PER_PEER`]), dropped with the peer's last connection.
#[derive(Default)]
struct ManifestTurns(Mutex<std::collections::HashMap<AgentId, Arc<Semaphore>>>);

impl ManifestTurns {
    fn of(&self, peer: AgentId) -> Arc<Semaphore> {
        match self.0.lock() {
            Ok(mut m) => m
                .entry(peer)
                .or_insert_with(|| Arc::new(Semaphore::new(MANIFESTS_PER_PEER)))
                .clone(),
            Err(_) => Arc::new(Semaphore::new(MANIFESTS_PER_PEER)),
        }
    }

    fn done(&self, peer: AgentId, turns: Arc<Semaphore>) {
        drop(turns);
        if let Ok(mut m) = self.0.lock()
            && m.get(&peer).is_some_and(|t| Arc::strong_count(t) == 1)
        {
            m.remove(&peer);
        }
    }
}

/// What a server does with each request. `peer` is the authenticated caller.
pub trait Service: Send + Sync + 'static {
    /// The newest manifest record of a share if it is newer than
    /// `have_seq`; empty when it is not (the asker holds it already).
    /// Shared, not copied: see [`MANIFESTS_PER_PEER`].
    fn manifest(
        &self,
        peer: AgentId,
        share: ShareId,
        have_seq: u64,
    ) -> impl Future<Output = Result<bytes::Bytes>> + Send;
    /// The ciphertext of one chunk.
    fn chunk(
        &self,
        peer: AgentId,
        share: ShareId,
        chunk: ChunkId,
    ) -> impl Future<Output = Result<Vec<u8>>> + Send;
    /// The ciphertext of one chunk with its BLAKE3 hash, which the channel
    /// MACs instead of encrypting the chunk again. The default hashes what
    /// [`Service::chunk`] returns; an implementation that verified the chunk
    /// before serving it already has the hash.
    fn chunk_hashed(
        &self,
        peer: AgentId,
        share: ShareId,
        chunk: ChunkId,
    ) -> impl Future<Output = Result<(Body, [u8; 32])>> + Send {
        async move {
            let ct = self.chunk(peer, share, chunk).await?;
            let h = *blake3::hash(&ct).as_bytes();
            Ok((ct.into(), h))
        }
    }
    /// The share key wrapped for the caller (a signed key-release record).
    fn key(
        &self,
        peer: AgentId,
        share: ShareId,
        proof: Vec<Vec<u8>>,
    ) -> impl Future<Output = Result<Vec<u8>>> + Send;
    /// What a running publish pass of a share sealed from position `from`
    /// of its chunk log on (a long poll of bounded length); from 0, its
    /// file list. Shared, not copied, as a manifest is: see
    /// [`MANIFESTS_PER_PEER`]. Only the publisher answers; the default
    /// knows no live share.
    fn live(
        &self,
        _peer: AgentId,
        _share: ShareId,
        _from: u64,
    ) -> impl Future<Output = Result<bytes::Bytes>> + Send {
        async { Err(Error::NotFound("unknown share".into())) }
    }
    /// A chunk request read off a connection, called in the order the peer
    /// sent them, before requests are answered concurrently (in any order):
    /// a holder reading object storage opens one stream per file from it.
    fn chunk_asked(&self, _peer: AgentId, _share: ShareId, _chunk: ChunkId) {}
    /// Called when a peer connects or disconnects (for metrics).
    fn peer_connected(&self, _peer: AgentId, _connected: bool) {}
}

/// Limits of a peer server; defaults, overridable by environment variables
/// (named in each field) for tests and unusual deployments.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections in total, handshakes included (`CARAVAN_MAX_CONNS`).
    pub max_conns: usize,
    /// Open connections from one IP address (`CARAVAN_MAX_CONNS_PER_IP`).
    pub max_conns_per_ip: usize,
    /// Open connections of one agent id (`CARAVAN_MAX_CONNS_PER_PEER`).
    pub max_conns_per_peer: usize,
    /// TLS handshake deadline.
    pub handshake: Duration,
    /// A connection with no new request for this long is closed (`CARAVAN_PEER_IDLE_SECS`).
    pub idle: Duration,
    /// Deadline for the body of a frame whose header arrived (`CARAVAN_PEER_READ_SECS`).
    pub read: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_conns: 1024,
            max_conns_per_ip: 256,
            max_conns_per_peer: 64,
            handshake: Duration::from_secs(10),
            idle: Duration::from_secs(120),
            read: Duration::from_secs(30),
        }
    }
}

impl Limits {
    /// The defaults, with any environment overrides applied.
    pub fn from_env() -> Self {
        use crate::util::{env_positive as n, env_secs};
        let d = Limits::default();
        let secs = |k: &str, v: Duration| env_secs(k).unwrap_or(v);
        Limits {
            max_conns: n("CARAVAN_MAX_CONNS", d.max_conns),
            max_conns_per_ip: n("CARAVAN_MAX_CONNS_PER_IP", d.max_conns_per_ip),
            max_conns_per_peer: n("CARAVAN_MAX_CONNS_PER_PEER", d.max_conns_per_peer),
            handshake: d.handshake,
            idle: secs("CARAVAN_PEER_IDLE_SECS", d.idle),
            read: secs("CARAVAN_PEER_READ_SECS", d.read),
        }
    }
}

/// The slots a connection holds: one of the total, one of its address's.
struct Slots {
    _conn: Option<OwnedSemaphorePermit>,
    ip: Option<Slot<IpAddr>>,
}

/// One connection still in its TLS handshake.
struct Pending {
    id: u64,
    ip: IpAddr,
    slots: Slots,
    evicted: CancellationToken,
}

/// Connections still in their TLS handshake, oldest first.
///
/// Anyone can open sockets and never finish a handshake (or finish it
/// slowly, up to [`Limits::handshake`]). Were those to hold their slots
/// like established connections, a flood of them would keep every honest
/// peer out. So when a cap is reached, the oldest connection still
/// handshaking (from the newcomer's address, when that address is at its
/// cap) gives its slots to the newcomer and is closed. An honest handshake
/// takes milliseconds: a flood would have to push it out within that time,
/// with a fresh connection for every one it evicts. Established
/// connections are never evicted (their caps: per address, per agent id,
/// and the idle timeout).
#[derive(Default)]
struct Handshakes {
    next: u64,
    queue: VecDeque<Pending>,
}

impl Handshakes {
    /// Slots for a newcomer from `ip` taken from the oldest handshake that
    /// can give them: `need_conn` (the total is full) and/or `need_ip` (its
    /// address is full; then only a handshake from `ip` can give).
    fn evict_for(&mut self, ip: IpAddr, need_conn: bool, need_ip: bool) -> Option<Slots> {
        let at = self.queue.iter().position(|p| !need_ip || p.ip == ip)?;
        let old = self.queue.remove(at)?;
        old.evicted.cancel();
        Some(Slots {
            _conn: if need_conn { old.slots._conn } else { None },
            ip: if need_ip { old.slots.ip } else { None },
        })
    }
}

/// Registers a connection as handshaking; gives its slots back (or drops
/// them, when it failed) once it leaves, however it leaves.
struct HandshakeGuard {
    all: Arc<Mutex<Handshakes>>,
    id: u64,
}

impl HandshakeGuard {
    fn enter(
        all: &Arc<Mutex<Handshakes>>,
        ip: IpAddr,
        slots: Slots,
    ) -> Option<(Self, CancellationToken)> {
        let mut h = all.lock().ok()?;
        h.next += 1;
        let id = h.next;
        let evicted = CancellationToken::new();
        h.queue.push_back(Pending {
            id,
            ip,
            slots,
            evicted: evicted.clone(),
        });
        Some((
            HandshakeGuard {
                all: all.clone(),
                id,
            },
            evicted,
        ))
    }

    /// The slots, for the established connection; `None` when evicted.
    fn finish(self) -> Option<Slots> {
        let mut h = self.all.lock().ok()?;
        let at = h.queue.iter().position(|p| p.id == self.id)?;
        h.queue.remove(at).map(|p| p.slots)
    }
}

impl Drop for HandshakeGuard {
    fn drop(&mut self) {
        if let Ok(mut h) = self.all.lock()
            && let Some(at) = h.queue.iter().position(|p| p.id == self.id)
        {
            h.queue.remove(at);
        }
    }
}

/// Answers one request: the payload, and its hash when it goes raw (a chunk).
async fn handle<S: Service>(svc: &S, peer: AgentId, f: Frame) -> Result<(Body, Option<[u8; 32]>)> {
    match parse_request(f.typ, &f.payload)? {
        Request::Ping => Ok((Vec::new().into(), None)),
        Request::Manifest(s, have) => Ok((Body::Shared(svc.manifest(peer, s, have).await?), None)),
        Request::Chunk(s, c) => svc
            .chunk_hashed(peer, s, c)
            .await
            .map(|(ct, h)| (ct, Some(h))),
        Request::Key(s, proof) => Ok((svc.key(peer, s, proof).await?.into(), None)),
        Request::Live(s, from) => Ok((Body::Shared(svc.live(peer, s, from).await?), None)),
    }
}

/// Serves peers on `listener` until `shutdown` is cancelled, with the
/// limits from the environment (see [`Limits::from_env`]).
pub async fn serve<S: Service>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    svc: Arc<S>,
    shutdown: CancellationToken,
) {
    serve_with(listener, tls, svc, shutdown, Limits::from_env()).await
}

/// Serves peers on `listener` until `shutdown` is cancelled.
pub async fn serve_with<S: Service>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    svc: Arc<S>,
    shutdown: CancellationToken,
    limits: Limits,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let total = Arc::new(Semaphore::new(limits.max_conns));
    let per_ip: Arc<Counter<IpAddr>> = Counter::new(limits.max_conns_per_ip);
    let per_peer: Arc<Counter<AgentId>> = Counter::new(limits.max_conns_per_peer);
    let handshakes: Arc<Mutex<Handshakes>> = Arc::default();
    let manifest_turns: Arc<ManifestTurns> = Arc::default();
    let limits = Arc::new(limits);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Over a cap, the oldest connection still handshaking gives way
        // (see `Handshakes`); with none, the socket is simply closed: no
        // handshake, no work.
        let conn_slot = total.clone().try_acquire_owned().ok();
        let ip_slot = per_ip.take(addr.ip());
        let slots = match (conn_slot, ip_slot) {
            (Some(c), Some(i)) => Some(Slots {
                _conn: Some(c),
                ip: Some(i),
            }),
            (c, i) => {
                let (need_conn, need_ip) = (c.is_none(), i.is_none());
                let given = handshakes
                    .lock()
                    .ok()
                    .and_then(|mut h| h.evict_for(addr.ip(), need_conn, need_ip));
                given.map(|g| Slots {
                    _conn: c.or(g._conn),
                    ip: i.or(g.ip),
                })
            }
        };
        let Some(slots) = slots else {
            debug!(%addr, "connection refused: connection limit reached, no handshake to evict");
            continue;
        };
        let Some((guard, evicted)) = HandshakeGuard::enter(&handshakes, addr.ip(), slots) else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let svc = svc.clone();
        let shutdown = shutdown.clone();
        let per_peer = per_peer.clone();
        let limits = limits.clone();
        let manifest_turns = manifest_turns.clone();
        tokio::spawn(async move {
            let accepted = tokio::select! {
                _ = evicted.cancelled() => {
                    debug!(%addr, "handshake evicted: a newcomer needed its slot");
                    return;
                }
                r = tokio::time::timeout(limits.handshake, acceptor.accept(tcp)) => r,
            };
            let Some(_slots) = guard.finish() else {
                return;
            };
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
            let Some(_peer_slot) = per_peer.take(peer) else {
                debug!(%addr, peer = %peer.short(), "connection refused: per-peer limit reached");
                return;
            };
            svc.peer_connected(peer, true);
            debug!(%addr, peer = %peer.short(), "peer connected");
            let turns = manifest_turns.of(peer);
            if let Err(e) =
                connection(stream, peer, svc.clone(), shutdown, &limits, turns.clone()).await
            {
                debug!(%addr, peer = %peer.short(), error = %e, "peer connection ended");
            }
            manifest_turns.done(peer, turns);
            svc.peer_connected(peer, false);
        });
    }
}

async fn connection<S: Service>(
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: AgentId,
    svc: Arc<S>,
    shutdown: CancellationToken,
    limits: &Limits,
    manifest_turns: Arc<Semaphore>,
) -> Result<()> {
    let (tcp, mut sealer, mut opener) = channel::server_switch(stream).await?;
    let (rd, wr) = tcp.into_split();
    let mut rd = BufReader::with_capacity(16 << 10, rd);
    // Each answer travels with its request's turn (`limit` below), given
    // back once the answer is written: a peer that reads its answers
    // slowly (or not at all) holds at most PER_CONNECTION_CONCURRENCY of
    // them in this agent. When the turn went back as soon as an answer was
    // queued, that many more were read and sealed behind the queued ones.
    let (tx, mut rx) =
        mpsc::channel::<(Outgoing, Option<OwnedSemaphorePermit>)>(PER_CONNECTION_CONCURRENCY);
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(256 << 10, wr);
        // A shared body (a manifest, a live answer) is copied to be sealed: only with
        // one of the peer's turns, held until it is written.
        let turn = async |f: &Outgoing| match f.payload {
            Body::Shared(_) => manifest_turns.clone().acquire_owned().await.ok(),
            _ => None,
        };
        while let Some((f, _turn)) = rx.recv().await {
            let _copy = turn(&f).await;
            sealer.write(&mut w, f).await?;
            while let Ok((f, _turn)) = rx.try_recv() {
                let _copy = turn(&f).await;
                sealer.write(&mut w, f).await?;
            }
            w.flush()
                .await
                .map_err(|e| Error::Protocol(e.to_string()))?;
        }
        let _ = w.shutdown().await;
        Ok::<_, Error>(())
    });
    let limit = Arc::new(Semaphore::new(PER_CONNECTION_CONCURRENCY));
    let mut ended = Ok(());
    loop {
        let inh = tokio::select! {
            _ = shutdown.cancelled() => break,
            h = tokio::time::timeout(limits.idle, opener.read_header(&mut rd)) => match h {
                Err(_) => {
                    ended = Err(Error::Protocol("idle connection closed".into()));
                    break;
                }
                Ok(Err(e)) => {
                    ended = Err(e);
                    break;
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(h))) => h,
            },
        };
        let header = inh.header;
        // The size is checked on the header, per request type, before any
        // of the body is read; an oversize (or unsealed) frame gets a
        // refusal and the connection is closed.
        let max = request_limit(header.typ).filter(|_| !inh.raw);
        if max.is_none_or(|m| header.len > m) {
            let why = match max {
                Some(m) => format!(
                    "{:?} frame of {} bytes exceeds the {m} byte limit",
                    header.typ, header.len
                ),
                None if inh.raw => format!("{:?} request sent unsealed", header.typ),
                None => format!("{:?} is not a request", header.typ),
            };
            let _ = tx
                .send((
                    Outgoing {
                        typ: FrameType::Failed,
                        id: header.id,
                        payload: why.clone().into_bytes().into(),
                        raw_hash: None,
                    },
                    None,
                ))
                .await;
            // Linger briefly so the refusal is read before the socket closes.
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::io::copy(&mut (&mut rd).take(4 << 20), &mut tokio::io::sink()),
            )
            .await;
            ended = Err(Error::Protocol(why));
            break;
        }
        let payload = match tokio::time::timeout(limits.read, opener.read_body(&mut rd, &inh)).await
        {
            Ok(Ok(p)) => p.payload,
            Ok(Err(e)) => {
                ended = Err(e);
                break;
            }
            Err(_) => {
                ended = Err(Error::Protocol(format!(
                    "a {} byte frame was not delivered within {:?}",
                    header.len, limits.read
                )));
                break;
            }
        };
        let frame = Frame {
            typ: header.typ,
            id: header.id,
            payload,
        };
        if let Ok(Request::Chunk(share, chunk)) = parse_request(frame.typ, &frame.payload) {
            svc.chunk_asked(peer, share, chunk);
        }
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
                Ok((payload, raw_hash)) => Outgoing {
                    typ: FrameType::Ok,
                    id,
                    payload,
                    raw_hash,
                },
                Err(Error::NotFound(m)) => Outgoing {
                    typ: FrameType::NotFound,
                    id,
                    payload: m.into_bytes().into(),
                    raw_hash: None,
                },
                Err(e) => Outgoing {
                    typ: FrameType::Failed,
                    id,
                    payload: e.to_string().into_bytes().into(),
                    raw_hash: None,
                },
            };
            let _ = tx.send((reply, Some(permit))).await;
        });
    }
    drop(tx);
    let written = match writer.await {
        Ok(r) => r,
        Err(e) => Err(Error::Protocol(format!("writer task: {e}"))),
    };
    channel::release_buffers();
    ended.and(written)
}

//! A connection to one peer that many tasks share: each request gets an id,
//! requests are written back to back (pipelined), and answers are routed to
//! whoever asked, in whatever order they come back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::channel::{self, Incoming, Outgoing};
use super::{Frame, FrameType, MAX_MESSAGE, response_limit, tls};
use crate::chunk::{ChunkId, Sealed};
use crate::error::{Context, Error, Result};
use crate::identity::{AgentId, SecretKey};
use crate::manifest::ShareId;

/// Where an answer goes.
type Reply = oneshot::Sender<Result<Incoming>>;

/// Waiting requests: the answer's destination, the largest `Ok` payload
/// the request type may receive, and whether it may come raw (a chunk).
type Pending = Arc<Mutex<HashMap<u32, (Reply, usize, bool)>>>;

/// A live, authenticated connection to a peer.
pub struct PeerConn {
    /// The peer's verified agent id.
    pub peer: AgentId,
    /// The address we dialled.
    pub addr: String,
    tx: mpsc::Sender<(Frame, Reply)>,
    next_id: AtomicU32,
    in_flight: AtomicUsize,
    closed: Arc<AtomicBool>,
    /// Set when a request went unanswered for its whole time limit.
    stalled: AtomicBool,
    /// Set once the peer answered a request (whatever the answer).
    answered: Arc<AtomicBool>,
    /// The task reading answers: stopped when the connection is dropped,
    /// with its half of the socket (it otherwise waited, with no deadline,
    /// for a peer that never closes: a socket leaked per connection).
    reader: tokio::task::AbortHandle,
}

impl Drop for PeerConn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl std::fmt::Debug for PeerConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PeerConn({} at {})", self.peer.short(), self.addr)
    }
}

impl PeerConn {
    /// Dials `addr`, completes TLS with our key, and checks the peer is
    /// `expected` when given.
    pub async fn connect(
        addr: &str,
        key: &SecretKey,
        expected: Option<AgentId>,
    ) -> Result<PeerConn> {
        let cfg = tls::client_config(key, expected)?;
        let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .map_err(|_| Error::Protocol(format!("connecting to {addr} timed out")))?
            .context(|| format!("connecting to {addr}"))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls::pki_types::ServerName::try_from("caravan-agent")
            .map_err(|e| Error::Tls(e.to_string()))?;
        let stream = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
        )
        .await
        .map_err(|_| Error::Tls(format!("TLS handshake with {addr} timed out")))?
        .map_err(|e| Error::Tls(format!("TLS handshake with {addr}: {e}")))?;
        let cert = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| Error::Tls("peer sent no certificate".into()))?;
        let peer = tls::agent_id_of(cert)?;

        let (tcp, mut sealer, mut opener) = channel::client_switch(stream).await?;
        let (rd, wr) = tcp.into_split();
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::channel::<(Frame, Reply)>(256);

        let p = pending.clone();
        let c = closed.clone();
        tokio::spawn(async move {
            let mut w = BufWriter::with_capacity(64 << 10, wr);
            let mut fail = None;
            'outer: while let Some((f, reply)) = rx.recv().await {
                let mut batch = vec![(f, reply)];
                while let Ok(x) = rx.try_recv() {
                    batch.push(x);
                }
                for (f, reply) in batch {
                    match p.lock() {
                        Ok(mut m) => {
                            let raw_ok = f.typ == FrameType::GetChunk;
                            m.insert(f.id, (reply, response_limit(f.typ), raw_ok));
                        }
                        Err(_) => break 'outer,
                    }
                    let out = Outgoing {
                        typ: f.typ,
                        id: f.id,
                        payload: f.payload.into(),
                        raw_hash: None,
                    };
                    if let Err(e) = sealer.write(&mut w, out).await {
                        // Closed before the batch's other replies drop: a
                        // request that learns of the failure sees it closed.
                        c.store(true, Ordering::SeqCst);
                        fail = Some(e);
                        break 'outer;
                    }
                }
                if let Err(e) = w.flush().await {
                    c.store(true, Ordering::SeqCst);
                    fail = Some(Error::Protocol(e.to_string()));
                    break;
                }
            }
            c.store(true, Ordering::SeqCst);
            if let Some(e) = fail {
                tracing::debug!(error = %e, "peer writer stopped");
            }
        });

        let p = pending.clone();
        let c = closed.clone();
        let answered = Arc::new(AtomicBool::new(false));
        let a = answered.clone();
        let reader = tokio::spawn(async move {
            let mut rd = BufReader::with_capacity(64 << 10, rd);
            let why = loop {
                let h = match opener.read_header(&mut rd).await {
                    Ok(Some(h)) => h,
                    Ok(None) => break "peer closed the connection".to_string(),
                    Err(e) => break e.to_string(),
                };
                // Each answer is capped by what its request may receive,
                // before any of it is read; only a chunk comes raw.
                let (max, raw_ok) = match h.header.typ {
                    FrameType::Ok => p
                        .lock()
                        .ok()
                        .and_then(|m| m.get(&h.header.id).map(|(_, max, raw)| (*max, *raw)))
                        .unwrap_or((0, false)),
                    _ => (MAX_MESSAGE, false),
                };
                if h.header.len > max {
                    break format!(
                        "{:?} answer of {} bytes exceeds the {max} byte limit for its request",
                        h.header.typ, h.header.len
                    );
                }
                if h.raw && !raw_ok {
                    break format!("{:?} answer sent unsealed", h.header.typ);
                }
                let body = match opener.read_body(&mut rd, &h).await {
                    Ok(b) => b,
                    Err(e) => break e.to_string(),
                };
                let waiter = match p.lock() {
                    Ok(mut m) => m.remove(&h.header.id),
                    Err(_) => break "state poisoned".to_string(),
                };
                a.store(true, Ordering::Relaxed);
                if let Some((w, _, _)) = waiter {
                    let r = match h.header.typ {
                        FrameType::Ok => Ok(body),
                        // The peer's words, never raw (it may be hostile).
                        FrameType::NotFound => {
                            Err(Error::NotFound(crate::util::peer_text(&body.payload)))
                        }
                        FrameType::Failed => Err(Error::Protocol(format!(
                            "peer refused: {}",
                            crate::util::peer_text(&body.payload)
                        ))),
                        other => Err(Error::Protocol(format!("unexpected {other:?} frame"))),
                    };
                    let _ = w.send(r);
                }
            };
            c.store(true, Ordering::SeqCst);
            if let Ok(mut m) = p.lock() {
                for (_, (w, _, _)) in m.drain() {
                    let _ = w.send(Err(Error::Protocol(why.clone())));
                }
            }
        });

        Ok(PeerConn {
            peer,
            addr: addr.to_string(),
            tx,
            next_id: AtomicU32::new(1),
            in_flight: AtomicUsize::new(0),
            closed,
            stalled: AtomicBool::new(false),
            answered,
            reader: reader.abort_handle(),
        })
    }

    /// True once the connection has failed or closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// True once the peer has answered a request (so it is not one that
    /// takes requests and never answers).
    pub fn answered(&self) -> bool {
        self.answered.load(Ordering::Relaxed)
    }

    /// True once a request went unanswered for its whole time limit.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Relaxed)
    }

    /// Requests currently waiting for an answer (used to pick the least busy connection).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    async fn request(
        &self,
        typ: FrameType,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Incoming> {
        if self.is_closed() {
            return Err(Error::Protocol(format!(
                "connection to {} is closed",
                self.addr
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        // Counted out when the request ends, also when the asker stops
        // waiting (the future dropped).
        struct InFlight<'a>(&'a AtomicUsize);
        impl Drop for InFlight<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.in_flight);
        async {
            self.tx
                .send((Frame { typ, id, payload }, tx))
                .await
                .map_err(|_| Error::Protocol("connection closed".into()))?;
            match tokio::time::timeout(timeout, rx).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err(Error::Protocol("connection closed".into())),
                Err(_) => {
                    self.stalled.store(true, Ordering::Relaxed);
                    Err(Error::Protocol(format!(
                        "{typ:?} to {} timed out",
                        self.addr
                    )))
                }
            }
        }
        .await
    }

    /// Fetches the newest manifest record newer than `have_seq`.
    pub async fn manifest(&self, share: &ShareId, have_seq: u64) -> Result<Vec<u8>> {
        let mut p = share.0.to_vec();
        p.extend_from_slice(&have_seq.to_be_bytes());
        self.request(FrameType::GetManifest, p, Duration::from_secs(60))
            .await
            .map(|b| b.payload)
    }

    /// Asks the publisher what its running publish pass sealed (waits a
    /// little for news): at `at` 0 the file list and the chunk log from its
    /// start, at n + 1 the log from entry n on.
    pub async fn live(&self, share: &ShareId, at: u64) -> Result<Vec<u8>> {
        let mut p = share.0.to_vec();
        p.extend_from_slice(&at.to_be_bytes());
        self.request(FrameType::GetLive, p, Duration::from_secs(60))
            .await
            .map(|b| b.payload)
    }

    /// Fetches one chunk's ciphertext (unverified: the caller verifies,
    /// with the BLAKE3 hash the channel computed on the received bytes).
    pub async fn chunk(&self, share: &ShareId, id: &ChunkId) -> Result<Sealed> {
        let mut p = share.0.to_vec();
        p.extend_from_slice(&id.0);
        let b = self
            .request(FrameType::GetChunk, p, Duration::from_secs(60))
            .await?;
        Ok(match b.hash {
            Some(h) => Sealed::hashed(b.payload, h),
            None => Sealed::from(b.payload),
        })
    }

    /// Asks for the share key, presenting proof records (trust chain).
    pub async fn key(&self, share: &ShareId, proof: &[Vec<u8>]) -> Result<Vec<u8>> {
        let mut p = share.0.to_vec();
        p.extend(postcard::to_stdvec(proof).map_err(|e| Error::Protocol(e.to_string()))?);
        self.request(FrameType::GetKey, p, Duration::from_secs(30))
            .await
            .map(|b| b.payload)
    }

    /// Round-trips an empty request.
    pub async fn ping(&self) -> Result<()> {
        self.request(FrameType::Ping, Vec::new(), Duration::from_secs(10))
            .await
            .map(|_| ())
    }
}

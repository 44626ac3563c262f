//! The peers serving one fetch: connections to each, strikes against the
//! ones that send corrupt chunks, and the verified get of one chunk. The
//! publisher's bucket (offline seeding, `seed.rs`) is one more source.
//!
//! A peer that goes away (a restarted daemon, a rescheduled pod, a dropped
//! connection) is dialled again, the same agent at the same address, when
//! no connection is left to ask: a few times per fetch with growing pauses
//! ([`REVIVALS`], 15.5 s of pauses in all), then the fetch fails as before, and
//! keeps what it verified for the next attempt.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::StreamExt;

use crate::chunk::{self, ChunkRef, Verified};
use crate::error::{Error, Result};
use crate::identity::{AgentId, SecretKey};
use crate::manifest::ShareId;
use crate::node::agent::Agent;
use crate::node::fetch::progress::FetchProgress;
use crate::node::fetch::seed::{SEED_WINDOW, SeedSource};
use crate::node::metrics::Metrics;
use crate::node::tuning;
use crate::wire::client::PeerConn;

/// How long the dials still out wait once one peer answered.
const SETTLE: Duration = Duration::from_secs(1);

/// Corrupt chunks after which a peer is no longer asked.
const BAN_AFTER: u32 = 8;

/// Rounds of dialling lost peers again, per fetch; round `n` waits
/// `500 ms * 2^n` (at most 8 s) first.
const REVIVALS: u32 = 5;

/// The peers serving one fetch, and what we think of them.
pub(crate) struct Swarm {
    share: ShareId,
    /// Open (or lately closed) connections; revived ones replace closed ones.
    conns: Mutex<Vec<Arc<PeerConn>>>,
    /// Whether any peer answered at the start (else the bucket is the source).
    had_peers: bool,
    /// Who was reached where: what a revival dials again.
    reached: Vec<(String, AgentId)>,
    key: SecretKey,
    /// Revival rounds spent; one revival at a time.
    revivals: tokio::sync::Mutex<u32>,
    strikes: Mutex<HashMap<AgentId, u32>>,
    metrics: Metrics,
    progress: Arc<FetchProgress>,
    /// The publisher's bucket, when the share is seeded offline.
    pub(crate) seed: Option<Arc<SeedSource>>,
}

impl Swarm {
    pub(crate) async fn connect(
        agent: &Agent,
        addrs: &[String],
        share: ShareId,
        progress: Arc<FetchProgress>,
        seed: Option<Arc<SeedSource>>,
    ) -> Result<Swarm> {
        let attempts: Vec<_> = addrs
            .iter()
            .flat_map(|a| std::iter::repeat_n(a.clone(), tuning::conns_per_peer()))
            .map(|addr| {
                let key = agent.key.clone();
                async move {
                    let r = PeerConn::connect(&addr, &key, None).await;
                    (addr, r)
                }
            })
            .collect();
        // Dialled in order, 8 at a time; once one peer has answered, the
        // dials still out get `SETTLE` more, and the fetch goes with what
        // answered: an address that accepts and says nothing (announced by
        // anyone) costs a TLS deadline per dial, 40 s for 16 of them.
        let mut dials = futures::stream::iter(attempts).buffer_unordered(8);
        let mut results: Vec<(String, Result<PeerConn>)> = Vec::new();
        let mut settle: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let next = match settle.as_mut() {
                None => dials.next().await,
                Some(until) => tokio::select! {
                    r = dials.next() => r,
                    _ = until => break,
                },
            };
            let Some((addr, r)) = next else { break };
            if settle.is_none() && r.as_ref().is_ok_and(|c| c.peer != agent.id) {
                settle = Some(Box::pin(tokio::time::sleep(SETTLE)));
            }
            results.push((addr, r));
        }
        drop(dials);
        let mut conns = Vec::new();
        let mut errors = Vec::new();
        for (addr, r) in results {
            match r {
                Ok(c) if c.peer == agent.id => {}
                Ok(c) => conns.push(Arc::new(c)),
                Err(e) => {
                    agent.metrics.error("connect");
                    tracing::warn!(%addr, error = %e, "peer unreachable");
                    errors.push(format!("{addr}: {e}"));
                }
            }
        }
        if conns.is_empty() && seed.is_none() {
            errors.dedup();
            return Err(Error::Unreachable(format!(
                "no peer reachable for share {share}{}: its publisher and any other \
                 holder are offline or cannot be reached from here; fetch the same \
                 ticket again once one is up",
                if errors.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", errors.join("; "))
                }
            )));
        }
        let mut ids: Vec<String> = conns.iter().map(|c| c.peer.to_string()).collect();
        ids.sort();
        ids.dedup();
        if let Ok(mut p) = progress.peers.lock() {
            *p = ids;
        }
        let mut reached: Vec<(String, AgentId)> =
            conns.iter().map(|c| (c.addr.clone(), c.peer)).collect();
        reached.sort();
        reached.dedup();
        Ok(Swarm {
            share,
            had_peers: !conns.is_empty(),
            conns: Mutex::new(conns),
            reached,
            key: agent.key.clone(),
            revivals: tokio::sync::Mutex::new(0),
            strikes: Mutex::new(HashMap::new()),
            metrics: agent.metrics.clone(),
            progress,
            seed,
        })
    }

    fn conns(&self) -> Vec<Arc<PeerConn>> {
        self.conns.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// One connection per distinct peer.
    pub(crate) fn distinct(&self) -> Vec<Arc<PeerConn>> {
        let mut seen = HashSet::new();
        self.conns()
            .into_iter()
            .filter(|c| seen.insert(c.peer))
            .collect()
    }

    /// Dials the peers whose connections all closed again, when none is
    /// open: true when one is (or another caller revived one meanwhile).
    /// Bounded by [`REVIVALS`] rounds per fetch.
    async fn revive(&self) -> bool {
        self.revive_where(|_| true).await
    }

    /// [`Swarm::revive`] of one peer (the publisher, whose running pass a
    /// live fetch follows): true when a connection to it is open or was
    /// dialled again. The same rounds, counted with the others.
    pub(crate) async fn revive_peer(&self, peer: AgentId) -> bool {
        self.revive_where(|p| *p == peer).await
    }

    async fn revive_where(&self, wanted: impl Fn(&AgentId) -> bool) -> bool {
        let mut rounds = self.revivals.lock().await;
        loop {
            if self
                .conns()
                .iter()
                .any(|c| !c.is_closed() && wanted(&c.peer))
            {
                return true;
            }
            if *rounds >= REVIVALS {
                return false;
            }
            let pause = Duration::from_millis(500 << (*rounds).min(4));
            *rounds += 1;
            tokio::time::sleep(pause).await;
            for (addr, peer) in &self.reached {
                if self.banned(peer) || !wanted(peer) {
                    continue;
                }
                let mut fresh = Vec::new();
                for _ in 0..tuning::conns_per_peer() {
                    match PeerConn::connect(addr, &self.key, Some(*peer)).await {
                        Ok(c) => fresh.push(Arc::new(c)),
                        Err(e) => {
                            self.metrics.error("connect");
                            tracing::info!(%addr, peer = %peer.short(), round = *rounds, error = %e, "a lost peer is still unreachable");
                            break;
                        }
                    }
                }
                if fresh.is_empty() {
                    continue;
                }
                tracing::info!(%addr, peer = %peer.short(), round = *rounds, "reconnected to a lost peer");
                if let Ok(mut conns) = self.conns.lock() {
                    conns.retain(|c| !c.is_closed());
                    conns.extend(fresh);
                }
            }
        }
    }

    /// An open connection to `peer`, if any.
    pub(crate) fn open_to(&self, peer: &AgentId) -> Option<Arc<PeerConn>> {
        self.conns()
            .into_iter()
            .find(|c| c.peer == *peer && !c.is_closed())
    }

    /// Whether `peer` answered when the fetch started (so it may be
    /// dialled again).
    pub(crate) fn reached(&self, peer: &AgentId) -> bool {
        self.reached.iter().any(|(_, p)| p == peer)
    }

    fn banned(&self, peer: &AgentId) -> bool {
        self.strikes
            .lock()
            .map(|s| s.get(peer).copied().unwrap_or(0) >= BAN_AFTER)
            .unwrap_or(false)
    }

    fn pick(&self, avoid: &HashSet<AgentId>) -> Option<Arc<PeerConn>> {
        let conns = self.conns();
        // Peers that have answered something (on any of their connections)
        // first: one that takes requests and never answers is asked last.
        let answered: HashSet<AgentId> = conns
            .iter()
            .filter(|c| c.answered())
            .map(|c| c.peer)
            .collect();
        conns
            .into_iter()
            .filter(|c| !c.is_closed() && !avoid.contains(&c.peer) && !self.banned(&c.peer))
            .min_by_key(|c| (!answered.contains(&c.peer), c.in_flight()))
    }

    /// Whether a peer other than `peer` (and those in `avoid`) that has
    /// answered something could be asked instead.
    fn another_answering(&self, peer: &AgentId, avoid: &HashSet<AgentId>) -> bool {
        self.conns().iter().any(|c| {
            c.peer != *peer
                && c.answered()
                && !c.is_closed()
                && !avoid.contains(&c.peer)
                && !self.banned(&c.peer)
        })
    }

    /// Gets one chunk, verified (not yet opened: the writer decrypts it
    /// where it goes), trying other peers when one fails or lies.
    pub(crate) async fn get(&self, r: ChunkRef) -> Result<Verified> {
        let mut avoid = HashSet::new();
        let mut last = None;
        if let Some(seed) = &self.seed {
            match self.get_seeded(seed, &r).await {
                Some(Ok(plain)) => return Ok(plain),
                Some(Err(e)) if !self.had_peers => {
                    return Err(Error::Protocol(format!(
                        "chunk {}: the publisher's bucket failed ({e}) and no live peer holds the share",
                        r.id
                    )));
                }
                Some(Err(e)) => last = Some(e),
                None => {}
            }
        }
        // Peers that sent this chunk corrupt: never asked for it again,
        // even after a revival (which forgets the ones that merely failed).
        let mut lied = HashSet::new();
        let mut asks = self.conns().len() + 2;
        let mut revivals = 0;
        let mut lost = false;
        loop {
            if asks == 0 {
                // No connection left to ask. When one we asked closed
                // (not merely failed, stalled or lied), dial the lost peers
                // again (bounded per fetch); else give up.
                revivals += 1;
                if !lost || revivals > REVIVALS + 1 || !self.had_peers || !self.revive().await {
                    break;
                }
                avoid.retain(|p| lied.contains(p));
                asks = self.conns().len() + 2;
            }
            asks -= 1;
            let Some(conn) = self.pick(&avoid) else {
                // Nothing to ask: some connection may have closed before
                // this chunk asked it.
                lost |= self.conns().iter().any(|c| c.is_closed());
                asks = 0;
                continue;
            };
            // Waited for as long as a request may take only when no other
            // peer that answers could be asked instead (`slow_answer`).
            let asked = conn.chunk(&self.share, &r.id);
            let answer = if self.another_answering(&conn.peer, &avoid) {
                match tokio::time::timeout(tuning::slow_answer(), asked).await {
                    Ok(a) => a,
                    Err(_) => {
                        self.metrics.peer_error(&conn.peer.short(), "slow");
                        tracing::debug!(peer = %conn.peer.short(), "chunk answer too slow; asking another peer");
                        if let Ok(mut s) = self.strikes.lock() {
                            *s.entry(conn.peer).or_default() += BAN_AFTER / 2;
                        }
                        avoid.insert(conn.peer);
                        last = Some(Error::Protocol(format!(
                            "chunk {}: {} answered slower than {} s",
                            r.id,
                            conn.peer.short(),
                            tuning::slow_answer().as_secs()
                        )));
                        continue;
                    }
                }
            } else {
                asked.await
            };
            match answer {
                Ok(ct) => {
                    let n = ct.len() as u64;
                    self.metrics.bytes_received.inc_by(n);
                    self.progress.bytes_received.fetch_add(n, Ordering::Relaxed);
                    match chunk::verify(&r, ct) {
                        Ok(v) => {
                            self.metrics.chunks_received.inc();
                            self.progress.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                            return Ok(v);
                        }
                        Err(e) => {
                            self.metrics.chunks_rejected.inc();
                            self.metrics.peer_error(&conn.peer.short(), "corrupt_chunk");
                            tracing::warn!(peer = %conn.peer.short(), error = %e, "rejected a corrupt chunk; asking another peer");
                            if let Ok(mut s) = self.strikes.lock() {
                                *s.entry(conn.peer).or_default() += 1;
                            }
                            avoid.insert(conn.peer);
                            lied.insert(conn.peer);
                            last = Some(e);
                        }
                    }
                }
                Err(e) => {
                    lost |= conn.is_closed();
                    self.metrics.error("peer_request");
                    self.metrics.peer_error(&conn.peer.short(), "request");
                    // A request left unanswered for its whole time limit
                    // is a heavy strike: a peer that takes requests and
                    // never answers (anyone may announce a share) is out
                    // after two, rather than costing every chunk a minute.
                    if conn.stalled()
                        && let Ok(mut s) = self.strikes.lock()
                    {
                        *s.entry(conn.peer).or_default() += BAN_AFTER / 2;
                    }
                    tracing::debug!(peer = %conn.peer.short(), error = %e, "chunk request failed; asking another peer");
                    avoid.insert(conn.peer);
                    last = Some(e);
                }
            }
        }
        match last {
            // Every connection closed and none came back: say so, and how
            // to go on, rather than the last socket error alone.
            // The same when this chunk never got to ask anyone because
            // every connection had already closed (`last` is `None`).
            e if lost && !matches!(e, Some(Error::CorruptChunk { .. })) => {
                let last = e.map(|e| format!(" (last: {e})")).unwrap_or_default();
                Err(Error::Unreachable(format!(
                    "chunk {}: every peer holding the share went away and none came back after \
                     {REVIVALS} rounds of redialling{last}; fetch the same ticket again \
                     to continue, verified chunks are kept",
                    r.id
                )))
            }
            // Every peer answered "not found": the version being fetched is
            // no longer served, as when the publisher published a newer one
            // meanwhile (its daemon serves the newest version only).
            // Or the publisher's file was edited in place without a new
            // version: fetching again fails the same way until it
            // publishes one, so that is what is said.
            Some(Error::NotFound(m)) if m.contains("changed since it was published") => {
                Err(Error::NotFound(format!(
                    "{m}: the publisher's copy no longer holds this version; it must publish \
                     a new version of the share (`caravan-agent publish PATH --share {}`), \
                     then fetch the same ticket again (verified chunks are kept)",
                    self.share
                )))
            }
            Some(Error::NotFound(m)) => Err(Error::NotFound(format!(
                "{m}: no peer serves this version of the share any more; the publisher \
                 has probably published a newer one: fetch the same ticket again to get it"
            ))),
            Some(e) => Err(e),
            None => Err(Error::Protocol(format!(
                "no usable peer has chunk {}",
                r.id
            ))),
        }
    }

    /// Asks the bucket for a chunk when it is the better source: always
    /// without live peers, else while its window has room. `None`: not
    /// asked. A failure is a strike against the bucket.
    async fn get_seeded(&self, seed: &SeedSource, r: &ChunkRef) -> Option<Result<Verified>> {
        let peers = self.had_peers;
        if peers && (!seed.usable() || seed.in_flight() >= SEED_WINDOW) {
            return None;
        }
        if !seed.has(r).await {
            if peers {
                return None;
            }
            return Some(Err(Error::NotFound(format!(
                "chunk {} is not in the publisher's bucket",
                r.id
            ))));
        }
        match seed.get(r).await {
            Ok((plain, n)) => {
                self.metrics.bytes_received.inc_by(n);
                self.metrics.chunks_received.inc();
                self.progress.bytes_received.fetch_add(n, Ordering::Relaxed);
                self.progress.chunks_fetched.fetch_add(1, Ordering::Relaxed);
                Some(Ok(plain))
            }
            Err(e) => {
                seed.strike();
                if matches!(e, Error::CorruptChunk { .. }) {
                    self.metrics.chunks_rejected.inc();
                }
                self.metrics.peer_error("bucket", "seed");
                tracing::warn!(chunk = %r.id, error = %e, "the publisher's bucket failed a chunk; asking a live peer");
                Some(Err(e))
            }
        }
    }
}

//! Connection caps for every listener a stranger can reach: the peer
//! listener (`wire::server`, which adds its own handshake rules) and the
//! HTTP listeners (the repository, the agent's admin API and metrics).
//!
//! Rate limits count requests; they do nothing against connections that
//! are opened and then left idle or fed a byte at a time (slowloris): each
//! one costs a socket and a task for as long as the client likes. So an
//! HTTP listener here admits a bounded number of connections in total and
//! per client address (a trusted proxy, e.g. the ingress, is exempt from
//! the per-address cap: every client behind it shares its address), and
//! closes a connection on which nothing was read or written for
//! [`HttpLimits::idle`] (a half-sent request, a keep-alive connection left
//! open, a client that stops reading its answer).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Counts open connections per key; a slot is given back when dropped.
pub(crate) struct Counter<K: std::hash::Hash + Eq + Copy> {
    map: Mutex<HashMap<K, usize>>,
    max: usize,
}

/// One counted connection of key `K`.
pub(crate) struct Slot<K: std::hash::Hash + Eq + Copy + Send + 'static>(Arc<Counter<K>>, K);

impl<K: std::hash::Hash + Eq + Copy + Send + 'static> Counter<K> {
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Counter {
            map: Mutex::new(HashMap::new()),
            max,
        })
    }

    /// A slot for `k`, unless `k` already holds the most allowed.
    pub(crate) fn take(self: &Arc<Self>, k: K) -> Option<Slot<K>> {
        let mut m = self.map.lock().ok()?;
        let n = m.entry(k).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(Slot(self.clone(), k))
    }
}

impl<K: std::hash::Hash + Eq + Copy + Send + 'static> Drop for Slot<K> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.0.map.lock()
            && let Some(n) = m.get_mut(&self.1)
        {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// An address range (`10.0.0.0/8`, `fd00::/8`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is inside the range (IPv4-mapped IPv6 counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s.trim(), None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or CIDR range (e.g. 10.0.0.0/8)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

/// The caps of one HTTP listener.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// Open connections in total (`CARAVAN_HTTP_MAX_CONNS`).
    pub max_conns: usize,
    /// Open connections per client address (`CARAVAN_HTTP_MAX_CONNS_PER_IP`).
    pub max_conns_per_ip: usize,
    /// A connection on which nothing moved for this long is closed
    /// (`CARAVAN_HTTP_IDLE_SECS`); `None` for a listener whose answers may
    /// legitimately take long to start (the admin API answers a publish
    /// when its pass ends).
    pub idle: Option<Duration>,
    /// Addresses exempt from the per-address cap (trusted proxies).
    pub exempt: Vec<Cidr>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_conns: 1024,
            max_conns_per_ip: 64,
            idle: Some(Duration::from_secs(30)),
            exempt: Vec::new(),
        }
    }
}

impl HttpLimits {
    /// The defaults, with any environment overrides applied.
    pub fn from_env() -> Self {
        use crate::util::{env_positive as n, env_secs};
        let d = HttpLimits::default();
        let idle = env_secs("CARAVAN_HTTP_IDLE_SECS").or(d.idle);
        HttpLimits {
            max_conns: n("CARAVAN_HTTP_MAX_CONNS", d.max_conns),
            max_conns_per_ip: n("CARAVAN_HTTP_MAX_CONNS_PER_IP", d.max_conns_per_ip),
            idle,
            exempt: Vec::new(),
        }
    }
}

/// A TCP listener for `axum::serve` that applies [`HttpLimits`]: over a
/// cap, an accepted socket is closed at once (no request read, no task).
pub struct CappedListener {
    inner: TcpListener,
    total: Arc<Semaphore>,
    per_ip: Arc<Counter<IpAddr>>,
    limits: HttpLimits,
}

impl CappedListener {
    /// Wraps `inner`.
    pub fn new(inner: TcpListener, limits: HttpLimits) -> Self {
        CappedListener {
            inner,
            total: Arc::new(Semaphore::new(limits.max_conns)),
            per_ip: Counter::new(limits.max_conns_per_ip),
            limits,
        }
    }

    fn admit(&self, ip: IpAddr) -> Option<(OwnedSemaphorePermit, Option<Slot<IpAddr>>)> {
        let conn = self.total.clone().try_acquire_owned().ok()?;
        if self.limits.exempt.iter().any(|c| c.contains(ip)) {
            return Some((conn, None));
        }
        let ip_slot = self.per_ip.take(ip)?;
        Some((conn, Some(ip_slot)))
    }
}

impl axum::serve::Listener for CappedListener {
    type Io = CappedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (CappedIo, SocketAddr) {
        loop {
            let (tcp, addr) = match self.inner.accept().await {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: wait, not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some((conn, ip)) = self.admit(addr.ip()) else {
                tracing::debug!(%addr, "HTTP connection refused: connection limit reached");
                continue;
            };
            let idle = self.limits.idle;
            return (
                CappedIo {
                    tcp,
                    idle,
                    deadline: idle.map(|d| Box::pin(tokio::time::sleep(d))),
                    _conn: conn,
                    _ip: ip,
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An admitted connection: holds its slots until dropped, and fails its
/// reads and writes once nothing moved on it for the idle time.
pub struct CappedIo {
    tcp: TcpStream,
    idle: Option<Duration>,
    deadline: Option<Pin<Box<Sleep>>>,
    _conn: OwnedSemaphorePermit,
    _ip: Option<Slot<IpAddr>>,
}

impl CappedIo {
    fn moved(&mut self) {
        if let (Some(idle), Some(deadline)) = (self.idle, self.deadline.as_mut())
            && let Some(at) = Instant::now().checked_add(idle)
        {
            deadline.as_mut().reset(at);
        }
    }

    /// What a write returned, with the idle clock restarted when bytes
    /// went out, or checked when none could.
    fn wrote(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    self.moved();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.pending(cx),
        }
    }

    /// Pending, or an error once the idle time passed.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let Some(deadline) = self.deadline.as_mut() else {
            return Poll::Pending;
        };
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "connection idle for too long",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for CappedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.tcp).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.moved();
                }
                Poll::Ready(r)
            }
            Poll::Pending => this.pending(cx),
        }
    }
}

impl AsyncWrite for CappedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_write(cx, data);
        this.wrote(cx, r)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.tcp).poll_write_vectored(cx, bufs);
        this.wrote(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn serve(limits: HttpLimits) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
        tokio::spawn(async move { axum::serve(CappedListener::new(l, limits), app).await });
        addr
    }

    async fn closed_within(s: &mut TcpStream, d: Duration) -> bool {
        let mut buf = [0u8; 1024];
        let until = Instant::now() + d;
        loop {
            match tokio::time::timeout_at(until, s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    async fn get(addr: SocketAddr) -> bool {
        let Ok(mut s) = TcpStream::connect(addr).await else {
            return false;
        };
        let req = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        if s.write_all(req).await.is_err() {
            return false;
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).ends_with("hi")
    }

    #[tokio::test]
    async fn half_sent_requests_are_cut_and_caps_hold() {
        let addr = serve(HttpLimits {
            max_conns: 8,
            max_conns_per_ip: 4,
            idle: Some(Duration::from_millis(300)),
            exempt: Vec::new(),
        })
        .await;
        // Four half-sent requests fill this address's cap...
        let mut held = Vec::new();
        for _ in 0..4 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost:").await.unwrap();
            held.push(s);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // ...so a fifth connection is closed at once, unanswered...
        let mut fifth = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut fifth, Duration::from_millis(200)).await);
        // ...until the idle time cuts the half-sent ones.
        for s in &mut held {
            assert!(closed_within(s, Duration::from_secs(5)).await);
        }
        assert!(get(addr).await, "a whole request after the cut");
    }

    #[tokio::test]
    async fn a_trusted_proxy_is_held_only_to_the_total() {
        let addr = serve(HttpLimits {
            max_conns: 6,
            max_conns_per_ip: 1,
            idle: Some(Duration::from_secs(5)),
            exempt: vec!["127.0.0.0/8".parse().unwrap()],
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..5 {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        assert!(get(addr).await, "the sixth connection from the proxy");
        drop(held);
    }
}

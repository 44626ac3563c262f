//! The per-client request rate limit: governor's keyed GCRA limiter (one
//! bucket per client address, no lock per request), with the client address
//! taken from `X-Forwarded-For` only when the connection comes from a trusted
//! proxy (behind an ingress every request arrives from the ingress' address,
//! so keying on the socket address would put every client in one bucket).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::http::HeaderMap;
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::conn_limits::Cidr;

/// Client addresses remembered at most; past it, buckets that have refilled
/// are dropped, and if that is not enough the limiter starts afresh.
const MAX_RATE_CLIENTS: usize = 100_000;
/// Most `X-Forwarded-For` entries looked at (a hostile header may be long).
const MAX_FORWARDED_HOPS: usize = 16;

/// The address a request is accounted to: the peer's, unless the peer is a
/// trusted proxy; then the right-most `X-Forwarded-For` entry that is not a
/// trusted proxy (entries left of it are written by the client and can be
/// forged; the right-most ones were appended by our own proxies).
pub(super) fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut hops: Vec<IpAddr> = Vec::new();
    for value in headers.get_all("x-forwarded-for") {
        let Ok(text) = value.to_str() else {
            return peer;
        };
        for part in text.split(',') {
            if hops.len() >= MAX_FORWARDED_HOPS * 4 {
                break;
            }
            match part.trim().parse::<IpAddr>() {
                Ok(ip) => hops.push(ip),
                // A malformed entry ends what can be believed.
                Err(_) => hops.clear(),
            }
        }
    }
    hops.iter()
        .rev()
        .take(MAX_FORWARDED_HOPS)
        .find(|ip| !is_trusted(**ip))
        .copied()
        .unwrap_or(peer)
}

/// Keyed limiter, replaced wholesale when it remembers too many clients.
pub(super) struct RateLimiter {
    quota: Quota,
    inner: RwLock<Arc<DefaultKeyedRateLimiter<IpAddr>>>,
}

impl RateLimiter {
    /// `rate_per_second` steady (at least one request per hour), `burst` at most.
    pub(super) fn new(rate_per_second: f64, burst: u32) -> Self {
        let period = if rate_per_second.is_finite() && rate_per_second > 0.0 {
            Duration::from_secs_f64((1.0 / rate_per_second).min(3600.0))
        } else {
            Duration::from_secs(3600)
        };
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        RateLimiter {
            quota,
            inner: RwLock::new(Arc::new(DefaultKeyedRateLimiter::keyed(quota))),
        }
    }

    /// Takes one request for `ip`; false when it is over its rate.
    pub(super) fn allow(&self, ip: IpAddr) -> bool {
        let limiter = match self.inner.read() {
            Ok(l) => l.clone(),
            Err(_) => return true,
        };
        if limiter.len() >= MAX_RATE_CLIENTS {
            limiter.retain_recent();
            if limiter.len() >= MAX_RATE_CLIENTS
                && let Ok(mut w) = self.inner.write()
            {
                *w = Arc::new(DefaultKeyedRateLimiter::keyed(self.quota));
            }
        }
        limiter.check_key(&ip).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.1.2.3")) && !c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.9.9.9")), "IPv4-mapped");
        let one: Cidr = "192.0.2.7".parse().unwrap();
        assert!(one.contains(ip("192.0.2.7")) && !one.contains(ip("192.0.2.8")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "x/8", "10.0.0.0/", "::/129"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap()];
        // Not from a proxy: the header is ignored (anyone can send it).
        assert_eq!(
            client_ip(ip("203.0.113.5"), &xff("1.2.3.4"), &trusted),
            ip("203.0.113.5")
        );
        // From the ingress: the client it saw.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff("198.51.100.7"), &trusted),
            ip("198.51.100.7")
        );
        // A client forging entries: the right-most untrusted one counts.
        assert_eq!(
            client_ip(
                ip("10.0.0.2"),
                &xff("1.1.1.1, 198.51.100.7, 10.0.0.9"),
                &trusted
            ),
            ip("198.51.100.7")
        );
        // Garbage after a good entry: nothing believable, the proxy itself.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff("198.51.100.7, garbage"), &trusted),
            ip("10.0.0.2")
        );
        // No trusted proxies configured: always the socket address.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff("198.51.100.7"), &[]),
            ip("10.0.0.2")
        );
        // A hostile, very long header is bounded and still answers.
        let long = vec!["198.51.100.1"; 10_000].join(",");
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff(&long), &trusted),
            ip("198.51.100.1")
        );
    }

    #[test]
    fn each_client_gets_its_own_burst() {
        let l = RateLimiter::new(1.0, 3);
        let a = ip("198.51.100.1");
        let b = ip("198.51.100.2");
        assert!((0..3).all(|_| l.allow(a)));
        assert!(!l.allow(a), "a is over its burst");
        assert!(l.allow(b), "b has its own bucket");
    }
}

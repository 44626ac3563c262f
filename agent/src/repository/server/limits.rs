//! The per-client request rate limit: one token bucket per address,
//! bounded in the number of addresses it remembers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Client addresses remembered at most; past it refilled buckets are
/// dropped (all of them if that is not enough).
const MAX_RATE_CLIENTS: usize = 100_000;

struct TokenBucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets per client address.
#[derive(Default)]
pub(super) struct RateLimiter {
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
}

impl RateLimiter {
    /// Takes one token for `ip` (steady `rate` per second, `burst` at most);
    /// false when there is none left.
    pub(super) fn allow(&self, ip: IpAddr, rate_per_second: f64, rate_burst: u32) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        let now = Instant::now();
        if buckets.len() >= MAX_RATE_CLIENTS {
            let rate = rate_per_second.max(1e-9);
            let burst = rate_burst as f64;
            // Drop clients whose bucket has refilled anyway.
            buckets
                .retain(|_, b| b.tokens + now.duration_since(b.last).as_secs_f64() * rate < burst);
            if buckets.len() >= MAX_RATE_CLIENTS {
                buckets.clear();
            }
        }
        let burst = rate_burst.max(1) as f64;
        let b = buckets.entry(ip).or_insert(TokenBucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * rate_per_second).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

//! The revocation feed: a gap-free numbered sequence of revocations in
//! storage, and finding its head on start.

use super::*;

impl Repository {
    /// First feed number not yet written, at or after `from` (entries are
    /// contiguous, so galloping then bisecting on `exists` finds it).
    pub(super) async fn find_feed_head(&self, from: u64) -> Result<u64> {
        let exists = |n: u64| {
            let p = feed_path(n);
            async move { self.op.exists(&p).await.context(|| format!("checking {p}")) }
        };
        if !exists(from).await? {
            return Ok(from);
        }
        let (mut lo, mut step) = (from, 1u64);
        // lo exists; find hi = lo + step that does not.
        for _ in 0..64 {
            if exists(lo.saturating_add(step)).await? {
                lo = lo.saturating_add(step);
                step = step.saturating_mul(2);
            } else {
                break;
            }
        }
        let mut hi = lo.saturating_add(step);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if exists(mid).await? {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(hi)
    }

    pub(super) async fn append_feed(&self, bytes: &[u8]) -> Result<u64> {
        let mut head = self.feed_lock.lock().await;
        let mut n = self.find_feed_head(*head).await?;
        for _ in 0..FEED_ATTEMPTS {
            let path = feed_path(n);
            match self
                .op
                .write_with(&path, bytes.to_vec())
                .if_not_exists(true)
                .await
            {
                Ok(_) => {
                    *head = n + 1;
                    return Ok(n);
                }
                Err(e) if e.kind() == ErrorKind::ConditionNotMatch => {
                    n = self.find_feed_head(n + 1).await?;
                }
                Err(e) if e.kind() == ErrorKind::Unsupported => {
                    if self
                        .op
                        .exists(&path)
                        .await
                        .context(|| format!("checking {path}"))?
                    {
                        n = self.find_feed_head(n + 1).await?;
                        continue;
                    }
                    self.op
                        .write(&path, bytes.to_vec())
                        .await
                        .context(|| format!("writing {path}"))?;
                    *head = n + 1;
                    return Ok(n);
                }
                Err(e) => {
                    // Some S3 implementations answer a failed precondition
                    // with another status (moto: 403); if the entry exists
                    // now, somebody else took this number.
                    if self.op.exists(&path).await.unwrap_or(false) {
                        n = self.find_feed_head(n + 1).await?;
                        continue;
                    }
                    return Err(Error::Storage {
                        context: format!("appending {path}"),
                        source: e,
                    });
                }
            }
        }
        Err(Error::Protocol(format!(
            "could not append to the revocation feed after {FEED_ATTEMPTS} attempts (contention)"
        )))
    }
}

//! Tuning knobs read from the environment, all in one place (for
//! benchmarks and fault-injection tests; deployments need none of them).

use std::time::Duration;

use crate::util::{env_positive as positive, env_secs};

/// Connections opened to each peer (`CARAVAN_CONNS_PER_PEER`, default 2):
/// spreads TLS work over cores.
pub fn conns_per_peer() -> usize {
    positive("CARAVAN_CONNS_PER_PEER", 2)
}

/// Chunks requested ahead within one file (`CARAVAN_WINDOW`, default 16).
pub fn window() -> usize {
    positive("CARAVAN_WINDOW", 16)
}

/// Files written at once (`CARAVAN_FILE_CONCURRENCY`, default 16): many
/// small files keep the pipe full only when many are written together.
pub fn file_concurrency() -> usize {
    positive("CARAVAN_FILE_CONCURRENCY", 16)
}

/// Files the publish pass reads and seals at once (`CARAVAN_PUBLISH_FILES`).
/// Each holds up to two blocks of `block` bytes (the largest a file of this
/// pass reads at a time). Default: 4 on a local filesystem; on remote
/// storage, where each file's stream waits a round trip before its first
/// byte, as many as fit 32 MiB of blocks (8 files of 2 MiB, 2 of 8 MiB or
/// more), at least 2. With 64 MiB (4 files of 8 MiB) a live S3 publisher
/// of 4 x 64 MiB peaked at 122–155 MiB; with 2 files, 94–110 MiB and as
/// fast (moto, 16 x 16 MiB and 4 x 64 MiB, interleaved).
pub fn publish_files(local: bool, block: u64) -> usize {
    let remote = ((32u64 << 20) / (2 * block.max(1))).clamp(2, 16) as usize;
    positive("CARAVAN_PUBLISH_FILES", if local { 4 } else { remote })
}

/// Sealed chunks the publisher keeps for recipients following its publish
/// pass, in MiB across all shares (`CARAVAN_SEALED_CACHE_MIB`, default 32).
pub fn sealed_cache_bytes() -> usize {
    positive("CARAVAN_SEALED_CACHE_MIB", 32) << 20
}

/// Chunks one fetch holds in memory at once, across all its files
/// (`CARAVAN_CHUNKS_IN_MEMORY`, default 48): bounds the fetcher's memory
/// whatever the file count.
pub fn chunks_in_memory() -> usize {
    positive("CARAVAN_CHUNKS_IN_MEMORY", 48)
}

/// Bytes buffered per part when a fetched file is written to an object
/// store (`CARAVAN_OBJECT_PART_BYTES`, default 5 MiB, the smallest part S3
/// accepts but the last): every file being written holds at most one part,
/// so 16 files at once stay inside the fetcher's memory budget.
pub fn object_part_bytes() -> usize {
    positive("CARAVAN_OBJECT_PART_BYTES", 5 << 20)
}

/// Largest fetched file written to S3 as one streamed PUT instead of a
/// multipart upload (`CARAVAN_STREAMED_PUT_MAX_BYTES`, default 200 MiB, as
/// rclone's `--s3-upload-cutoff`; `0` turns streamed PUTs off): see
/// `store/streamed_put.rs`. Bigger files keep multipart uploads, whose
/// parts go out several at once and are retried one by one; at this size a
/// failed PUT costs at most 200 MiB fetched again, and the fetch's progress
/// moves at least every 200 MiB. Measured on moto, 12 files of 85 MiB
/// bucket to bucket: at 64 MiB (multipart) 119 MB/s against rclone's 237,
/// moto spending 11.0 CPU-s against 6.7, recipient peak 155 MiB; at 200 MiB
/// (one PUT each, as rclone sends them) 199 MB/s against 234, moto 6.9
/// CPU-s, recipient peak 104 MiB.
pub fn streamed_put_max_bytes() -> u64 {
    std::env::var("CARAVAN_STREAMED_PUT_MAX_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200 << 20)
}

/// How long a fetch following a publish pass waits for the pass to list
/// something new (its file list, a file's next chunks) before it gives the
/// pass up as stalled (`CARAVAN_LIVE_STALL_SECS`, default 600): a
/// publisher answering "running, nothing new" for ever would hold the
/// fetch for ever.
pub fn live_stall() -> Duration {
    env_secs("CARAVAN_LIVE_STALL_SECS").unwrap_or(Duration::from_secs(600))
}

/// How long a chunk request waits for its peer before the chunk is asked
/// of another peer that has answered (`CARAVAN_SLOW_ANSWER_SECS`, default
/// 20). Only when there is such a peer: the only source is waited for as
/// long as a request may take. A peer so slow is struck (out after two):
/// anyone may announce a share, and a holder answering each chunk just
/// inside the request's limit held a fetch from an honest publisher for
/// tens of minutes.
pub fn slow_answer() -> Duration {
    env_secs("CARAVAN_SLOW_ANSWER_SECS").unwrap_or(Duration::from_secs(20))
}

/// Fetched files smaller than this (`CARAVAN_SMALL_FILE_BYTES`, default
/// 256 KiB) are written on a local filesystem through the page cache with
/// no sync of their own; one `syncfs` before the fetch is done makes them
/// durable together (`node/fetch/writer.rs`).
pub fn small_file_bytes() -> u64 {
    positive("CARAVAN_SMALL_FILE_BYTES", 256 << 10) as u64
}

/// Whether fetched files on a local filesystem are written with `O_DIRECT`
/// (`CARAVAN_DIRECT_IO`, default on; `0` writes through the page cache,
/// for comparison): see `node/fetch/direct.rs`.
pub fn direct_io() -> bool {
    std::env::var("CARAVAN_DIRECT_IO").map_or(true, |v| v != "0")
}

/// Test-only fault injection: serve corrupted chunks
/// (`CARAVAN_FAULT_CORRUPT_CHUNKS=1`).
pub fn fault_corrupt_chunks() -> bool {
    std::env::var("CARAVAN_FAULT_CORRUPT_CHUNKS").is_ok_and(|v| v == "1")
}

/// Test-only fault injection: the first N streamed PUTs of the process
/// (`CARAVAN_FAULT_PUT_CUT=N`) are cut off after their first piece with a
/// temporary error, as a storage outage mid-body would, so a test sees the
/// file fetched again as a multipart upload. True when this PUT is one.
pub fn fault_put_cut() -> bool {
    use std::sync::atomic::{AtomicU32, Ordering};
    static CUT: AtomicU32 = AtomicU32::new(0);
    let Some(n) = std::env::var("CARAVAN_FAULT_PUT_CUT")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
    else {
        return false;
    };
    CUT.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| {
        (c < n).then_some(c + 1)
    })
    .is_ok()
}

/// Test-only: the publish pass holds after each sealed block until this
/// file exists (`CARAVAN_FAULT_PUBLISH_GATE=PATH`), so a test sees a fetch
/// run while the pass is unfinished without timing anything.
pub fn fault_publish_gate() -> Option<std::path::PathBuf> {
    std::env::var_os("CARAVAN_FAULT_PUBLISH_GATE").map(std::path::PathBuf::from)
}

/// Overrides the trust sync interval (`CARAVAN_TRUST_SYNC_SECS`, seconds,
/// fractions allowed), when set to a positive number.
pub fn trust_sync_interval() -> Option<Duration> {
    env_secs("CARAVAN_TRUST_SYNC_SECS")
}

/// How often the daemon checks offline seeds for URLs to renew
/// (`CARAVAN_SEED_REFRESH_SECS`, seconds, fractions allowed; default 60).
/// A seed is renewed once half of its URL validity has passed.
pub fn seed_refresh_interval() -> Duration {
    env_secs("CARAVAN_SEED_REFRESH_SECS").unwrap_or(Duration::from_secs(60))
}

/// How long an unfinished fetch is kept for resuming, from its first
/// request (`CARAVAN_FETCH_GIVE_UP_SECS`, default 7 days): then its request
/// and half-written files are removed (see `node/fetch/leftovers.rs`).
pub fn fetch_give_up_after() -> Duration {
    env_secs("CARAVAN_FETCH_GIVE_UP_SECS").unwrap_or(Duration::from_secs(7 * 86_400))
}

/// How long a fetch the daemon resumed waits before trying again when no
/// peer could be reached (`CARAVAN_FETCH_RETRY_SECS`, default 15; it
/// doubles at each attempt, up to 5 minutes).
pub fn fetch_retry_first() -> Duration {
    env_secs("CARAVAN_FETCH_RETRY_SECS").unwrap_or(Duration::from_secs(15))
}

/// How often a running daemon sweeps unfinished fetches
/// (`CARAVAN_FETCH_SWEEP_SECS`, default a day).
pub fn fetch_sweep_interval() -> Duration {
    env_secs("CARAVAN_FETCH_SWEEP_SECS").unwrap_or(Duration::from_secs(86_400))
}

/// Largest share a fetch accepts, in bytes (`CARAVAN_MAX_SHARE_BYTES`,
/// default 4 TiB); on a local filesystem the free space bounds it too.
pub fn max_share_bytes() -> u64 {
    std::env::var("CARAVAN_MAX_SHARE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(4 << 40)
}

/// Largest file a fetch writes into storage that takes each file in one
/// request (OpenDAL 0.59's WebDAV, Google Drive, Dropbox and OneDrive
/// writers), in bytes (`CARAVAN_ONE_SHOT_MAX_BYTES`, default 1 GiB). Such a
/// file is held in memory until it is sent, so this is also the memory the
/// files being written at once may hold together.
pub fn one_shot_max_bytes() -> u64 {
    std::env::var("CARAVAN_ONE_SHOT_MAX_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v| *v > 0)
        .unwrap_or(1 << 30)
}

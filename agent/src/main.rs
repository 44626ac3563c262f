//! `caravan-agent`: the agent daemon, its command-line client, and a demo.
#![forbid(unsafe_code)]

mod cli;

/// jemalloc with its background thread, instead of glibc's malloc. A
/// transfer's chunk buffers (up to about 100 MiB at its peak) are freed
/// afterwards, but glibc's heaps kept 30–60 MiB of them resident for as long
/// as the daemon ran (an agent idle after fetching 1,000 files sat at
/// 53 MiB); jemalloc's background thread returns freed pages to the OS
/// once unused for a while (250 ms: `.cargo/config.toml` says why; the
/// same daemon idles at 22 MiB) and reuses them until then, so a
/// transfer's pooled buffers keep their pages.
#[cfg(all(unix, not(target_env = "musl")))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}

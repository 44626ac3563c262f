//! What each per-chunk step costs on one core, in CPU-seconds per GiB,
//! printed (no harness):
//!
//!   cargo bench -p caravan-agent --bench primitives
//!
//! The steps are the crate's own: cutting (FastCDC cut points), sealing
//! (the convergent key's keyed BLAKE3 hash, AES-256-GCM in place, the
//! chunk id's BLAKE3 hash) on the publisher; verifying (the id's BLAKE3
//! hash) and opening (AES-256-GCM into a write buffer) on the recipient.
//! Their sum is the floor under `bench/run.sh`'s CPU-seconds per GiB: what
//! a transfer costs above it is copies, system calls and scheduling.
//! Random data, about 665 KiB per chunk as cut. Figures vary with the
//! machine and its load; nothing here asserts a speed.

use std::time::Instant;

use caravan_agent::chunk::{ChunkKeyer, cut_points, verify};
use caravan_agent::crypto::Key;

const GIB: f64 = (1u64 << 30) as f64;

fn random(n: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// CPU-seconds per GiB of `bytes` processed by `f`, the best of 3.
fn per_gib(bytes: usize, mut f: impl FnMut()) -> f64 {
    (0..3)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * GIB / bytes as f64
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> anyhow::Result<()> {
    let data = random(256 << 20);
    let cuts = cut_points(&data);
    let keyer = ChunkKeyer::new(&Key([7; 32]));
    let n = data.len();

    let cut = per_gib(n, || {
        std::hint::black_box(cut_points(&data));
    });
    let key = per_gib(n, || {
        for &(o, l) in &cuts {
            std::hint::black_box(keyer.key_for(&data[o..o + l]));
        }
    });
    let mut sealed = Vec::with_capacity(cuts.len());
    for &(o, l) in &cuts {
        sealed.push(keyer.seal(&data[o..o + l])?);
    }
    let mut buf = Vec::new();
    let seal = per_gib(n, || {
        for &(o, l) in &cuts {
            buf.clear();
            buf.extend_from_slice(&data[o..o + l]);
            std::hint::black_box(keyer.seal_in_place(&mut buf).ok());
        }
    });
    let hash = per_gib(n, || {
        for (_, ct) in &sealed {
            std::hint::black_box(blake3::hash(ct));
        }
    });
    let verified: Vec<_> = sealed
        .iter()
        .map(|(r, ct)| verify(r, ct.clone()))
        .collect::<Result<_, _>>()?;
    let mut out = vec![0u8; 4 << 20];
    let open = per_gib(n, || {
        for v in &verified {
            std::hint::black_box(v.open_into(&mut out[..v.len()]).ok());
        }
    });
    println!(
        "{} chunks, {} KiB each on average; CPU-seconds per GiB on one core:",
        cuts.len(),
        n / cuts.len() / 1024
    );
    println!("  cut (FastCDC cut points)          {cut:.3}");
    println!("  key (keyed BLAKE3 of plaintext)   {key:.3}");
    println!("  seal (copy, key, AES-GCM, id)     {seal:.3}");
    println!("  verify (BLAKE3 of ciphertext)     {hash:.3}");
    println!("  open (AES-GCM into a buffer)      {open:.3}");
    println!(
        "  publisher floor {:.3} (cut + seal), recipient floor {:.3} (verify + open), both {:.3}",
        cut + seal,
        hash + open,
        cut + seal + hash + open
    );
    Ok(())
}

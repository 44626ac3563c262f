//! Single-core speed of the primitives on this machine (MB/s), to put the
//! data plane's figures in context: `cargo run --release --example primitives`.

use std::time::Instant;

use aws_lc_rs::aead::{AES_256_GCM, AES_256_GCM_SIV, Aad, LessSafeKey, Nonce, UnboundKey};

fn mbps(bytes: usize, iters: usize, f: impl FnMut()) -> f64 {
    let mut f = f;
    f();
    let t = Instant::now();
    for _ in 0..iters {
        f();
    }
    (bytes * iters) as f64 / t.elapsed().as_secs_f64() / 1e6
}

fn main() {
    let n = 1 << 20;
    let data = vec![7u8; n];
    let iters = 300;
    println!(
        "blake3        {:>8.0} MB/s",
        mbps(n, iters, || {
            std::hint::black_box(blake3::hash(&data));
        })
    );
    let gcm = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[1; 32]).unwrap());
    let siv = LessSafeKey::new(UnboundKey::new(&AES_256_GCM_SIV, &[1; 32]).unwrap());
    let mut buf = data.clone();
    println!(
        "aes-256-gcm   {:>8.0} MB/s",
        mbps(n, iters, || {
            buf.truncate(n);
            gcm.seal_in_place_append_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::empty(),
                &mut buf,
            )
            .unwrap();
        })
    );
    println!(
        "aes-256-gcm-siv {:>6.0} MB/s",
        mbps(n, iters, || {
            buf.truncate(n);
            siv.seal_in_place_append_tag(
                Nonce::assume_unique_for_key([0; 12]),
                Aad::empty(),
                &mut buf,
            )
            .unwrap();
        })
    );
    println!(
        "memcpy        {:>8.0} MB/s",
        mbps(n, iters, || {
            buf.truncate(0);
            buf.extend_from_slice(&data);
        })
    );
    println!(
        "fastcdc       {:>8.0} MB/s",
        mbps(16 * n, 20, || {
            let big = vec![3u8; 16 * n];
            std::hint::black_box(caravan_agent::chunk::cut_points(&big));
        })
    );
}

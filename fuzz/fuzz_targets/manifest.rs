//! The decrypted manifest body (what a publisher controls completely once
//! its signature and AEAD check out): decoding and validation of paths,
//! sizes and chunk lists must never panic or allocate without bound.
#![no_main]

use caravan_agent::manifest::{Manifest, check_path};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = postcard::from_bytes::<Manifest>(data) {
        if m.validate().is_ok() {
            for (p, size, chunks) in m.files() {
                assert!(check_path(p).is_ok());
                assert_eq!(chunks.iter().map(|c| u64::from(c.len)).sum::<u64>(), size);
            }
        }
        let _ = m.total_bytes();
        let _ = m.total_chunks();
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = check_path(s);
    }
});

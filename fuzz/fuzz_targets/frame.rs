//! Peer-protocol frames: the header and length checks of `read_frame`, on
//! arbitrary bytes, with the server's request limit and a small limit.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for max in [64usize, caravan_agent::wire::MAX_REQUEST] {
        let mut r = data;
        futures::executor::block_on(async {
            while let Ok(Some(f)) = caravan_agent::wire::read_frame(&mut r, max).await {
                assert!(f.payload.len() <= max);
            }
        });
    }
});

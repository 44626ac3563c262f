//! Peer-protocol frames: the header and length checks of `read_frame`, on
//! arbitrary bytes, with the server's request limit and a small limit; and
//! the request parser every peer request goes through (sizes, ids, proofs).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for max in [64usize, caravan_agent::wire::MAX_REQUEST] {
        let mut r = data;
        futures::executor::block_on(async {
            while let Ok(Some(f)) = caravan_agent::wire::read_frame(&mut r, max).await {
                assert!(f.payload.len() <= max);
                if let Ok(req) = caravan_agent::wire::parse_request(f.typ, &f.payload)
                    && let caravan_agent::wire::Request::Key(_, proof) = req
                {
                    assert!(proof.len() <= caravan_agent::wire::MAX_PROOF_RECORDS);
                }
            }
        });
    }
});

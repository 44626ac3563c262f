//! The bulk channel (`wire/channel.rs`): frames sealed by one side (both
//! kinds: AES-GCM bodies and MACed raw chunk bodies), then altered at one
//! fuzzer-chosen bit or cut short, must open to exactly what was sent, in
//! order, or be refused at the first altered frame: never accepted altered,
//! never a panic.
#![no_main]

use caravan_agent::wire::FrameType;
use caravan_agent::wire::channel::{self, Outgoing, Side};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let (ctl, rest) = data.split_at(5);
    let master = [7u8; 32];
    let Ok((mut sealer, _)) = channel::keys(&master, Side::Server) else {
        return;
    };
    let Ok((_, mut opener)) = channel::keys(&master, Side::Client) else {
        return;
    };
    // Up to four frames: the rest of the input split at fuzzer-chosen points.
    let n = 1 + (ctl[0] as usize % 4);
    let step = rest.len() / n;
    let payloads: Vec<&[u8]> = (0..n)
        .map(|i| {
            let end = if i + 1 == n { rest.len() } else { (i + 1) * step };
            &rest[i * step..end]
        })
        .collect();
    futures::executor::block_on(async {
        let mut wire: Vec<u8> = Vec::new();
        for (i, p) in payloads.iter().enumerate() {
            let raw = (ctl[1] >> i) & 1 == 1;
            let f = Outgoing {
                typ: if raw { FrameType::Ok } else { FrameType::GetChunk },
                id: i as u32,
                payload: p.to_vec().into(),
                raw_hash: raw.then(|| *blake3::hash(p).as_bytes()),
            };
            if sealer.write(&mut wire, f).await.is_err() {
                return;
            }
        }
        let at = u16::from_be_bytes([ctl[2], ctl[3]]) as usize;
        let altered = match ctl[4] >> 6 {
            0 => false,
            1 => {
                wire.truncate(at % (wire.len() + 1));
                true
            }
            _ => {
                let k = at % wire.len();
                wire[k] ^= 1 << (ctl[4] & 7);
                true
            }
        };
        let mut r = &wire[..];
        let mut got: Vec<(u32, Vec<u8>)> = Vec::new();
        while let Ok(Some(h)) = opener.read_header(&mut r).await {
            match opener.read_body(&mut r, &h).await {
                Ok(inc) => got.push((h.header.id, inc.payload)),
                Err(_) => break,
            }
        }
        assert!(got.len() <= payloads.len());
        for (k, (id, p)) in got.iter().enumerate() {
            assert_eq!(*id, k as u32, "frame out of order");
            assert_eq!(p.as_slice(), payloads[k], "an altered frame was accepted");
        }
        if !altered {
            assert_eq!(got.len(), payloads.len(), "an intact frame was refused");
        }
    });
});

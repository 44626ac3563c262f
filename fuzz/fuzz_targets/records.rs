//! Every signed-record decoder: the envelope, then the body as each record
//! kind, the repository's checked decoders and its framed lists.
#![no_main]

use caravan_agent::manifest::{KeyRelease, ManifestRecord, Ticket};
use caravan_agent::record::SignedRecord;
use caravan_agent::trust::{
    Announcement, Revocation, SeedIndex, SeedRecord, TrustGrant, decode_record,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(rec) = SignedRecord::from_bytes(data) {
        let _ = rec.open::<ManifestRecord>();
        let _ = rec.open::<Ticket>();
        let _ = rec.open::<KeyRelease>();
        let _ = TrustGrant::from_record(&rec);
        let _ = Revocation::from_record(&rec);
        let _ = Announcement::from_record(&rec);
        let _ = SeedRecord::from_record(&rec);
        // Re-encoding what decoded gives the same bytes back.
        assert_eq!(rec.to_bytes(), data);
    }
    let _ = decode_record(data);
    let _ = caravan_agent::repository::decode_frames(data, 1000);
    // Bodies without a valid signature: the postcard decoders themselves.
    let _ = postcard::from_bytes::<TrustGrant>(data);
    let _ = postcard::from_bytes::<Revocation>(data);
    let _ = postcard::from_bytes::<Announcement>(data);
    let _ = postcard::from_bytes::<ManifestRecord>(data);
    let _ = postcard::from_bytes::<KeyRelease>(data);
    let _ = postcard::from_bytes::<SeedRecord>(data);
    let _ = postcard::from_bytes::<SeedIndex>(data);
    let _ = postcard::from_bytes::<Vec<Vec<u8>>>(data);
});

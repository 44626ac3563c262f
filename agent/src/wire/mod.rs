//! The peer protocol: length-prefixed request/response frames between agents
//! that authenticated each other with TLS 1.3. Requests carry an id, so a
//! client pipelines many requests on one connection and the server answers
//! them as they complete. Frames travel on the channel of [`channel`]: keyed
//! from the TLS exporter, every frame authenticated, everything but sealed
//! chunk bodies encrypted.
//!
//! Frame: type (u8), request id (u32 BE), payload length (u32 BE), payload
//! (the plain framing below is what the channel carries inside its sealed
//! headers; `read_frame` parses it for the fuzzer).

pub mod channel;
pub mod client;
pub mod server;
pub mod tls;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::chunk::ChunkId;
use crate::error::{Context, Error, Result};
use crate::manifest::ShareId;

/// ALPN protocol id; a peer speaking anything else (such as `caravan/1`,
/// frames inside TLS records) is refused at handshake.
pub const ALPN: &[u8] = b"caravan/2";

/// Largest request payload a server reads (any type; see [`request_limit`]).
pub const MAX_REQUEST: usize = 32 + MAX_PROOF_BYTES;
/// Largest response payload a client reads (a big manifest); each request
/// type has its own, smaller limit (see [`response_limit`]).
pub const MAX_RESPONSE: usize = 256 << 20;
/// Largest encoded proof (list of grant records) a `GetKey` may carry.
pub const MAX_PROOF_BYTES: usize = 32 << 10;
/// Most grant records in one proof.
pub const MAX_PROOF_RECORDS: usize = 64;
/// Largest single grant record in a proof.
pub const MAX_PROOF_RECORD_BYTES: usize = 2 << 10;
/// Largest `NotFound`/`Failed` message, and a key-release record.
pub const MAX_MESSAGE: usize = 4 << 10;
/// Largest manifest record a client reads: the record limit plus envelope.
pub const MAX_MANIFEST_RESPONSE: usize = (256 << 20) + 256;

/// Exact or largest payload of each request type, checked on the header
/// before any of the body is read.
pub fn request_limit(typ: FrameType) -> Option<usize> {
    match typ {
        FrameType::GetManifest => Some(40),
        FrameType::GetChunk => Some(64),
        FrameType::GetKey => Some(32 + MAX_PROOF_BYTES),
        FrameType::Ping => Some(0),
        FrameType::GetLive => Some(40),
        _ => None,
    }
}

/// Largest `Ok` payload answering a request of type `typ`.
pub fn response_limit(typ: FrameType) -> usize {
    match typ {
        FrameType::GetManifest => MAX_MANIFEST_RESPONSE,
        FrameType::GetChunk => crate::chunk::MAX_CIPHERTEXT,
        FrameType::GetKey => MAX_MESSAGE,
        FrameType::GetLive => MAX_MANIFEST_RESPONSE,
        _ => 0,
    }
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// The newest manifest record of a share, given the version the caller has.
    Manifest(ShareId, u64),
    /// One chunk's ciphertext.
    Chunk(ShareId, ChunkId),
    /// The share key, with the caller's proof records.
    Key(ShareId, Vec<Vec<u8>>),
    /// Liveness.
    Ping,
    /// What a running publish pass sealed from this position of its chunk log on.
    Live(ShareId, u64),
}

fn share_at(p: &[u8]) -> ShareId {
    let mut s = [0u8; 32];
    s.copy_from_slice(&p[..32]);
    ShareId(s)
}

/// Parses a request frame (network input), checking its exact size and the
/// proof bounds before anything else looks at it. Never panics.
pub fn parse_request(typ: FrameType, p: &[u8]) -> Result<Request> {
    let limit =
        request_limit(typ).ok_or_else(|| Error::Protocol(format!("{typ:?} is not a request")))?;
    if p.len() > limit {
        return Err(Error::Protocol(format!(
            "{typ:?} payload of {} bytes exceeds the {limit} byte limit",
            p.len()
        )));
    }
    match typ {
        FrameType::Ping => Ok(Request::Ping),
        FrameType::GetManifest if p.len() == 40 => {
            let mut v = [0u8; 8];
            v.copy_from_slice(&p[32..40]);
            Ok(Request::Manifest(share_at(p), u64::from_be_bytes(v)))
        }
        FrameType::GetLive if p.len() == 40 => {
            let mut v = [0u8; 8];
            v.copy_from_slice(&p[32..40]);
            Ok(Request::Live(share_at(p), u64::from_be_bytes(v)))
        }
        FrameType::GetChunk if p.len() == 64 => {
            let mut c = [0u8; 32];
            c.copy_from_slice(&p[32..64]);
            Ok(Request::Chunk(share_at(p), ChunkId(c)))
        }
        FrameType::GetKey if p.len() >= 32 => {
            Ok(Request::Key(share_at(p), decode_proof(&p[32..])?))
        }
        other => Err(Error::Protocol(format!(
            "{other:?} payload of {} bytes has the wrong size",
            p.len()
        ))),
    }
}

/// Decodes a proof (postcard list of records), refusing more than
/// [`MAX_PROOF_RECORDS`] records or a record over [`MAX_PROOF_RECORD_BYTES`]
/// before any signature is checked.
pub fn decode_proof(b: &[u8]) -> Result<Vec<Vec<u8>>> {
    if b.len() > MAX_PROOF_BYTES {
        return Err(Error::Protocol(format!(
            "proof of {} bytes exceeds the {MAX_PROOF_BYTES} byte limit",
            b.len()
        )));
    }
    let proof: Vec<Vec<u8>> =
        postcard::from_bytes(b).map_err(|e| Error::Protocol(format!("GetKey proof: {e}")))?;
    if proof.len() > MAX_PROOF_RECORDS {
        return Err(Error::Protocol(format!(
            "proof of {} records exceeds the limit of {MAX_PROOF_RECORDS}",
            proof.len()
        )));
    }
    if let Some(r) = proof.iter().find(|r| r.len() > MAX_PROOF_RECORD_BYTES) {
        return Err(Error::Protocol(format!(
            "proof record of {} bytes exceeds the {MAX_PROOF_RECORD_BYTES} byte limit",
            r.len()
        )));
    }
    Ok(proof)
}

/// Request and response frame types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// share id (32) + version the client already has (u64): newest manifest record.
    GetManifest = 1,
    /// share id (32) + chunk id (32): the chunk's ciphertext.
    GetChunk = 2,
    /// share id (32) + postcard list of proof records: the share key wrapped for the caller.
    GetKey = 3,
    /// Liveness check; empty payload.
    Ping = 4,
    /// share id (32) + position (u64: 0 = the file list and the chunk log
    /// from its start, n + 1 = the log from entry n on): a live answer
    /// (`node::live::LiveAnswer`), long-polled; answered only by the publisher.
    GetLive = 5,
    /// Success; payload depends on the request.
    Ok = 0x81,
    /// The share or chunk is unknown — or the caller may not know it exists.
    NotFound = 0x82,
    /// The request failed; payload is a UTF-8 message.
    Failed = 0x83,
}

impl FrameType {
    /// The type with wire value `b`.
    pub fn from_u8(b: u8) -> Result<Self> {
        Ok(match b {
            1 => FrameType::GetManifest,
            2 => FrameType::GetChunk,
            3 => FrameType::GetKey,
            4 => FrameType::Ping,
            5 => FrameType::GetLive,
            0x81 => FrameType::Ok,
            0x82 => FrameType::NotFound,
            0x83 => FrameType::Failed,
            other => return Err(Error::Protocol(format!("unknown frame type {other:#x}"))),
        })
    }
}

/// One frame.
#[derive(Debug)]
pub struct Frame {
    /// What it is.
    pub typ: FrameType,
    /// Matches a response to its request.
    pub id: u32,
    /// The body.
    pub payload: Vec<u8>,
}

/// A frame header: type, request id, payload length.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// What it is.
    pub typ: FrameType,
    /// Matches a response to its request.
    pub id: u32,
    /// Payload length announced.
    pub len: usize,
}

/// Reads one frame header. `Ok(None)` on clean EOF.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Header>> {
    let mut hdr = [0u8; 9];
    match r.read_exact(&mut hdr).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e).context(|| "reading a frame header".into()),
    }
    Ok(Some(Header {
        typ: FrameType::from_u8(hdr[0])?,
        id: u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]),
        len: u32::from_be_bytes([hdr[5], hdr[6], hdr[7], hdr[8]]) as usize,
    }))
}

/// Reads the `len` byte payload of a frame whose header was read (the
/// caller has checked `len` against its limit).
pub async fn read_body<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> Result<Vec<u8>> {
    // Room for an AEAD tag: chunk payloads are decrypted in place.
    let mut payload = Vec::with_capacity(len + 16);
    let got = (&mut *r)
        .take(len as u64)
        .read_to_end(&mut payload)
        .await
        .context(|| format!("reading a {len} byte frame"))?;
    if got != len {
        return Err(Error::Protocol(format!(
            "connection closed inside a {len} byte frame"
        )));
    }
    Ok(payload)
}

/// Reads one frame, refusing payloads over `max`. `Ok(None)` on clean EOF.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<Frame>> {
    let Some(h) = read_header(r).await? else {
        return Ok(None);
    };
    if h.len > max {
        return Err(Error::Protocol(format!(
            "frame of {} bytes exceeds the {max} byte limit",
            h.len
        )));
    }
    let payload = read_body(r, h.len).await?;
    Ok(Some(Frame {
        typ: h.typ,
        id: h.id,
        payload,
    }))
}

/// Writes one frame (not flushed).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<()> {
    let mut hdr = [0u8; 9];
    hdr[0] = f.typ as u8;
    hdr[1..5].copy_from_slice(&f.id.to_be_bytes());
    let len = u32::try_from(f.payload.len())
        .map_err(|_| Error::Protocol("frame larger than 4 GiB".into()))?;
    hdr[5..9].copy_from_slice(&len.to_be_bytes());
    w.write_all(&hdr)
        .await
        .context(|| "writing a frame".into())?;
    w.write_all(&f.payload)
        .await
        .context(|| "writing a frame".into())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn read_frame_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut r = &b[..];
                let _ = read_frame(&mut r, 32).await;
            });
        }
    }

    proptest! {
        #[test]
        fn parse_request_never_panics(t in 0u8..6, b in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(typ) = FrameType::from_u8(t) {
                let _ = parse_request(typ, &b);
            }
        }
    }

    #[test]
    fn proofs_are_bounded_before_use() {
        let rec = vec![1u8; 100];
        let ok: Vec<Vec<u8>> = vec![rec.clone(); MAX_PROOF_RECORDS];
        assert!(decode_proof(&postcard::to_stdvec(&ok).unwrap()).is_ok());
        let many: Vec<Vec<u8>> = vec![rec; MAX_PROOF_RECORDS + 1];
        let e = decode_proof(&postcard::to_stdvec(&many).unwrap()).unwrap_err();
        assert!(e.to_string().contains("limit"), "{e}");
        let big = vec![vec![0u8; MAX_PROOF_RECORD_BYTES + 1]];
        assert!(decode_proof(&postcard::to_stdvec(&big).unwrap()).is_err());
        assert!(parse_request(FrameType::GetChunk, &[0u8; 65]).is_err());
        assert!(parse_request(FrameType::Ok, &[]).is_err());
    }

    #[tokio::test]
    async fn frame_roundtrip_and_limit() {
        let mut buf = Vec::new();
        write_frame(
            &mut buf,
            &Frame {
                typ: FrameType::GetChunk,
                id: 7,
                payload: vec![1, 2, 3],
            },
        )
        .await
        .unwrap();
        let f = read_frame(&mut &buf[..], 16).await.unwrap().unwrap();
        assert_eq!(
            (f.typ, f.id, f.payload),
            (FrameType::GetChunk, 7, vec![1, 2, 3])
        );
        assert!(read_frame(&mut &buf[..], 2).await.is_err());
    }
}

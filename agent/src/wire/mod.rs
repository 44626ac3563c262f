//! The peer protocol: length-prefixed request/response frames over mutually
//! authenticated TLS 1.3. Requests carry an id, so a client pipelines many
//! requests on one connection and the server answers them as they complete.
//!
//! Frame: type (u8), request id (u32 BE), payload length (u32 BE), payload.

pub mod client;
pub mod server;
pub mod tls;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{Context, Error, Result};

/// ALPN protocol id; a peer speaking anything else is refused at handshake.
pub const ALPN: &[u8] = b"caravan/1";

/// Largest request payload a server reads.
pub const MAX_REQUEST: usize = 1 << 20;
/// Largest response payload a client reads (a big manifest).
pub const MAX_RESPONSE: usize = 256 << 20;

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
    /// Success; payload depends on the request.
    Ok = 0x81,
    /// The share or chunk is unknown — or the caller may not know it exists.
    NotFound = 0x82,
    /// The request failed; payload is a UTF-8 message.
    Failed = 0x83,
}

impl FrameType {
    fn from_u8(b: u8) -> Result<Self> {
        Ok(match b {
            1 => FrameType::GetManifest,
            2 => FrameType::GetChunk,
            3 => FrameType::GetKey,
            4 => FrameType::Ping,
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

/// Reads one frame, refusing payloads over `max`. `Ok(None)` on clean EOF.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> Result<Option<Frame>> {
    let mut hdr = [0u8; 9];
    match r.read_exact(&mut hdr).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e).context(|| "reading a frame header".into()),
    }
    let typ = FrameType::from_u8(hdr[0])?;
    let id = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]);
    let len = u32::from_be_bytes([hdr[5], hdr[6], hdr[7], hdr[8]]) as usize;
    if len > max {
        return Err(Error::Protocol(format!(
            "frame of {len} bytes exceeds the {max} byte limit"
        )));
    }
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
    Ok(Some(Frame { typ, id, payload }))
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

//! The bulk channel: frames between two agents after their TLS 1.3
//! handshake, keyed by the handshake's exporter, so chunk bodies (already
//! AES-GCM sealed and content-addressed) are not encrypted a second time.
//!
//! TLS authenticates both agents (certificates bound to their ed25519 ids)
//! and gives forward-secret key agreement. Once it is done, both sides
//! export 32 bytes (`export_keying_material`, label [`EXPORTER_LABEL`]) and
//! derive, per direction, an AES-256-GCM key and a BLAKE3 MAC key; the TLS
//! session is then dropped and frames travel on the bare TCP connection:
//!
//! ```text
//! frame   = sealed header (10 + 16 bytes) , body
//! header  = type (u8), request id (u32 BE), length (u32 BE), kind (u8)
//! body    = kind 0: AES-GCM(payload)              (length + 16 bytes)
//!           kind 1: payload, MAC                  (length + 32 bytes)
//! MAC     = BLAKE3-keyed(mac key, seq, header, BLAKE3(payload))
//! ```
//!
//! Every frame of a direction has the next sequence number `seq`; it is the
//! AEAD nonce (with a domain byte for header and body) and is inside the
//! MAC, so frames cannot be replayed, reordered, dropped or spliced in from
//! another connection without the next check failing and the connection
//! closing. Requests, manifests, keys and refusals are kind 0: as
//! confidential as before. Only an `Ok` answer to `GetChunk` is kind 1: its
//! payload is a chunk's AEAD ciphertext as sealed at rest, and the MAC binds
//! it to this connection and this answer. BLAKE3 of the payload is what the
//! sender computed to verify the chunk before serving it and what the
//! receiver needs to check the chunk id, so the MAC costs no extra pass.
//! See docs/security.md ("Transport") for the argument.

use crate::pool::FreeList;
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{FrameType, Header};
use crate::crypto::TAG_LEN;
use crate::error::{Context, Error, Result};

/// Label of the TLS exporter the channel keys are derived from.
pub const EXPORTER_LABEL: &[u8] = b"caravan bulk v1";
/// Bytes of a sealed header on the wire.
pub const SEALED_HEADER: usize = 10 + TAG_LEN;
/// Bytes of the MAC after a raw body.
pub const MAC_LEN: usize = 32;
/// The byte the server sends through TLS once it is ready for the bare
/// channel: the client reads it before sending anything, so no bare byte
/// can be swallowed by the TLS layer.
pub const READY: u8 = 0xca;

/// Bodies at least this big are read into pooled buffers ([`recycle`]).
const POOLED_MIN: usize = 64 << 10;
/// The largest pooled receive buffer: the largest chunk the chunker cuts,
/// sealed, and its MAC.
const POOLED_CAPACITY: usize = crate::chunk::MAX_CUT + TAG_LEN + MAC_LEN;
/// A fresh pooled buffer's capacity is its first body's length rounded up
/// to this, so buffers of about the same size serve each other.
const POOLED_STEP: usize = 64 << 10;
/// Buffers for chunk bodies, reused: a fresh allocation of a chunk's size
/// is fresh pages from the kernel, each faulted in and zeroed as the socket
/// (or a file read) fills it (a tenth of a recipient's CPU before this pool).
///
/// Each buffer is sized to the chunk it was made for (chunks are 256 KiB
/// to 2 MiB, about 680 KiB on average) and a body takes the smallest kept
/// buffer it fits in: when every buffer had the largest chunk's capacity,
/// a buffer reused for a while was resident up to 2 MiB, and a publisher
/// serving a share from S3 held 48 of them (96 MiB) besides its readahead
/// and cache, peaking at 218–228 MiB.
///
/// How many are kept is set by the node with [`keep_buffers`] to as many
/// chunks as one fetch holds at once (`node::tuning::chunks_in_memory`), so
/// a buffer freed while others are in flight is not dropped only to be
/// faulted in again. With 12, a fetch of 1,000 small files (16 written at
/// once) kept dropping and reallocating them: zeroing fresh pages was 15%
/// of the recipient's CPU (`clear_page_erms` under its `recv`), 3% with 48.
/// Bound: that many x 2 MiB, never more than the chunks in flight at a
/// peak, and freed when the fetch or the peer's connection ends. None are
/// kept until it is set.
static RECEIVE_BUFFERS: FreeList<Vec<u8>> = FreeList::new(0);

/// Sets how many receive buffers are kept for reuse (see [`RECEIVE_BUFFERS`]).
pub fn keep_buffers(n: usize) {
    RECEIVE_BUFFERS.set_keep(n);
}

/// An empty buffer with room for `n` bytes (a pooled one when `n` is a
/// chunk's size): chunk bodies received, and chunks read to be served.
pub fn chunk_buffer(n: usize) -> Vec<u8> {
    if !(POOLED_MIN..=POOLED_CAPACITY).contains(&n) {
        return Vec::with_capacity(n);
    }
    if let Some(b) = RECEIVE_BUFFERS.take_best(|b| (b.capacity() >= n).then_some(b.capacity())) {
        return b;
    }
    // None kept is big enough: one kept (too small) goes, so there are
    // never more buffers than were ever in use at once.
    drop(RECEIVE_BUFFERS.take());
    Vec::with_capacity(n.next_multiple_of(POOLED_STEP).min(POOLED_CAPACITY))
}

/// Gives a chunk's buffer back once its bytes are used (any buffer of a
/// pooled size is kept, wherever it came from).
pub fn recycle(mut buf: Vec<u8>) {
    if !(POOLED_MIN..=POOLED_CAPACITY).contains(&buf.capacity()) {
        return;
    }
    buf.clear();
    RECEIVE_BUFFERS.give(buf);
}

/// Frees the pooled buffers (a fetch or a peer's connection ended: an idle
/// agent holds none).
pub fn release_buffers() {
    RECEIVE_BUFFERS.clear();
}

/// Body kinds.
const SEALED: u8 = 0;
const RAW: u8 = 1;

/// One direction's keys and sequence number.
struct Dir {
    aead: LessSafeKey,
    mac: [u8; 32],
    seq: u64,
}

impl Dir {
    fn new(master: &[u8; 32], who: &str) -> Result<Dir> {
        let aead = blake3::derive_key(&format!("caravan bulk v1 {who} aead"), master);
        let mac = blake3::derive_key(&format!("caravan bulk v1 {who} mac"), master);
        let k = UnboundKey::new(&AES_256_GCM, &aead).map_err(|_| Error::Crypto("bad key"))?;
        Ok(Dir {
            aead: LessSafeKey::new(k),
            mac,
            seq: 0,
        })
    }

    fn nonce(&self, domain: u8) -> Nonce {
        let mut n = [0u8; 12];
        n[0] = domain;
        n[4..].copy_from_slice(&self.seq.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }

    fn mac(&self, header: &[u8; 10], hash: &[u8; 32]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.mac);
        h.update(&self.seq.to_be_bytes());
        h.update(header);
        h.update(hash);
        h.finalize()
    }
}

/// Which end of the connection this is (each sends with its own keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The dialling agent.
    Client,
    /// The listening agent.
    Server,
}

/// Derives the two directions' keys from the exporter output.
pub fn keys(master: &[u8; 32], side: Side) -> Result<(Sealer, Opener)> {
    let c2s = Dir::new(master, "client to server")?;
    let s2c = Dir::new(master, "server to client")?;
    Ok(match side {
        Side::Client => (Sealer(c2s), Opener(s2c)),
        Side::Server => (Sealer(s2c), Opener(c2s)),
    })
}

/// A frame's payload as it is sent.
#[derive(Debug, Clone)]
pub enum Body {
    /// Bytes of its own.
    Owned(Vec<u8>),
    /// A sealed chunk where the publish pass left it: its ciphertext, a
    /// slice of the block it was sealed in, then its tag. Sent as it
    /// lies: never copied into a buffer of its own.
    Sealed(bytes::Bytes, [u8; TAG_LEN]),
    /// Bytes shared with their holder (a held share's manifest record):
    /// copied only when the frame is sealed, by the connection's writer,
    /// one frame at a time. An answer waiting for its turn holds no copy.
    Shared(bytes::Bytes),
}

impl Body {
    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        match self {
            Body::Owned(v) => v.len(),
            Body::Sealed(b, t) => b.len() + t.len(),
            Body::Shared(b) => b.len(),
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes in one buffer (a copy for a sealed chunk or shared bytes;
    /// with room for the tag a sealed frame appends).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Body::Owned(v) => v,
            Body::Shared(b) => {
                let mut v = Vec::with_capacity(b.len() + TAG_LEN);
                v.extend_from_slice(&b);
                v
            }
            Body::Sealed(b, t) => {
                let mut v = Vec::with_capacity(b.len() + t.len());
                v.extend_from_slice(&b);
                v.extend_from_slice(&t);
                v
            }
        }
    }
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Body {
        Body::Owned(v)
    }
}

/// A frame to send: a kind-1 frame carries the BLAKE3 hash of its payload.
#[derive(Debug)]
pub struct Outgoing {
    /// What it is.
    pub typ: FrameType,
    /// Matches a response to its request.
    pub id: u32,
    /// The body.
    pub payload: Body,
    /// `Some(BLAKE3(payload))`: send the payload as it is, MACed (a sealed
    /// chunk); `None`: encrypt it.
    pub raw_hash: Option<[u8; 32]>,
}

/// The sending half's keys.
pub struct Sealer(Dir);

impl Sealer {
    /// The sealed header of a frame (exposed for tests that send malformed
    /// or half frames).
    pub fn header(&mut self, typ: FrameType, id: u32, len: usize, raw: bool) -> Result<Vec<u8>> {
        let len = u32::try_from(len).map_err(|_| Error::Protocol("frame over 4 GiB".into()))?;
        let plain = encode_header(typ, id, len, raw);
        let mut buf = Vec::with_capacity(SEALED_HEADER);
        buf.extend_from_slice(&plain);
        self.0
            .aead
            .seal_in_place_append_tag(self.0.nonce(0), Aad::empty(), &mut buf)
            .map_err(|_| Error::Crypto("seal failed"))?;
        Ok(buf)
    }

    /// Writes one frame (not flushed) and advances the sequence number.
    pub async fn write<W: AsyncWrite + Unpin>(&mut self, w: &mut W, f: Outgoing) -> Result<()> {
        let raw = f.raw_hash.is_some();
        let hdr = self.header(f.typ, f.id, f.payload.len(), raw)?;
        let plain = encode_header(f.typ, f.id, f.payload.len() as u32, raw);
        w.write_all(&hdr)
            .await
            .context(|| "writing a frame".into())?;
        match f.raw_hash {
            Some(hash) => {
                let mac = self.0.mac(&plain, &hash);
                match &f.payload {
                    Body::Owned(v) => w.write_all(v).await,
                    Body::Shared(b) => w.write_all(b).await,
                    Body::Sealed(b, t) => match w.write_all(b).await {
                        Ok(()) => w.write_all(t).await,
                        e => e,
                    },
                }
                .context(|| "writing a frame".into())?;
                w.write_all(mac.as_bytes())
                    .await
                    .context(|| "writing a frame".into())?;
                if let Body::Owned(v) = f.payload {
                    recycle(v);
                }
            }
            None => {
                let mut body = f.payload.into_vec();
                self.0
                    .aead
                    .seal_in_place_append_tag(self.0.nonce(1), Aad::from(&plain[..]), &mut body)
                    .map_err(|_| Error::Crypto("seal failed"))?;
                w.write_all(&body)
                    .await
                    .context(|| "writing a frame".into())?;
            }
        }
        self.0.seq += 1;
        Ok(())
    }
}

/// A received header, opened and authenticated.
#[derive(Debug, Clone, Copy)]
pub struct InHeader {
    /// Type, id and payload length.
    pub header: Header,
    /// The payload comes as it is, followed by a MAC (a sealed chunk).
    pub raw: bool,
    plain: [u8; 10],
}

/// A received payload; `hash` is BLAKE3 of it for a kind-1 frame (computed
/// here, on the received bytes).
#[derive(Debug)]
pub struct Incoming {
    /// The body.
    pub payload: Vec<u8>,
    /// BLAKE3 of the body, when it came raw.
    pub hash: Option<blake3::Hash>,
}

/// The receiving half's keys.
pub struct Opener(Dir);

impl Opener {
    /// Reads and opens one header. `Ok(None)` on clean EOF before it.
    pub async fn read_header<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<Option<InHeader>> {
        let mut buf = [0u8; SEALED_HEADER];
        match r.read_exact(&mut buf).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e).context(|| "reading a frame header".into()),
        }
        let nonce = self.0.nonce(0);
        let plain = self
            .0
            .aead
            .open_in_place(nonce, Aad::empty(), &mut buf)
            .map_err(|_| Error::Protocol("a frame header failed authentication".into()))?;
        let mut p = [0u8; 10];
        p.copy_from_slice(plain);
        let raw = match p[9] {
            SEALED => false,
            RAW => true,
            other => return Err(Error::Protocol(format!("unknown frame kind {other}"))),
        };
        Ok(Some(InHeader {
            header: Header {
                typ: FrameType::from_u8(p[0])?,
                id: u32::from_be_bytes([p[1], p[2], p[3], p[4]]),
                len: u32::from_be_bytes([p[5], p[6], p[7], p[8]]) as usize,
            },
            raw,
            plain: p,
        }))
    }

    /// Reads the body of a frame whose header was read (the caller has
    /// checked its length and kind), authenticates it and advances the
    /// sequence number.
    pub async fn read_body<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        h: &InHeader,
    ) -> Result<Incoming> {
        let len = h.header.len;
        let wire = len + if h.raw { MAC_LEN } else { TAG_LEN };
        // Room for an AEAD tag: chunk payloads are decrypted in place.
        let mut buf = chunk_buffer(wire.max(len + TAG_LEN));
        let got = (&mut *r)
            .take(wire as u64)
            .read_to_end(&mut buf)
            .await
            .context(|| format!("reading a {len} byte frame"))?;
        if got != wire {
            return Err(Error::Protocol(format!(
                "connection closed inside a {len} byte frame"
            )));
        }
        let out = if h.raw {
            let mut mac = [0u8; MAC_LEN];
            mac.copy_from_slice(&buf[len..]);
            buf.truncate(len);
            let hash = blake3::hash(&buf);
            // blake3::Hash compares in constant time.
            if self.0.mac(&h.plain, hash.as_bytes()) != blake3::Hash::from(mac) {
                return Err(Error::Protocol(
                    "a frame failed authentication (altered in transit)".into(),
                ));
            }
            Incoming {
                payload: buf,
                hash: Some(hash),
            }
        } else {
            let n = self
                .0
                .aead
                .open_in_place(self.0.nonce(1), Aad::from(&h.plain[..]), &mut buf)
                .map_err(|_| Error::Protocol("a frame failed authentication".into()))?
                .len();
            buf.truncate(n);
            Incoming {
                payload: buf,
                hash: None,
            }
        };
        self.0.seq += 1;
        Ok(out)
    }
}

/// The dialling side's switch from TLS to the bare channel: waits for the
/// server's [`READY`] byte (so TLS has read nothing past it), derives the
/// keys from the exporter, and hands back the bare TCP stream.
pub async fn client_switch(
    mut stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> Result<(tokio::net::TcpStream, Sealer, Opener)> {
    let mut b = [0u8; 1];
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_exact(&mut b),
    )
    .await
    .map_err(|_| Error::Tls("the peer never opened the channel".into()))?
    .context(|| "opening the channel".into())?;
    if b[0] != READY {
        return Err(Error::Tls("the peer opened the channel wrongly".into()));
    }
    let mut master = [0u8; 32];
    stream
        .get_ref()
        .1
        .export_keying_material(&mut master, EXPORTER_LABEL, None)
        .map_err(|e| Error::Tls(format!("exporter: {e}")))?;
    let (tcp, _) = stream.into_inner();
    let (s, o) = keys(&master, Side::Client)?;
    Ok((tcp, s, o))
}

/// The listening side's switch: derives the keys, tells the client through
/// TLS that the bare channel is open, and hands back the bare TCP stream.
pub async fn server_switch(
    mut stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
) -> Result<(tokio::net::TcpStream, Sealer, Opener)> {
    let mut master = [0u8; 32];
    stream
        .get_ref()
        .1
        .export_keying_material(&mut master, EXPORTER_LABEL, None)
        .map_err(|e| Error::Tls(format!("exporter: {e}")))?;
    stream
        .write_all(&[READY])
        .await
        .context(|| "opening the channel".into())?;
    stream
        .flush()
        .await
        .context(|| "opening the channel".into())?;
    let (tcp, _) = stream.into_inner();
    let (s, o) = keys(&master, Side::Server)?;
    Ok((tcp, s, o))
}

fn encode_header(typ: FrameType, id: u32, len: u32, raw: bool) -> [u8; 10] {
    let mut h = [0u8; 10];
    h[0] = typ as u8;
    h[1..5].copy_from_slice(&id.to_be_bytes());
    h[5..9].copy_from_slice(&len.to_be_bytes());
    h[9] = if raw { RAW } else { SEALED };
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> ((Sealer, Opener), (Sealer, Opener)) {
        let m = [5u8; 32];
        (
            keys(&m, Side::Client).unwrap(),
            keys(&m, Side::Server).unwrap(),
        )
    }

    /// A chunk's buffer is about the chunk's size, and a kept buffer serves
    /// the next chunk it fits (nextest runs each test in its own process:
    /// nothing else uses the pool meanwhile).
    #[test]
    fn chunk_buffers_fit_their_chunk_and_are_reused_when_they_fit() {
        keep_buffers(2);
        let b = chunk_buffer(300 << 10);
        assert_eq!(
            b.capacity(),
            320 << 10,
            "a 300 KiB chunk got a 2 MiB buffer"
        );
        let ptr = b.as_ptr();
        recycle(b);
        let again = chunk_buffer(200 << 10);
        assert_eq!(
            again.as_ptr(),
            ptr,
            "a kept buffer that fits was not reused"
        );
        recycle(again);
        let big = chunk_buffer(1 << 20);
        assert_eq!(big.capacity(), 1 << 20);
        recycle(big);
        // The too-small kept buffer went when the big one was made.
        let small = chunk_buffer(100 << 10);
        assert_eq!(small.capacity(), 1 << 20, "only the big buffer is kept");
        assert_eq!(chunk_buffer(POOLED_CAPACITY).capacity(), POOLED_CAPACITY);
        assert_eq!(
            chunk_buffer(POOLED_CAPACITY + 1).capacity(),
            POOLED_CAPACITY + 1
        );
        release_buffers();
    }

    #[tokio::test]
    async fn a_sealed_slice_and_its_tag_go_out_as_one_owned_body_would() {
        let body: Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let hash = *blake3::hash(&body).as_bytes();
        let split = body.len() - TAG_LEN;
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&body[split..]);
        let mut wires = Vec::new();
        for payload in [
            Body::Owned(body.clone()),
            Body::Sealed(bytes::Bytes::copy_from_slice(&body[..split]), tag),
        ] {
            assert_eq!(payload.len(), body.len());
            let ((mut cs, _), (_, mut so)) = pair();
            let mut wire = Vec::new();
            cs.write(
                &mut wire,
                Outgoing {
                    typ: FrameType::Ok,
                    id: 9,
                    payload,
                    raw_hash: Some(hash),
                },
            )
            .await
            .unwrap();
            let mut r = &wire[..];
            let h = so.read_header(&mut r).await.unwrap().unwrap();
            assert_eq!(so.read_body(&mut r, &h).await.unwrap().payload, body);
            wires.push(wire);
        }
        assert_eq!(wires[0], wires[1]);
    }

    #[tokio::test]
    async fn frames_roundtrip_both_kinds_and_tampering_is_caught() {
        let ((mut cs, _), (_, mut so)) = pair();
        let mut wire = Vec::new();
        cs.write(
            &mut wire,
            Outgoing {
                typ: FrameType::GetChunk,
                id: 1,
                payload: b"secret request".to_vec().into(),
                raw_hash: None,
            },
        )
        .await
        .unwrap();
        let body = vec![9u8; 1000];
        cs.write(
            &mut wire,
            Outgoing {
                typ: FrameType::Ok,
                id: 2,
                payload: body.clone().into(),
                raw_hash: Some(*blake3::hash(&body).as_bytes()),
            },
        )
        .await
        .unwrap();
        assert!(!wire.windows(6).any(|w| w == b"secret"), "request in clear");
        let good = wire.clone();
        let mut r = &good[..];
        let h = so.read_header(&mut r).await.unwrap().unwrap();
        assert!(!h.raw);
        assert_eq!(
            so.read_body(&mut r, &h).await.unwrap().payload,
            b"secret request"
        );
        let h = so.read_header(&mut r).await.unwrap().unwrap();
        assert!(h.raw && h.header.len == 1000);
        let got = so.read_body(&mut r, &h).await.unwrap();
        assert_eq!(got.payload, body);
        assert_eq!(got.hash.unwrap(), blake3::hash(&body));

        // Any flipped bit, in any frame, is caught.
        for i in [0, SEALED_HEADER + 3, wire.len() - 40, wire.len() - 1] {
            let ((_, _), (_, mut so)) = pair();
            let mut bad = good.clone();
            bad[i] ^= 1;
            let mut r = &bad[..];
            let mut failed = false;
            for _ in 0..2 {
                match so.read_header(&mut r).await {
                    Ok(Some(h)) => {
                        if so.read_body(&mut r, &h).await.is_err() {
                            failed = true;
                            break;
                        }
                    }
                    _ => {
                        failed = true;
                        break;
                    }
                }
            }
            assert!(failed, "flip at {i} not caught");
        }
        // Replaying the first frame in place of the second is caught.
        let ((_, _), (_, mut so)) = pair();
        let first_len = SEALED_HEADER + 14 + TAG_LEN;
        let mut replay = good[..first_len].to_vec();
        replay.extend_from_slice(&good[..first_len]);
        let mut r = &replay[..];
        let h = so.read_header(&mut r).await.unwrap().unwrap();
        so.read_body(&mut r, &h).await.unwrap();
        assert!(so.read_header(&mut r).await.is_err());
    }
}

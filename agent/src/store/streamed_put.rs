//! A file written to S3 as one PUT whose body streams while its chunks
//! arrive, the way `rclone copy` sends a file under its upload cutoff.
//!
//! Why: OpenDAL's writer gathers a file into 5 MiB parts (the smallest S3
//! takes) and sends a multipart upload: a 16 MiB file is six requests
//! (create, four parts, complete), each part held in memory until sent, and
//! the server copies the parts together at the end. Sixteen such files
//! written at once held 16 parts gathering plus the parts in flight, and a
//! recipient peaked near 200 MiB; moto spent most of the run on the parts.
//! A streamed PUT is one request per file and holds no part at all: the
//! fetch's chunk slots bound what is in memory.
//!
//! How: OpenDAL presigns the PUT (query-string signature, payload unsigned:
//! the body is not known yet) and this module sends it with its own HTTP
//! client, the body fed from a channel with the file's exact length. S3
//! stores the object only when the whole body arrived, so a PUT that fails
//! or is dropped half way leaves nothing behind (like an aborted multipart
//! upload). It cannot be retried (its bytes are gone): the caller fetches
//! the file again as a multipart upload.
//!
//! Bounds: every wait for the server (a body write it does not take, its
//! answer after the body) is bounded by the storage timeout
//! (`store::timeout`); an error answer is read to at most 4 KiB.

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use opendal::{ErrorKind, Operator};
use tokio::sync::mpsc;

/// Pieces of the body waiting for the HTTP client, beyond the one it is
/// sending: what a slow server makes the writer hold.
const QUEUED: usize = 2;
/// How long the presigned URL is valid: S3 checks it when the request
/// starts, and a PUT starts as soon as its file does.
const URL_VALID: Duration = Duration::from_secs(3600);
/// Most bytes of an error answer read (its code and message).
const ERROR_BODY_MAX: usize = 4096;

type Piece = std::result::Result<Bytes, std::io::Error>;

/// One object being written by a streamed PUT.
pub struct StreamedPut {
    path: String,
    tx: Option<mpsc::Sender<Piece>>,
    request: Option<tokio::task::JoinHandle<opendal::Result<()>>>,
    timeout: Duration,
}

/// The process's HTTP client for streamed PUTs (connections are reused
/// across files and fetches).
fn client() -> opendal::Result<&'static reqwest::Client> {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    if let Some(c) = CLIENT.get() {
        return Ok(c);
    }
    let built = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| {
            opendal::Error::new(ErrorKind::Unexpected, "building the HTTP client").set_source(e)
        })?;
    Ok(CLIENT.get_or_init(|| built))
}

/// Whether `op` can take streamed PUTs: S3 (OpenDAL presigns its writes
/// from the configured credentials, without a request). Azure Blob
/// presigns writes only with a SAS token and GCS only with a service
/// account key, so those keep multipart uploads.
pub fn supported(op: &Operator) -> bool {
    op.info().scheme() == "s3" && op.info().capability().presign_write
}

impl StreamedPut {
    /// Starts the PUT of `size` bytes to `path`. `Ok(None)`: this write
    /// cannot be presigned as a plain PUT (a configured checksum would sign
    /// the empty body), and the caller writes it the usual way.
    pub async fn begin(
        op: &Operator,
        path: &str,
        size: u64,
        timeout: Duration,
    ) -> opendal::Result<Option<StreamedPut>> {
        let signed = op.presign_write(path, URL_VALID).await?;
        let checksummed = signed.header().keys().any(|k| {
            let k = k.as_str();
            k.starts_with("x-amz-checksum-") || k == "content-md5"
        });
        if checksummed || signed.method() != reqwest::Method::PUT {
            return Ok(None);
        }
        let (tx, rx) = mpsc::channel::<Piece>(QUEUED);
        let body = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|piece| (piece, rx))
        });
        let http = client()?;
        let req = http
            .put(signed.uri().to_string())
            .headers(signed.header().clone())
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(body));
        let what = path.to_string();
        let request = tokio::spawn(async move {
            // The error without its URL: the URL carries the signature
            // (a bearer credential for this PUT) and the access key id.
            let resp = req.send().await.map_err(|e| {
                opendal::Error::new(ErrorKind::Unexpected, format!("PUT {what}"))
                    .set_source(e.without_url())
                    .set_temporary()
            })?;
            answer(resp, &what).await
        });
        Ok(Some(StreamedPut {
            path: path.to_string(),
            tx: Some(tx),
            request: Some(request),
            timeout,
        }))
    }

    /// Sends the next bytes of the body, waiting while the server is
    /// behind (at most the storage timeout).
    pub async fn write(&mut self, bytes: Bytes) -> opendal::Result<()> {
        let Some(tx) = &self.tx else {
            return Err(self.failed("the PUT already ended"));
        };
        match tokio::time::timeout(self.timeout, tx.send(Ok(bytes))).await {
            Ok(Ok(())) => Ok(()),
            // The request ended before its body did: its error says why.
            Ok(Err(_)) => {
                self.tx = None;
                match self.finish().await {
                    Err(e) => Err(e),
                    Ok(()) => Err(self.failed("the server answered before the whole body")),
                }
            }
            Err(_) => Err(self
                .failed("the server took no body bytes for the storage timeout")
                .set_temporary()),
        }
    }

    /// Ends the body and waits for the server's answer.
    pub async fn close(mut self) -> opendal::Result<()> {
        self.tx = None;
        self.finish().await
    }

    async fn finish(&mut self) -> opendal::Result<()> {
        let Some(request) = self.request.as_mut() else {
            return Err(self.failed("the PUT already ended"));
        };
        let res = match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(self.failed(&format!("PUT task: {e}"))),
            Err(_) => Err(self
                .failed("no answer within the storage timeout")
                .set_temporary()),
        };
        // A request that timed out is not left running.
        if let Some(r) = self.request.take() {
            r.abort();
        }
        res
    }

    fn failed(&self, why: &str) -> opendal::Error {
        opendal::Error::new(ErrorKind::Unexpected, format!("PUT {}: {why}", self.path))
    }
}

impl Drop for StreamedPut {
    /// A PUT given up (the fetch of its file failed) is cut off before its
    /// body is complete, so the server stores nothing.
    fn drop(&mut self) {
        if let Some(r) = self.request.take() {
            r.abort();
        }
    }
}

/// The server's answer: success, or an error saying its status and the
/// start of its body (S3's error code and message); 5xx and 429 are
/// temporary.
async fn answer(mut resp: reqwest::Response, path: &str) -> opendal::Result<()> {
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_MAX {
        match resp.chunk().await {
            Ok(Some(c)) => body.extend_from_slice(&c[..c.len().min(ERROR_BODY_MAX - body.len())]),
            _ => break,
        }
    }
    let kind = match status.as_u16() {
        403 => ErrorKind::PermissionDenied,
        404 => ErrorKind::NotFound,
        _ => ErrorKind::Unexpected,
    };
    let err = opendal::Error::new(
        kind,
        format!(
            "PUT {path}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ),
    );
    Err(if status.is_server_error() || status.as_u16() == 429 {
        err.set_temporary()
    } else {
        err
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// An S3 operator for a bucket `b` at `endpoint` (presigning needs no
    /// request).
    fn s3(endpoint: &str) -> Operator {
        let options = [
            ("bucket", "b"),
            ("endpoint", endpoint),
            ("region", "us-east-1"),
            ("access_key_id", "key"),
            ("secret_access_key", "secret"),
        ];
        crate::store::open(&crate::config::StorageConfig {
            scheme: "s3".into(),
            options: options
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            credentials: None,
            size_limit: None,
        })
        .unwrap()
    }

    async fn listener() -> (TcpListener, String) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        (l, url)
    }

    /// Reads a request's head: (head, body bytes read with it).
    async fn head(sock: &mut TcpStream) -> (String, Vec<u8>) {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed inside the head");
            got.extend_from_slice(&buf[..n]);
            if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let body = got.split_off(i + 4);
                return (String::from_utf8_lossy(&got).to_lowercase(), body);
            }
        }
    }

    /// Reads the body until `len` bytes or the connection ends.
    async fn body(sock: &mut TcpStream, mut got: Vec<u8>, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; 1 << 16];
        while got.len() < len {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// One presigned PUT with the file's exact length (S3 takes no chunked
    /// body), its body the pieces in order.
    #[tokio::test]
    async fn a_file_goes_as_one_put_of_its_exact_length() {
        let (l, url) = listener().await;
        let want = data(3 << 20);
        let len = want.len();
        let server = tokio::spawn(async move {
            let (mut sock, _) = l.accept().await.unwrap();
            let (head, got) = head(&mut sock).await;
            let got = body(&mut sock, got, len).await;
            sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await
                .unwrap();
            (head, got)
        });
        let op = s3(&url);
        let mut put = StreamedPut::begin(&op, "dir/f.bin", len as u64, Duration::from_secs(10))
            .await
            .unwrap()
            .expect("S3 presigns a plain PUT");
        for piece in want.chunks(1 << 20) {
            put.write(Bytes::copy_from_slice(piece)).await.unwrap();
        }
        put.close().await.unwrap();
        let (head, got) = server.await.unwrap();
        assert!(head.starts_with("put /b/dir/f.bin?"), "{head}");
        assert!(head.contains("x-amz-signature="), "{head}");
        assert!(
            head.contains(&format!("content-length: {len}\r\n")),
            "{head}"
        );
        assert!(!head.contains("transfer-encoding"), "{head}");
        assert!(got == want, "the body is the pieces in order");
    }

    /// A server's refusal says its status and S3 error; 5xx is temporary
    /// (the caller fetches the file again), 403 is not.
    #[tokio::test]
    async fn a_refused_put_is_an_error_saying_why() {
        for (status, temporary) in [("503 Slow Down", true), ("403 Forbidden", false)] {
            let (l, url) = listener().await;
            let server = tokio::spawn(async move {
                let (mut sock, _) = l.accept().await.unwrap();
                let (_, got) = head(&mut sock).await;
                body(&mut sock, got, 1000).await;
                let text = "<Error><Code>SlowDownOrDenied</Code></Error>";
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{text}",
                    text.len()
                );
                sock.write_all(answer.as_bytes()).await.unwrap();
            });
            let op = s3(&url);
            let mut put = StreamedPut::begin(&op, "f", 1000, Duration::from_secs(10))
                .await
                .unwrap()
                .unwrap();
            put.write(Bytes::from(vec![1u8; 1000])).await.unwrap();
            let e = put.close().await.unwrap_err();
            assert_eq!(e.is_temporary(), temporary, "{status}: {e}");
            assert!(e.to_string().contains("SlowDownOrDenied"), "{e}");
            server.await.unwrap();
        }
    }

    /// A server that cannot be reached is a temporary error, and no error
    /// carries the presigned URL (its signature is a credential).
    #[tokio::test]
    async fn an_unreachable_server_is_a_temporary_error_without_the_url() {
        let (l, url) = listener().await;
        drop(l);
        let op = s3(&url);
        let mut put = StreamedPut::begin(&op, "f", 1000, Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        let e = match put.write(Bytes::from(vec![1u8; 1000])).await {
            Err(e) => e,
            Ok(()) => put.close().await.unwrap_err(),
        };
        assert!(e.is_temporary(), "{e}");
        let all = format!("{e} {e:?}").to_lowercase();
        assert!(!all.contains("signature"), "{all}");
        assert!(!all.contains("credential"), "{all}");
    }

    /// A PUT given up half way (its file's fetch failed) is cut off: the
    /// server gets fewer bytes than announced and the connection ends, so
    /// S3 stores nothing.
    #[tokio::test]
    async fn a_put_given_up_half_way_is_cut_off() {
        let (l, url) = listener().await;
        let server = tokio::spawn(async move {
            let (mut sock, _) = l.accept().await.unwrap();
            let (_, got) = head(&mut sock).await;
            body(&mut sock, got, 2 << 20).await.len()
        });
        let op = s3(&url);
        let mut put = StreamedPut::begin(&op, "f", 2 << 20, Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        put.write(Bytes::from(vec![1u8; 1 << 20])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(put);
        let got = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the connection ends")
            .unwrap();
        assert!(got < 2 << 20, "{got}");
    }

    /// A server that takes the request and then no body bytes does not
    /// hold the writer for ever: a write gives up after the timeout, as a
    /// temporary error.
    #[tokio::test]
    async fn a_server_that_takes_no_body_times_out() {
        let (l, url) = listener().await;
        let server = tokio::spawn(async move {
            let (mut sock, _) = l.accept().await.unwrap();
            let _ = head(&mut sock).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let op = s3(&url);
        let len = 256u64 << 20;
        let mut put = StreamedPut::begin(&op, "f", len, Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap();
        let started = std::time::Instant::now();
        let mut sent = 0u64;
        let e = loop {
            match put.write(Bytes::from(vec![0u8; 1 << 20])).await {
                Ok(()) => sent += 1 << 20,
                Err(e) => break e,
            }
            assert!(sent < len, "every byte taken by a server that reads none");
        };
        assert!(e.is_temporary(), "{e}");
        assert!(started.elapsed() < Duration::from_secs(20));
        server.abort();
    }
}

// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! An HTTP/1 server and client with hyper 1.x over `vdpa_vsock::tokio`, on the sim device: the
//! code `examples/hyper_http.rs` runs and `tests/hyper_http.rs` tests (both compile this file
//! in with `#[path]`).
//!
//! The server is the driver's (a guest agent's shape): a [`VsockListener`] on [`HTTP_PORT`],
//! each accepted stream served by hyper's `http1` connection. It answers
//! - `GET /data/{seed}/{len}`: `len` bytes of [`pattern`]`(seed)`;
//! - `POST /echo`: the request body;
//! - anything else: `404`;
//!
//! each with its body's FNV-1a checksum in an [`CHECKSUM_HEADER`] header. The client is the sim
//! host's (CID 2): its blocking streams adopted by [`VsockStream::new`], hyper's `http1`
//! client on each. Every connection sends its requests one after another (keep-alive), mixing
//! the three kinds with bodies from 0 to about 200 KiB (several 64 KiB packets), and checks
//! every response: the status, the checksum header against the body, and the body against
//! what was asked for. Any mismatch is an error.

use std::fmt;
use std::io;
use tokio::sync::mpsc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use vdpa_vsock::driver::VsockDriver;
use vdpa_vsock::sim::SimHost;
use vdpa_vsock::tokio::{VsockAddr, VsockListener, VsockStream, VMADDR_CID_ANY};

/// The driver's port the server listens on.
pub(crate) const HTTP_PORT: u32 = 8080;

/// The response header that carries the body's FNV-1a checksum, in hex.
pub(crate) const CHECKSUM_HEADER: &str = "x-body-fnv1a";

/// FNV-1a (64 bits): enough to tell bodies apart.
pub(crate) fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// `len` pseudo-random bytes from `seed` (xorshift), different for each seed.
pub(crate) fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

/// What went wrong in a run.
#[derive(Debug)]
pub(crate) enum HttpError {
    /// A socket call failed.
    Io(io::Error),
    /// hyper failed (a connection, a request, or reading a body).
    Http(hyper::Error),
    /// A request could not be built.
    Request(hyper::http::Error),
    /// A response was not what was asked for.
    Mismatch {
        /// Which client connection.
        conn: usize,
        /// Which request on it.
        request: usize,
        /// What differed.
        what: Mismatch,
    },
    /// A client task panicked or was cancelled.
    Task(tokio::task::JoinError),
}

/// How a response differed from what was asked for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Mismatch {
    /// The status code.
    Status {
        /// Expected.
        expected: u16,
        /// Found.
        found: u16,
    },
    /// The checksum header is missing or not hex.
    NoChecksum,
    /// The checksum header disagrees with the body that came.
    ChecksumHeader {
        /// The header's value.
        header: u64,
        /// The checksum of the body that came.
        body: u64,
    },
    /// The body is not the one asked for.
    Body {
        /// Length and checksum expected.
        expected: (usize, u64),
        /// Length and checksum found.
        found: (usize, u64),
    },
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Io(e) => write!(f, "socket: {e}"),
            HttpError::Http(e) => write!(f, "hyper: {e}"),
            HttpError::Request(e) => write!(f, "building a request: {e}"),
            HttpError::Mismatch {
                conn,
                request,
                what,
            } => write!(
                f,
                "connection {conn}, request {request}: response mismatch: {what:?}"
            ),
            HttpError::Task(e) => write!(f, "client task: {e}"),
        }
    }
}

impl std::error::Error for HttpError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            HttpError::Io(e) => Some(e),
            HttpError::Http(e) => Some(e),
            HttpError::Request(e) => Some(e),
            HttpError::Task(e) => Some(e),
            HttpError::Mismatch { .. } => None,
        }
    }
}

impl From<io::Error> for HttpError {
    fn from(e: io::Error) -> Self {
        HttpError::Io(e)
    }
}

impl From<hyper::Error> for HttpError {
    fn from(e: hyper::Error) -> Self {
        HttpError::Http(e)
    }
}

impl From<hyper::http::Error> for HttpError {
    fn from(e: hyper::http::Error) -> Self {
        HttpError::Request(e)
    }
}

/// What a run did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Summary {
    /// Responses received and checked.
    pub(crate) responses: usize,
    /// Request body bytes sent.
    pub(crate) bytes_up: u64,
    /// Response body bytes received.
    pub(crate) bytes_down: u64,
    /// Server connections that ended in an error (each is printed).
    pub(crate) server_errors: usize,
}

/// A response with `body` and its checksum header.
fn respond(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let sum = checksum(&body);
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = format!("{sum:016x}").parse() {
        resp.headers_mut().insert(CHECKSUM_HEADER, v);
    }
    resp
}

/// The server's one handler.
async fn handle(req: Request<Incoming>) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let path = req.uri().path().to_owned();
    match (req.method(), path.split('/').collect::<Vec<_>>().as_slice()) {
        (&Method::POST, ["", "echo"]) => {
            let body = req.into_body().collect().await?.to_bytes();
            Ok(respond(StatusCode::OK, body.to_vec()))
        }
        (&Method::GET, ["", "data", seed, len]) => match (seed.parse(), len.parse()) {
            (Ok(seed), Ok(len)) if len <= 16 << 20 => {
                Ok(respond(StatusCode::OK, pattern(seed, len)))
            }
            _ => Ok(respond(StatusCode::BAD_REQUEST, Vec::new())),
        },
        _ => Ok(respond(StatusCode::NOT_FOUND, Vec::new())),
    }
}

/// Accept on `listener` forever, serving each stream on its own task; how each connection
/// ended goes to `ended`.
pub(crate) async fn serve(
    listener: VsockListener,
    ended: mpsc::UnboundedSender<Result<(), hyper::Error>>,
) -> io::Result<()> {
    loop {
        let (stream, _peer) = listener.accept().await?;
        let ended = ended.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), hyper::service::service_fn(handle));
            // The receiver goes only when the run is over.
            let _ = ended.send(conn.await);
        });
    }
}

/// A request to send, the status and the body expected back.
type Exchange = (Request<Full<Bytes>>, StatusCode, Vec<u8>);

/// Request `i` of connection `conn`: what to send and the body expected back.
fn request(conn: usize, i: usize) -> Result<Exchange, HttpError> {
    let seed = (conn as u64) << 32 | i as u64;
    // 0 to about 200 KiB: empty bodies, small ones, and several 64 KiB packets.
    let len = (i * 7919 + conn * 104_729) % (200 * 1024);
    let b = Request::builder().header(hyper::header::HOST, "vsock");
    Ok(match i % 5 {
        0 | 1 => (
            b.method(Method::GET)
                .uri(format!("/data/{seed}/{len}"))
                .body(Full::new(Bytes::new()))?,
            StatusCode::OK,
            pattern(seed, len),
        ),
        2 | 3 => {
            let body = pattern(!seed, len);
            (
                b.method(Method::POST)
                    .uri("/echo")
                    .body(Full::new(Bytes::from(body.clone())))?,
                StatusCode::OK,
                body,
            )
        }
        _ => (
            b.method(Method::GET)
                .uri("/nowhere")
                .body(Full::new(Bytes::new()))?,
            StatusCode::NOT_FOUND,
            Vec::new(),
        ),
    })
}

/// Check one response against what request `i` of connection `conn` asked for.
async fn check(
    conn: usize,
    i: usize,
    resp: Response<Incoming>,
    status: StatusCode,
    expected: &[u8],
) -> Result<usize, HttpError> {
    let mismatch = |what| HttpError::Mismatch {
        conn,
        request: i,
        what,
    };
    if resp.status() != status {
        return Err(mismatch(Mismatch::Status {
            expected: status.as_u16(),
            found: resp.status().as_u16(),
        }));
    }
    let header = resp
        .headers()
        .get(CHECKSUM_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| u64::from_str_radix(v, 16).ok())
        .ok_or_else(|| mismatch(Mismatch::NoChecksum))?;
    let body = resp.into_body().collect().await?.to_bytes();
    let sum = checksum(&body);
    if header != sum {
        return Err(mismatch(Mismatch::ChecksumHeader { header, body: sum }));
    }
    if body.len() != expected.len() || sum != checksum(expected) {
        return Err(mismatch(Mismatch::Body {
            expected: (expected.len(), checksum(expected)),
            found: (body.len(), sum),
        }));
    }
    Ok(body.len())
}

/// One client connection from the sim host: `requests` requests in turn, each checked.
async fn client(host: SimHost, conn: usize, requests: usize) -> Result<Summary, HttpError> {
    // The host's connect blocks until the handshake is done: off the runtime's thread.
    let stream = tokio::task::spawn_blocking(move || host.connect(HTTP_PORT))
        .await
        .map_err(HttpError::Task)??;
    let stream = VsockStream::new(stream)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
    let driving = tokio::spawn(connection);
    let mut summary = Summary::default();
    for i in 0..requests {
        let (req, status, expected) = request(conn, i)?;
        let up = req
            .body()
            .clone()
            .collect()
            .await
            .map_or(0, |b| b.to_bytes().len());
        sender.ready().await?;
        let resp = sender.send_request(req).await?;
        let down = check(conn, i, resp, status, &expected).await?;
        summary.responses += 1;
        summary.bytes_up += up as u64;
        summary.bytes_down += down as u64;
    }
    // Dropping the sender ends the connection; its task then finishes cleanly.
    drop(sender);
    driving.await.map_err(HttpError::Task)??;
    Ok(summary)
}

/// Serve HTTP on `driver` and run `connections` clients from `host` at once, `requests`
/// requests each; every response is checked. Must run inside a tokio runtime with I/O
/// enabled and a blocking pool (any runtime `Builder` gives one).
pub(crate) async fn run(
    driver: &VsockDriver,
    host: &SimHost,
    connections: usize,
    requests: usize,
) -> Result<Summary, HttpError> {
    let listener = VsockListener::bind(driver, VsockAddr::new(VMADDR_CID_ANY, HTTP_PORT))?;
    let (ended, mut server_ends) = mpsc::unbounded_channel();
    let server = tokio::spawn(serve(listener, ended));
    let clients: Vec<_> = (0..connections)
        .map(|c| tokio::spawn(client(host.clone(), c, requests)))
        .collect();
    let mut total = Summary::default();
    let mut first_error = None;
    for c in clients {
        match c.await.map_err(HttpError::Task).and_then(|r| r) {
            Ok(s) => {
                total.responses += s.responses;
                total.bytes_up += s.bytes_up;
                total.bytes_down += s.bytes_down;
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if first_error.is_none() {
        // Every client finished and closed its connection: wait for the server's side of
        // each to end, and count the ones that ended in an error.
        for _ in 0..connections {
            match server_ends.recv().await {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    eprintln!("hyper_http: server connection: {e:?}");
                    total.server_errors += 1;
                }
                None => break,
            }
        }
    }
    server.abort();
    match first_error {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

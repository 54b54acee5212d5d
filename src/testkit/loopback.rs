//! Loopback HTTP servers for tests and benchmarks: a programmable server (faults included) and a mock Hugging Face hub.
//!
//! [`LoopbackServer`] speaks the subset of HTTP/1.1 that reqwest-based clients use (keep-alive,
//! `Content-Length` framing, HEAD, request bodies) and lets a [`Handler`] script every reply,
//! including misbehaviour ([`Fault`]). [`MockHub`] routes the endpoints that the `hf-hub` 1.0
//! client calls (resolve, revision info, tree listing), so hub code runs unchanged against it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Longest request or header line accepted; a longer one closes the connection instead of
/// letting a broken client grow a buffer without bound.
const MAX_LINE_BYTES: u64 = 16 * 1024;
/// Most header lines accepted in one request, for the same reason.
const MAX_HEADERS: usize = 128;
/// Bodies up to this size are copied behind the headers so a small response leaves in a single
/// write; larger (shared) bodies are written straight from their buffer to avoid the copy.
const COALESCE_BODY_BYTES: usize = 16 * 1024;
/// How long `Drop` waits for its wake-up connection before giving up on joining the acceptor.
const WAKE_TIMEOUT: Duration = Duration::from_secs(1);

/// One parsed HTTP request, as the handler sees it. The body, if any, has been read and dropped.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    /// Raw request path (still percent-encoded), without the query.
    pub path: String,
    /// Everything after `?`, still encoded; empty when there was none.
    pub query: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    /// The first header with this name, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

/// Misbehaviour to inject into one reply.
#[derive(Clone, Debug)]
pub enum Fault {
    None,
    /// Sleep this long before sending anything (client timeouts).
    Delay(Duration),
    /// Send the headers with the full Content-Length but only the first n body bytes, then close.
    TruncateAt(usize),
    /// Close the connection without replying.
    Hangup,
}

/// What the server sends back for one request.
///
/// The server owns the framing: `Content-Length`, `Connection` and `Transfer-Encoding` entries in
/// `headers` are ignored and replaced, so a handler cannot desynchronise a keep-alive connection
/// by accident (use [`Fault::TruncateAt`] to lie about the length on purpose).
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Arc<Vec<u8>>,
    pub fault: Fault,
}

impl Reply {
    /// 200 with this body and `Content-Type`.
    pub fn ok(body: impl Into<Vec<u8>>, content_type: &str) -> Self {
        Self::shared(Arc::new(body.into()), content_type)
    }

    /// This status with an empty body.
    pub fn status(code: u16) -> Self {
        Self {
            status: code,
            headers: Vec::new(),
            body: Arc::new(Vec::new()),
            fault: Fault::None,
        }
    }

    /// 200 with a body shared between replies, so benchmarks serve large images without a copy
    /// per request.
    pub fn shared(body: Arc<Vec<u8>>, content_type: &str) -> Self {
        Self {
            body,
            ..Self::status(200)
        }
        .header("Content-Type", content_type)
    }

    /// A redirect (301, 302, 303, 307, 308) to `location`.
    pub fn redirect(code: u16, location: &str) -> Self {
        Self::status(code).header("Location", location)
    }

    /// Adds a header; repeated names are sent repeatedly.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn fault(mut self, fault: Fault) -> Self {
        self.fault = fault;
        self
    }
}

/// Decides the reply to every request; called concurrently from connection threads.
pub type Handler = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

/// A threaded HTTP/1.1 server on `127.0.0.1:<ephemeral port>`, one thread per connection.
///
/// Dropping it stops accepting and shuts down every open connection, so no thread outlives it
/// for longer than its current reply.
pub struct LoopbackServer {
    addr: SocketAddr,
    shared: Arc<ServerShared>,
    acceptor: Option<JoinHandle<()>>,
}

struct ServerShared {
    handler: Handler,
    stopping: AtomicBool,
    served: AtomicU64,
    next_connection: AtomicU64,
    /// Clones of the open connections, kept so `Drop` can shut them down: an idle keep-alive
    /// connection would otherwise park its thread in `read` until the client goes away.
    connections: Mutex<HashMap<u64, TcpStream>>,
}

impl LoopbackServer {
    pub fn start(handler: Handler) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(ServerShared {
            handler,
            stopping: AtomicBool::new(false),
            served: AtomicU64::new(0),
            next_connection: AtomicU64::new(0),
            connections: Mutex::new(HashMap::new()),
        });
        let acceptor = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("loopback-accept-{}", addr.port()))
                .spawn(move || accept_loop(listener, shared))?
        };
        Ok(Self {
            addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `base_url() + path`; `path` starts with `/`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url(), path)
    }

    /// Requests handed to the handler so far, faulted ones included. Counted before the reply is
    /// written, so a client that has its response already sees its own request counted.
    pub fn requests_served(&self) -> u64 {
        self.shared.served.load(Ordering::SeqCst)
    }
}

impl Drop for LoopbackServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // `accept` blocks; a throwaway connection wakes it so it can see the flag.
        let woke = TcpStream::connect_timeout(&self.addr, WAKE_TIMEOUT).is_ok();
        if let Some(acceptor) = self.acceptor.take() {
            // Without the wake-up the join could hang; the detached acceptor then dies with the
            // process instead.
            if woke {
                let _ = acceptor.join();
            }
        }
        for (_, connection) in lock(&self.shared.connections).drain() {
            let _ = connection.shutdown(Shutdown::Both);
        }
    }
}

/// Poisoning only means another test thread panicked; the maps stay usable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn accept_loop(listener: TcpListener, shared: Arc<ServerShared>) {
    for incoming in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let stream = match incoming {
            Ok(stream) => stream,
            Err(_) => {
                // Accept errors (aborted handshakes, fd exhaustion under a benchmark) are
                // transient; the pause keeps an exhausted process from spinning.
                thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.connections).insert(id, clone);
        }
        let for_thread = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name(format!("loopback-conn-{id}"))
            .spawn(move || {
                serve_connection(stream, &for_thread);
                lock(&for_thread.connections).remove(&id);
            });
        if spawned.is_err() {
            // The closure, and with it the stream, is gone: the client sees a closed connection.
            lock(&shared.connections).remove(&id);
        }
    }
}

/// A request plus what the connection needs to know about it.
struct Incoming {
    request: Request,
    keep_alive: bool,
}

fn serve_connection(stream: TcpStream, shared: &ServerShared) {
    // Headers and large bodies go out in separate writes; with Nagle on, the second one would
    // wait for the client's delayed ACK (~40 ms a response), which ruins keep-alive benchmarks.
    let _ = stream.set_nodelay(true);
    let mut reader = BufReader::new(stream);
    loop {
        let incoming = match read_request(&mut reader) {
            Ok(Some(incoming)) => incoming,
            // Clean end of the connection, or a request we cannot frame: either way, close.
            Ok(None) | Err(_) => return,
        };
        if expects_continue(&incoming.request) && reader.get_mut().write_all(CONTINUE).is_err() {
            return;
        }
        if discard_body(&mut reader, &incoming.request).is_err() {
            return;
        }
        if shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        shared.served.fetch_add(1, Ordering::SeqCst);
        let reply = (shared.handler)(&incoming.request);
        let head_only = incoming.request.method.eq_ignore_ascii_case("HEAD");
        match write_reply(reader.get_mut(), head_only, incoming.keep_alive, &reply) {
            Ok(true) => continue,
            Ok(false) | Err(_) => return,
        }
    }
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// One line without its CRLF (or bare LF); `None` at end of stream before any byte.
fn read_line<R: BufRead>(reader: &mut R) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let read = reader
        .by_ref()
        .take(MAX_LINE_BYTES)
        .read_until(b'\n', &mut buf)?;
    if read == 0 {
        return Ok(None);
    }
    if buf.last() != Some(&b'\n') {
        return Err(invalid("line too long or cut off"));
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    // Header values are opaque bytes in HTTP; lossy decoding keeps odd clients working.
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Reads a request line and headers; `Ok(None)` when the client closed between requests.
fn read_request<R: BufRead>(reader: &mut R) -> io::Result<Option<Incoming>> {
    // RFC 9112 §2.2: a server should ignore empty lines received before the request line.
    let line = loop {
        match read_line(reader)? {
            None => return Ok(None),
            Some(line) if line.is_empty() => continue,
            Some(line) => break line,
        }
    };
    let mut parts = line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(method), Some(target), Some(version), None)
            if !method.is_empty() && !target.is_empty() && version.starts_with("HTTP/1.") =>
        {
            (method, target, version)
        }
        _ => return Err(invalid("malformed request line")),
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)?.ok_or_else(|| invalid("connection closed in headers"))?;
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            return Err(invalid("too many headers"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| invalid("header line without a colon"))?;
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(invalid("malformed header name"));
        }
        headers.push((name.to_string(), value.trim().to_string()));
    }
    let (path, query) = split_target(target);
    let request = Request {
        method: method.to_string(),
        path,
        query,
        headers,
    };
    let keep_alive = wants_keep_alive(version, request.header("connection"));
    Ok(Some(Incoming {
        request,
        keep_alive,
    }))
}

/// Splits a request target into raw path and query, accepting the absolute form that clients
/// send to proxies (`http://host/path?q`).
fn split_target(target: &str) -> (String, String) {
    let origin_form = ["http://", "https://"]
        .iter()
        .find_map(|scheme| target.strip_prefix(scheme))
        .map(|rest| rest.find('/').map_or("/", |slash| &rest[slash..]))
        .unwrap_or(target);
    match origin_form.split_once('?') {
        Some((path, query)) => (path.to_string(), query.to_string()),
        None => (origin_form.to_string(), String::new()),
    }
}

fn has_token(header: Option<&str>, token: &str) -> bool {
    header.is_some_and(|value| {
        value
            .split(',')
            .any(|part| part.trim().eq_ignore_ascii_case(token))
    })
}

/// HTTP/1.1 is persistent unless the client says `close`; HTTP/1.0 only when it asks.
fn wants_keep_alive(version: &str, connection: Option<&str>) -> bool {
    if version == "HTTP/1.0" {
        has_token(connection, "keep-alive")
    } else {
        !has_token(connection, "close")
    }
}

fn expects_continue(request: &Request) -> bool {
    request
        .header("expect")
        .is_some_and(|value| value.eq_ignore_ascii_case("100-continue"))
}

/// Reads and drops the request body so the next request on the connection starts where it should.
fn discard_body<R: BufRead>(reader: &mut R, request: &Request) -> io::Result<()> {
    if let Some(encoding) = request.header("transfer-encoding") {
        // RFC 9112 §6.3: chunked wins over Content-Length; any other coding cannot be framed.
        if !encoding.trim().eq_ignore_ascii_case("chunked") {
            return Err(invalid("unsupported transfer-encoding"));
        }
        return discard_chunked(reader);
    }
    match request.header("content-length") {
        None => Ok(()),
        Some(length) => {
            let length: u64 = length
                .trim()
                .parse()
                .map_err(|_| invalid("bad content-length"))?;
            skip_exact(reader, length)
        }
    }
}

fn skip_exact<R: BufRead>(reader: &mut R, length: u64) -> io::Result<()> {
    let skipped = io::copy(&mut reader.by_ref().take(length), &mut io::sink())?;
    if skipped == length {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "request body cut off",
        ))
    }
}

fn discard_chunked<R: BufRead>(reader: &mut R) -> io::Result<()> {
    loop {
        let line = read_line(reader)?.ok_or_else(|| invalid("chunked body cut off"))?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16).map_err(|_| invalid("bad chunk size"))?;
        if size == 0 {
            // Trailer section, ended by an empty line.
            loop {
                match read_line(reader)? {
                    Some(trailer) if !trailer.is_empty() => continue,
                    Some(_) => return Ok(()),
                    None => return Err(invalid("chunked trailers cut off")),
                }
            }
        }
        skip_exact(reader, size)?;
        if read_line(reader)?.as_deref() != Some("") {
            return Err(invalid("chunk not followed by CRLF"));
        }
    }
}

fn is_framing_header(name: &str) -> bool {
    ["content-length", "connection", "transfer-encoding"]
        .iter()
        .any(|framing| name.eq_ignore_ascii_case(framing))
}

/// Writes one reply (applying its fault); `Ok(true)` when the connection stays open.
fn write_reply(
    stream: &mut TcpStream,
    head_only: bool,
    keep_alive: bool,
    reply: &Reply,
) -> io::Result<bool> {
    let truncate_at = match reply.fault {
        Fault::None => None,
        Fault::Delay(delay) => {
            thread::sleep(delay);
            None
        }
        Fault::TruncateAt(n) => Some(n.min(reply.body.len())),
        Fault::Hangup => {
            let _ = stream.shutdown(Shutdown::Both);
            return Ok(false);
        }
    };
    let status = reply.status;
    // RFC 9110 §8.6: no Content-Length on 1xx/204; 304 and HEAD announce the length they skip.
    let no_length = (100..200).contains(&status) || status == 204;
    let send_body = !head_only && !no_length && status != 304;

    let mut out = Vec::with_capacity(256);
    write!(out, "HTTP/1.1 {} {}\r\n", status, reason_phrase(status))?;
    for (name, value) in &reply.headers {
        if !is_framing_header(name) {
            write!(out, "{name}: {value}\r\n")?;
        }
    }
    if !no_length {
        write!(out, "Content-Length: {}\r\n", reply.body.len())?;
    }
    // A truncated reply still announces keep-alive: it imitates a server that died mid-body,
    // not one that planned to close.
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(out, "Connection: {connection}\r\n\r\n")?;

    let body: &[u8] = if send_body {
        &reply.body[..truncate_at.unwrap_or(reply.body.len())]
    } else {
        &[]
    };
    if body.len() <= COALESCE_BODY_BYTES {
        out.extend_from_slice(body);
        stream.write_all(&out)?;
    } else {
        stream.write_all(&out)?;
        stream.write_all(body)?;
    }
    stream.flush()?;
    if truncate_at.is_some() {
        let _ = stream.shutdown(Shutdown::Both);
        return Ok(false);
    }
    Ok(keep_alive)
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        410 => "Gone",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// A Hugging Face hub stand-in speaking the protocol of the `hf-hub` 1.0 client.
///
/// Routes served (`{kind}` is `datasets` or `models`; revisions and paths percent-decoded):
/// - `HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}`: the file, with `ETag`/`X-Linked-Etag`
///   (sha256 of the bytes) and `X-Repo-Commit`; `Range` and `If-None-Match` are honoured.
/// - `GET /api/{kind}/{repo}[/revision/{rev}]`: repo info with `sha` and `siblings`.
/// - `GET /api/{kind}/{repo}/tree/{rev}[/{dir}][?recursive=true]`: one page of tree entries.
///
/// Misses are 404 with the hub's `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`,
/// `EntryNotFound`); no route answers 5xx, which the client would retry.
pub struct MockHub {
    server: LoopbackServer,
    state: Arc<Mutex<HubState>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum RepoKind {
    Model,
    Dataset,
}

#[derive(Default)]
struct HubState {
    /// (kind, repo id) → revision name → contents at that revision.
    repos: BTreeMap<(RepoKind, String), BTreeMap<String, HubRevision>>,
    log: Vec<String>,
    /// Repo path → how many more GETs of it are answered with an error page (see
    /// [`MockHub::garble_downloads`]).
    garbled: BTreeMap<String, u32>,
}

struct HubRevision {
    commit: String,
    files: BTreeMap<String, HubFile>,
}

struct HubFile {
    bytes: Arc<Vec<u8>>,
    sha256: String,
}

impl MockHub {
    pub fn start() -> io::Result<Self> {
        let state = Arc::new(Mutex::new(HubState::default()));
        let handler: Handler = {
            let state = Arc::clone(&state);
            Arc::new(move |request: &Request| {
                let mut state = lock(&state);
                let mut line = format!("{} {}", request.method, request.path);
                if !request.query.is_empty() {
                    line.push('?');
                    line.push_str(&request.query);
                }
                state.log.push(line);
                let mut reply = route_hub(&state, request);
                if request.method == "GET" && reply.status == 200 {
                    let path = percent_decode(&request.path);
                    let hit = state.garbled.iter_mut().find(|(p, n)| {
                        **n > 0 && path.contains("/resolve/") && path.ends_with(&format!("/{p}"))
                    });
                    if let Some((_, left)) = hit {
                        *left -= 1;
                        reply.body = Arc::new(b"<html>502 Bad Gateway</html>".to_vec());
                    }
                }
                reply
            })
        };
        Ok(Self {
            server: LoopbackServer::start(handler)?,
            state,
        })
    }

    /// Base URL to give the client as its HF endpoint.
    pub fn endpoint(&self) -> String {
        self.server.base_url()
    }

    /// Adds a file to a dataset repo ("owner/name") at a revision (branch/tag/ref name such as
    /// "main" or "refs/convert/parquet", or a 40-hex commit). Each (repo, revision) maps to the
    /// fixed fake commit [`MockHub::commit_of`]; requests may name either.
    pub fn add_dataset_file(&self, repo: &str, revision: &str, path: &str, bytes: Vec<u8>) {
        self.add_file(RepoKind::Dataset, repo, revision, path, bytes);
    }

    /// Like [`MockHub::add_dataset_file`], for a model repo.
    pub fn add_model_file(&self, repo: &str, revision: &str, path: &str, bytes: Vec<u8>) {
        self.add_file(RepoKind::Model, repo, revision, path, bytes);
    }

    /// The fake commit that `revision` of `repo` resolves to: the revision itself when it is
    /// already a 40-hex commit, else a hash of repo and revision.
    pub fn commit_of(&self, repo: &str, revision: &str) -> String {
        fake_commit(repo, revision)
    }

    /// Answers the next `times` GETs of `path` (in any repo) with a proxy's error page under
    /// status 200 and the file's own headers, as a misbehaving proxy or CDN would.
    pub fn garble_downloads(&self, path: &str, times: u32) {
        lock(&self.state).garbled.insert(path.to_string(), times);
    }

    /// "METHOD raw-path?query" of every request served, in order (for asserting what the client did).
    pub fn request_log(&self) -> Vec<String> {
        lock(&self.state).log.clone()
    }

    fn add_file(&self, kind: RepoKind, repo: &str, revision: &str, path: &str, bytes: Vec<u8>) {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let commit = fake_commit(repo, revision);
        let mut state = lock(&self.state);
        let revisions = state.repos.entry((kind, repo.to_string())).or_default();
        let contents = revisions
            .entry(revision.to_string())
            .or_insert_with(|| HubRevision {
                commit,
                files: BTreeMap::new(),
            });
        contents.files.insert(
            path.trim_start_matches('/').to_string(),
            HubFile {
                bytes: Arc::new(bytes),
                sha256,
            },
        );
    }
}

fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

fn fake_commit(repo: &str, revision: &str) -> String {
    if is_commit_hash(revision) {
        return revision.to_ascii_lowercase();
    }
    let digest = Sha256::digest(format!("prefcap-mockhub\0{repo}\0{revision}").as_bytes());
    hex::encode(digest)[..40].to_string()
}

/// Decodes `%XX` escapes; malformed escapes stay literal, as lenient servers treat them.
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| segment.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hub_error(status: u16, code: Option<&str>, message: &str) -> Reply {
    let body = json!({ "error": message }).to_string();
    let mut reply = Reply::ok(body, "application/json");
    reply.status = status;
    match code {
        Some(code) => reply
            .header("X-Error-Code", code)
            .header("X-Error-Message", message),
        None => reply,
    }
}

fn repo_not_found(repo: &str) -> Reply {
    hub_error(
        404,
        Some("RepoNotFound"),
        &format!("Repository not found: {repo}"),
    )
}

fn revision_not_found(revision: &str) -> Reply {
    hub_error(
        404,
        Some("RevisionNotFound"),
        &format!("Invalid rev id: {revision}"),
    )
}

fn json_reply(value: &Value) -> Reply {
    Reply::ok(value.to_string(), "application/json")
}

type Revisions = BTreeMap<String, HubRevision>;

fn find_revision<'a>(revisions: &'a Revisions, revision: &str) -> Option<&'a HubRevision> {
    revisions.get(revision).or_else(|| {
        revisions
            .values()
            .find(|contents| contents.commit.eq_ignore_ascii_case(revision))
    })
}

/// Splits `segments` into a known repo id and the rest: `owner/name` first, then a bare `name`
/// (canonical model ids such as `gpt2` have no owner).
fn split_repo<'a>(
    state: &'a HubState,
    kind: RepoKind,
    segments: &'a [String],
) -> Result<(&'a str, &'a Revisions, &'a [String]), Reply> {
    if segments.len() >= 2 {
        let id = format!("{}/{}", segments[0], segments[1]);
        if let Some(((_, id), revisions)) = state.repos.get_key_value(&(kind, id)) {
            return Ok((id.as_str(), revisions, &segments[2..]));
        }
    }
    if let Some(first) = segments.first() {
        if let Some(((_, id), revisions)) = state.repos.get_key_value(&(kind, first.clone())) {
            return Ok((id.as_str(), revisions, &segments[1..]));
        }
    }
    let guess = segments
        .iter()
        .take(2)
        .cloned()
        .collect::<Vec<_>>()
        .join("/");
    Err(repo_not_found(&guess))
}

/// Finds the revision at the start of `segments`. hf-hub sends it as one encoded segment
/// (`refs%2Fconvert%2Fparquet`); other clients leave the slashes raw, so longer prefixes are
/// tried too. `keep` is how many segments must be left over for a path.
fn split_revision<'a>(
    revisions: &'a Revisions,
    segments: &'a [String],
    keep: usize,
) -> Result<(&'a HubRevision, &'a [String]), Reply> {
    let first = segments.first().ok_or_else(|| revision_not_found(""))?;
    for take in 1..=segments.len().saturating_sub(keep) {
        if let Some(contents) = find_revision(revisions, &segments[..take].join("/")) {
            return Ok((contents, &segments[take..]));
        }
    }
    Err(revision_not_found(first))
}

fn route_hub(state: &HubState, request: &Request) -> Reply {
    if request.method != "GET" && request.method != "HEAD" {
        return hub_error(405, None, "Method not allowed");
    }
    let segments: Vec<String> = request
        .path
        .split('/')
        .filter(|segment| !segment.is_empty())
        .map(percent_decode)
        .collect();
    let routed = match segments.first().map(String::as_str) {
        Some("api") => route_api(state, request, &segments[1..]),
        Some("datasets") => route_resolve(state, request, RepoKind::Dataset, &segments[1..]),
        _ => route_resolve(state, request, RepoKind::Model, &segments),
    };
    routed.unwrap_or_else(|reply| reply)
}

fn route_resolve(
    state: &HubState,
    request: &Request,
    kind: RepoKind,
    segments: &[String],
) -> Result<Reply, Reply> {
    let (_, revisions, rest) = split_repo(state, kind, segments)?;
    if rest.first().map(String::as_str) != Some("resolve") {
        return Err(hub_error(404, None, "Not Found"));
    }
    let (contents, path) = split_revision(revisions, &rest[1..], 1)?;
    let path = path.join("/");
    match contents.files.get(&path) {
        Some(file) => Ok(serve_file(request, &contents.commit, file)),
        // The hub names the commit on misses too; hf-hub uses it for its `.no_exist` markers.
        None => Err(hub_error(
            404,
            Some("EntryNotFound"),
            &format!("Entry not found: {path}"),
        )
        .header("X-Repo-Commit", &contents.commit)),
    }
}

fn serve_file(request: &Request, commit: &str, file: &HubFile) -> Reply {
    let etag = format!("\"{}\"", file.sha256);
    let with_metadata = |reply: Reply| {
        reply
            .header("ETag", &etag)
            .header("X-Linked-Etag", &etag)
            .header("X-Repo-Commit", commit)
            .header("Accept-Ranges", "bytes")
    };
    let full = || Reply::shared(Arc::clone(&file.bytes), "application/octet-stream");
    let revalidated = request.header("if-none-match").is_some_and(|tags| {
        tags.split(',')
            .any(|tag| tag.trim().trim_start_matches("W/") == etag)
    });
    if revalidated {
        let mut reply = full();
        reply.status = 304;
        return with_metadata(reply);
    }
    if request.method != "GET" {
        return with_metadata(full());
    }
    let Some(range) = request.header("range") else {
        return with_metadata(full());
    };
    let len = file.bytes.len();
    match parse_range(range, len) {
        ByteRange::Whole => with_metadata(full()),
        ByteRange::Slice(start, end) => {
            let slice = file.bytes[start..=end].to_vec();
            let mut reply = Reply::ok(slice, "application/octet-stream");
            reply.status = 206;
            with_metadata(reply).header("Content-Range", &format!("bytes {start}-{end}/{len}"))
        }
        ByteRange::Unsatisfiable => {
            with_metadata(Reply::status(416)).header("Content-Range", &format!("bytes */{len}"))
        }
    }
}

#[derive(Debug, PartialEq)]
enum ByteRange {
    /// Absent, multi-part or malformed: RFC 9110 lets a server ignore it and send everything.
    Whole,
    /// Inclusive byte offsets.
    Slice(usize, usize),
    Unsatisfiable,
}

fn parse_range(header: &str, len: usize) -> ByteRange {
    let spec = header.trim();
    let Some(spec) = spec
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case("bytes="))
        .map(|_| &spec[6..])
    else {
        return ByteRange::Whole;
    };
    let Some((first, last)) = spec.split_once('-').filter(|_| !spec.contains(',')) else {
        return ByteRange::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        return match last.parse::<usize>() {
            Ok(0) => ByteRange::Unsatisfiable,
            Ok(_) if len == 0 => ByteRange::Unsatisfiable,
            Ok(suffix) => ByteRange::Slice(len.saturating_sub(suffix), len - 1),
            Err(_) => ByteRange::Whole,
        };
    }
    let Ok(start) = first.parse::<usize>() else {
        return ByteRange::Whole;
    };
    let end = if last.is_empty() {
        usize::MAX
    } else {
        match last.parse::<usize>() {
            Ok(end) if end >= start => end,
            _ => return ByteRange::Whole,
        }
    };
    if start >= len {
        ByteRange::Unsatisfiable
    } else {
        ByteRange::Slice(start, end.min(len - 1))
    }
}

fn route_api(state: &HubState, request: &Request, segments: &[String]) -> Result<Reply, Reply> {
    let kind = match segments.first().map(String::as_str) {
        Some("datasets") => RepoKind::Dataset,
        Some("models") => RepoKind::Model,
        _ => return Err(hub_error(404, None, "Not Found")),
    };
    let (repo, revisions, rest) = split_repo(state, kind, &segments[1..])?;
    match rest.first().map(String::as_str) {
        None => {
            let contents =
                find_revision(revisions, "main").ok_or_else(|| revision_not_found("main"))?;
            Ok(repo_info(kind, repo, contents))
        }
        Some("revision") => {
            let (contents, _) = split_revision(revisions, &rest[1..], 0)?;
            Ok(repo_info(kind, repo, contents))
        }
        Some("tree") => {
            let (contents, dir) = split_revision(revisions, &rest[1..], 0)?;
            let recursive = request.query.split('&').any(|pair| {
                matches!(
                    pair.split_once('='),
                    Some(("recursive", "true" | "True" | "1"))
                )
            });
            let dir = dir.join("/");
            tree_entries(contents, &dir, recursive)
                .map(|entries| json_reply(&Value::Array(entries)))
                .ok_or_else(|| {
                    hub_error(
                        404,
                        Some("EntryNotFound"),
                        &format!("Entry not found: {dir}"),
                    )
                })
        }
        Some(_) => Err(hub_error(404, None, "Not Found")),
    }
}

fn repo_info(kind: RepoKind, repo: &str, contents: &HubRevision) -> Reply {
    let siblings: Vec<Value> = contents
        .files
        .keys()
        .map(|path| json!({ "rfilename": path }))
        .collect();
    let mut info = json!({
        "id": repo,
        "sha": contents.commit,
        "private": false,
        "gated": false,
        "disabled": false,
        "siblings": siblings,
    });
    if let (Some((owner, _)), Some(fields)) = (repo.split_once('/'), info.as_object_mut()) {
        fields.insert("author".to_string(), json!(owner));
    }
    if let (RepoKind::Model, Some(fields)) = (kind, info.as_object_mut()) {
        fields.insert("modelId".to_string(), json!(repo));
    }
    json_reply(&info)
}

/// The tree entries under `dir` (empty for the root), sorted by path; `None` when `dir` holds no
/// file, which the hub reports as a missing entry.
fn tree_entries(contents: &HubRevision, dir: &str, recursive: bool) -> Option<Vec<Value>> {
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    let mut directories = BTreeSet::new();
    let mut entries: BTreeMap<String, Value> = BTreeMap::new();
    for (path, file) in &contents.files {
        let Some(rest) = path.strip_prefix(&prefix) else {
            continue;
        };
        let mut ancestors = rest.match_indices('/').map(|(at, _)| &rest[..at]);
        if recursive {
            directories.extend(ancestors.map(|ancestor| format!("{prefix}{ancestor}")));
        } else if let Some(child) = ancestors.next() {
            directories.insert(format!("{prefix}{child}"));
            continue;
        }
        let entry = json!({
            "type": "file",
            "oid": file.sha256,
            "size": file.bytes.len(),
            "path": path,
        });
        entries.insert(path.clone(), entry);
    }
    if !dir.is_empty() && entries.is_empty() && directories.is_empty() {
        return None;
    }
    for directory in directories {
        let oid = hex::encode(Sha256::digest(
            format!("{}\0{directory}", contents.commit).as_bytes(),
        ))[..40]
            .to_string();
        let entry = json!({ "type": "directory", "oid": oid, "size": 0, "path": directory });
        entries.insert(directory, entry);
    }
    Some(entries.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A response as a raw client reads it off the wire.
    struct RawResponse {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl RawResponse {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .map(|(_, value)| value.as_str())
        }

        fn content_length(&self) -> usize {
            self.header("content-length")
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("no Content-Length in {:?}", self.headers))
        }
    }

    fn connect(server: &LoopbackServer) -> BufReader<TcpStream> {
        let stream = TcpStream::connect(server.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        BufReader::new(stream)
    }

    fn send(conn: &mut BufReader<TcpStream>, request: &str) {
        conn.get_mut().write_all(request.as_bytes()).unwrap();
    }

    /// Status line and headers only.
    fn read_head(conn: &mut BufReader<TcpStream>) -> RawResponse {
        let status_line = read_line(conn).unwrap().expect("a status line");
        let status = status_line
            .strip_prefix("HTTP/1.1 ")
            .and_then(|rest| rest.get(..3))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = read_line(conn).unwrap().expect("a header line");
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("a colon");
            headers.push((name.to_string(), value.trim().to_string()));
        }
        RawResponse {
            status,
            headers,
            body: Vec::new(),
        }
    }

    fn read_response(conn: &mut BufReader<TcpStream>) -> RawResponse {
        let mut response = read_head(conn);
        let mut body = vec![0; response.content_length()];
        conn.read_exact(&mut body).unwrap();
        response.body = body;
        response
    }

    fn assert_closed(conn: &mut BufReader<TcpStream>) {
        let mut rest = Vec::new();
        let read = conn.read_to_end(&mut rest).unwrap();
        assert_eq!(
            read,
            0,
            "expected EOF, got {:?}",
            String::from_utf8_lossy(&rest)
        );
    }

    fn get(path: &str) -> String {
        format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")
    }

    fn scripted_server() -> LoopbackServer {
        let body: Vec<u8> = (0..=255u8).collect();
        let handler: Handler = Arc::new(move |request: &Request| match request.path.as_str() {
            "/image.jpg" => Reply::ok(body.clone(), "image/jpeg"),
            "/moved" => Reply::redirect(302, "/image.jpg"),
            "/truncated" => Reply::ok(body.clone(), "image/jpeg").fault(Fault::TruncateAt(10)),
            "/slow" => {
                Reply::ok("late", "text/plain").fault(Fault::Delay(Duration::from_millis(200)))
            }
            "/hangup" => Reply::ok("never sent", "text/plain").fault(Fault::Hangup),
            "/echo" => {
                let seen = format!(
                    "{} {} {} {}",
                    request.method,
                    request.path,
                    request.query,
                    request.header("x-probe").unwrap_or("-")
                );
                Reply::ok(seen, "text/plain").header("X-Custom", "yes")
            }
            _ => Reply::status(404),
        });
        LoopbackServer::start(handler).unwrap()
    }

    #[test]
    fn serves_ok_not_found_and_redirect_on_one_keep_alive_connection() {
        let server = scripted_server();
        assert!(server.base_url().starts_with("http://127.0.0.1:"));
        assert_eq!(server.url("/x"), format!("{}/x", server.base_url()));
        let mut conn = connect(&server);

        send(&mut conn, &get("/image.jpg"));
        let ok = read_response(&mut conn);
        assert_eq!(ok.status, 200);
        assert_eq!(ok.content_length(), 256);
        assert_eq!(ok.body, (0..=255u8).collect::<Vec<_>>());
        assert_eq!(ok.header("content-type"), Some("image/jpeg"));
        assert_eq!(ok.header("connection"), Some("keep-alive"));

        send(&mut conn, &get("/missing"));
        let missing = read_response(&mut conn);
        assert_eq!(missing.status, 404);
        assert_eq!(missing.content_length(), 0);

        send(&mut conn, &get("/moved"));
        let moved = read_response(&mut conn);
        assert_eq!(moved.status, 302);
        assert_eq!(moved.header("location"), Some("/image.jpg"));
        assert_eq!(server.requests_served(), 3);
    }

    #[test]
    fn pipelined_requests_each_get_an_answer() {
        let server = scripted_server();
        let mut conn = connect(&server);
        send(
            &mut conn,
            &format!("{}{}", get("/image.jpg"), get("/missing")),
        );
        assert_eq!(read_response(&mut conn).status, 200);
        assert_eq!(read_response(&mut conn).status, 404);
    }

    #[test]
    fn head_announces_the_length_but_sends_no_body() {
        let server = scripted_server();
        let mut conn = connect(&server);
        send(&mut conn, "HEAD /image.jpg HTTP/1.1\r\nHost: t\r\n\r\n");
        let head = read_head(&mut conn);
        assert_eq!(head.status, 200);
        assert_eq!(head.content_length(), 256);
        // Had the HEAD reply carried a body, this would read image bytes as a status line.
        send(&mut conn, &get("/missing"));
        assert_eq!(read_response(&mut conn).status, 404);
    }

    #[test]
    fn connection_close_is_honoured() {
        let server = scripted_server();
        let mut conn = connect(&server);
        send(
            &mut conn,
            "GET /image.jpg HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        );
        let response = read_response(&mut conn);
        assert_eq!(response.header("connection"), Some("close"));
        assert_closed(&mut conn);
    }

    #[test]
    fn request_fields_and_bodies_are_parsed() {
        let server = scripted_server();
        let mut conn = connect(&server);
        send(
            &mut conn,
            "POST /echo?a=1&b=%20 HTTP/1.1\r\nX-Probe: yes\r\nContent-Length: 5\r\n\r\nhello",
        );
        let echoed = read_response(&mut conn);
        assert_eq!(echoed.body, b"POST /echo a=1&b=%20 yes");
        assert_eq!(echoed.header("x-custom"), Some("yes"));

        send(
            &mut conn,
            "PUT /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        );
        assert_eq!(read_response(&mut conn).body, b"PUT /echo  -");

        send(&mut conn, "GET /a%2Fb%20c HTTP/1.1\r\n\r\n");
        assert_eq!(read_response(&mut conn).status, 404);
        send(&mut conn, "GET http://127.0.0.1/echo?q HTTP/1.1\r\n\r\n");
        assert_eq!(read_response(&mut conn).body, b"GET /echo q -");
    }

    #[test]
    fn truncate_fault_announces_full_length_then_closes() {
        let server = scripted_server();
        let mut conn = connect(&server);
        send(&mut conn, &get("/truncated"));
        let head = read_head(&mut conn);
        assert_eq!(head.status, 200);
        assert_eq!(head.content_length(), 256);
        let mut body = Vec::new();
        conn.read_to_end(&mut body).unwrap();
        assert_eq!(body, (0..10u8).collect::<Vec<_>>());
    }

    #[test]
    fn delay_fault_holds_the_reply_back() {
        let server = scripted_server();
        let mut conn = connect(&server);
        let started = Instant::now();
        send(&mut conn, &get("/slow"));
        conn.get_ref()
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let mut byte = [0u8; 1];
        let early = conn.get_mut().read(&mut byte);
        let timed_out = early.as_ref().is_err_and(|e| {
            matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            )
        });
        assert!(timed_out, "reply arrived before the delay: {early:?}");
        conn.get_ref()
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let late = read_response(&mut conn);
        assert_eq!(late.body, b"late");
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    #[test]
    fn hangup_fault_closes_without_a_reply() {
        let server = scripted_server();
        let mut conn = connect(&server);
        send(&mut conn, &get("/hangup"));
        assert_closed(&mut conn);
        assert_eq!(server.requests_served(), 1);
    }

    #[test]
    fn malformed_request_line_closes_the_connection() {
        let server = scripted_server();
        let mut conn = connect(&server);
        send(&mut conn, "this is not http\r\n\r\n");
        assert_closed(&mut conn);
        assert_eq!(server.requests_served(), 0);
    }

    #[test]
    fn drop_returns_promptly_and_closes_idle_connections() {
        let server = scripted_server();
        let mut idle = connect(&server);
        send(&mut idle, &get("/missing"));
        read_response(&mut idle);
        let started = Instant::now();
        drop(server);
        assert!(started.elapsed() < Duration::from_millis(500));
        assert_closed(&mut idle);
    }

    #[test]
    fn byte_ranges_follow_rfc_9110() {
        assert_eq!(parse_range("bytes=2-4", 10), ByteRange::Slice(2, 4));
        assert_eq!(parse_range("bytes=2-", 10), ByteRange::Slice(2, 9));
        assert_eq!(parse_range("bytes=5-99", 10), ByteRange::Slice(5, 9));
        assert_eq!(parse_range("bytes=-3", 10), ByteRange::Slice(7, 9));
        assert_eq!(parse_range("bytes=10-", 10), ByteRange::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,4-5", 10), ByteRange::Whole);
        assert_eq!(parse_range("items=0-1", 10), ByteRange::Whole);
    }

    #[test]
    fn percent_decoding_keeps_malformed_escapes() {
        assert_eq!(
            percent_decode("refs%2Fconvert%2Fparquet"),
            "refs/convert/parquet"
        );
        assert_eq!(percent_decode("a%20b%zz%4"), "a b%zz%4");
    }

    fn hub_client(hub: &MockHub, cache: &tempfile::TempDir) -> hf_hub::HFClientSync {
        hf_hub::HFClient::builder()
            .endpoint(hub.endpoint())
            .cache_dir(cache.path())
            .build_sync()
            .unwrap()
    }

    fn tree_paths(entries: &[hf_hub::repository::RepoTreeEntry]) -> Vec<String> {
        use hf_hub::repository::RepoTreeEntry;
        entries
            .iter()
            .map(|entry| match entry {
                RepoTreeEntry::File { path, size, .. } => format!("file {path} {size}"),
                RepoTreeEntry::Directory { path, .. } => format!("dir {path}"),
            })
            .collect()
    }

    #[test]
    fn hub_lists_and_downloads_dataset_files_through_hf_hub() {
        let hub = MockHub::start().unwrap();
        hub.add_dataset_file("owner/name", "main", "README.md", b"# card".to_vec());
        hub.add_dataset_file("owner/name", "main", "data/x.parquet", b"PAR1 x".to_vec());
        hub.add_dataset_file("owner/name", "main", "data/y.parquet", b"PAR1 yy".to_vec());
        let cache = tempfile::tempdir().unwrap();
        let client = hub_client(&hub, &cache);
        let repo = client.dataset("owner", "name");

        let tree = repo
            .list_tree()
            .revision("main".to_string())
            .recursive(true)
            .send()
            .unwrap();
        assert_eq!(
            tree_paths(&tree),
            [
                "file README.md 6",
                "dir data",
                "file data/x.parquet 6",
                "file data/y.parquet 7"
            ]
        );

        let path = repo
            .download_file()
            .filename("data/x.parquet".to_string())
            .revision("main".to_string())
            .send()
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"PAR1 x");
        let commit = hub.commit_of("owner/name", "main");
        assert!(path.to_string_lossy().contains(&commit), "{path:?}");

        let info = repo.info().revision("main".to_string()).send().unwrap();
        assert_eq!(info.sha.as_deref(), Some(commit.as_str()));
        assert_eq!(info.siblings.map(|s| s.len()), Some(3));

        // A second download revalidates with If-None-Match and needs no GET.
        let again = repo
            .download_file()
            .filename("data/x.parquet".to_string())
            .revision("main".to_string())
            .send()
            .unwrap();
        assert_eq!(again, path);
        let log = hub.request_log();
        let resolve = "/datasets/owner/name/resolve/main/data/x.parquet";
        assert_eq!(
            log,
            [
                "GET /api/datasets/owner/name/tree/main?recursive=true".to_string(),
                format!("HEAD {resolve}"),
                format!("GET {resolve}"),
                "GET /api/datasets/owner/name/revision/main".to_string(),
                format!("HEAD {resolve}"),
            ]
        );
    }

    #[test]
    fn hub_serves_parquet_conversion_ref_and_subdirectories() {
        let hub = MockHub::start().unwrap();
        let parquet = "default/train/0000.parquet";
        hub.add_dataset_file("o/n", "refs/convert/parquet", parquet, vec![7; 3000]);
        let cache = tempfile::tempdir().unwrap();
        let client = hub_client(&hub, &cache);
        let repo = client.dataset("o", "n");

        let top = repo
            .list_tree()
            .revision("refs/convert/parquet".to_string())
            .send()
            .unwrap();
        assert_eq!(tree_paths(&top), ["dir default"]);
        let train = repo
            .list_tree()
            .revision("refs/convert/parquet".to_string())
            .path_in_repo("default/train".to_string())
            .send()
            .unwrap();
        assert_eq!(tree_paths(&train), [format!("file {parquet} 3000")]);

        let path = repo
            .download_file()
            .filename(parquet.to_string())
            .revision("refs/convert/parquet".to_string())
            .send()
            .unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![7; 3000]);

        // The pinned commit works as a revision too.
        let commit = hub.commit_of("o/n", "refs/convert/parquet");
        let by_commit = repo
            .download_file_to_bytes()
            .filename(parquet.to_string())
            .revision(commit)
            .range(10..20)
            .send()
            .unwrap();
        assert_eq!(by_commit.as_ref(), &[7; 10]);
        assert!(hub.request_log().contains(&format!(
            "HEAD /datasets/o/n/resolve/refs%2Fconvert%2Fparquet/{parquet}"
        )));
    }

    #[test]
    fn hub_missing_file_is_entry_not_found() {
        let hub = MockHub::start().unwrap();
        hub.add_dataset_file("owner/name", "main", "data/x.parquet", b"x".to_vec());
        let cache = tempfile::tempdir().unwrap();
        let client = hub_client(&hub, &cache);
        let missing = client
            .dataset("owner", "name")
            .download_file()
            .filename("data/nope.parquet".to_string())
            .revision("main".to_string())
            .send();
        assert!(
            matches!(missing, Err(hf_hub::HFError::EntryNotFound { .. })),
            "{missing:?}"
        );
    }

    #[test]
    fn hub_unknown_repo_and_revision_carry_hub_error_codes() {
        let hub = MockHub::start().unwrap();
        hub.add_dataset_file("owner/name", "main", "a.txt", b"a".to_vec());
        let cache = tempfile::tempdir().unwrap();
        let client = hub_client(&hub, &cache);

        let unknown_repo = client
            .dataset("owner", "other")
            .info()
            .revision("main".to_string())
            .send();
        // hf-hub maps every 404 on a revision-info call to RevisionNotFound; the header tells
        // the two cases apart.
        assert!(
            matches!(
                &unknown_repo,
                Err(hf_hub::HFError::RevisionNotFound { context: Some(context), .. })
                    if context.error_code.as_deref() == Some("RepoNotFound")
            ),
            "{unknown_repo:?}"
        );
        let unknown_revision = client
            .dataset("owner", "name")
            .info()
            .revision("v9".to_string())
            .send();
        assert!(
            matches!(
                &unknown_revision,
                Err(hf_hub::HFError::RevisionNotFound { context: Some(context), .. })
                    if context.error_code.as_deref() == Some("RevisionNotFound")
            ),
            "{unknown_revision:?}"
        );
    }

    #[test]
    fn hub_downloads_model_files() {
        let hub = MockHub::start().unwrap();
        hub.add_model_file(
            "openai/clip-vit-base-patch32",
            "main",
            "config.json",
            b"{}".to_vec(),
        );
        let cache = tempfile::tempdir().unwrap();
        let client = hub_client(&hub, &cache);
        let path = client
            .model("openai", "clip-vit-base-patch32")
            .download_file()
            .filename("config.json".to_string())
            .send()
            .unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"{}");
        assert_eq!(
            hub.request_log()[0],
            "HEAD /openai/clip-vit-base-patch32/resolve/main/config.json"
        );
    }
}

//! The admin channel and the metrics endpoint, served from the master's
//! poll loop without blocking it: a slow or silent client costs nothing
//! and is dropped after a few seconds.
//!
//! - Admin: a Unix socket created with mode 0600 (so only the server's user
//!   can use it). A client sends one JSON command on one line
//!   (`{"cmd":"status"}`, `{"cmd":"reload"}`, `{"cmd":"stop","fast":false}`,
//!   `{"cmd":"scale","group":"echo","workers":4}`) and gets one JSON object
//!   back, with `"ok"` true or false. A reload is answered when it
//!   finishes.
//! - Metrics: if `server.metrics_listen` is set, an HTTP/1.x listener
//!   answering `GET /metrics` in the Prometheus text format and `GET
//!   /ping` with 200 `pong` while every group serves (503 and the reason
//!   otherwise: a health check for load balancers, as PHP-FPM's
//!   `ping.path`; `/ping?group=NAME` for one group), then closing. `HEAD`
//!   gets the same status and headers.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use tracing::{debug, warn};

use super::sys;

/// How long a client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_REQUEST: usize = 64 << 10;
/// Most admin-socket clients open at once (only the server's user can
/// connect; a reload or stop keeps its client until it ends).
pub(crate) const MAX_ADMIN_CLIENTS: usize = 16;
/// Most metrics clients open at once: the listener is TCP, so anyone who
/// can reach it could otherwise take every descriptor the master has
/// and leave it unable to start a worker. Beyond it a connection is
/// closed at once.
pub(crate) const MAX_HTTP_CLIENTS: usize = 16;
/// After an accept failed for want of descriptors, how long the
/// listeners are left alone (instead of being polled, readable, in a
/// loop).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// How often a refusal is logged at most.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// An admin command.
#[derive(Debug, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
pub(crate) enum Command {
    // (Empty struct variants, not unit ones: serde's internally tagged
    // enums ignore extra fields beside a unit variant's tag, so
    // `{"cmd":"status","x":1}` was accepted despite deny_unknown_fields.)
    /// Everything about every worker, as JSON.
    Status {},
    /// Re-read the configuration and replace every worker, chain-wise.
    Reload {},
    /// Stop: drain gracefully, or at once.
    Stop {
        #[serde(default)]
        fast: bool,
    },
    /// Set a group's number of workers.
    Scale { group: String, workers: u32 },
}

/// A request to act on.
pub(crate) enum Request {
    Admin {
        conn: u64,
        command: Command,
    },
    /// An HTTP request for `what`; `head`: answer without the body.
    Http {
        conn: u64,
        what: Http,
        head: bool,
    },
}

/// What an HTTP client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Http {
    Metrics,
    /// `/ping`, or `/ping?group=NAME` for that group alone.
    Ping(Option<String>),
}

/// A JSON success answer with a message.
pub(crate) fn ok(message: &str) -> String {
    serde_json::json!({"ok": true, "message": message}).to_string()
}

/// A JSON failure answer.
pub(crate) fn err(error: &str) -> String {
    serde_json::json!({"ok": false, "error": error}).to_string()
}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn raw(&self) -> i32 {
        match self {
            Stream::Unix(s) => s.as_raw_fd(),
            Stream::Tcp(s) => s.as_raw_fd(),
        }
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }
    /// Shuts the sending side (the client sees the end of the answer);
    /// false if that failed.
    fn shutdown_write(&self) -> bool {
        let how = std::net::Shutdown::Write;
        match self {
            Stream::Unix(s) => s.shutdown(how).is_ok(),
            Stream::Tcp(s) => s.shutdown(how).is_ok(),
        }
    }
}

#[derive(PartialEq, Eq)]
enum Phase {
    Reading,
    /// Request handed to the master; the answer comes later (reload).
    Waiting,
    Writing,
    /// Answered a request it had not finished sending (too long): what
    /// still comes is read and dropped until the client closes (or
    /// `LINGER`), so that closing does not reset the connection before
    /// the client reads the answer (nginx's lingering close).
    Lingering,
}

/// How long a lingering close waits for the client to finish.
const LINGER: Duration = Duration::from_secs(2);

struct Conn {
    id: u64,
    stream: Stream,
    http: bool,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    phase: Phase,
    deadline: Instant,
    /// Linger once the answer is out (see `Phase::Lingering`).
    linger: bool,
    /// When it was accepted.
    since: Instant,
    /// How much of `inbuf` is known not to hold the end of the request
    /// (so a client sending a byte at a time costs a scan of what is new,
    /// not of all it sent).
    scanned: usize,
}

pub(crate) struct Admin {
    path: PathBuf,
    unix: Option<UnixListener>,
    metrics: Option<TcpListener>,
    conns: Vec<Conn>,
    next_id: u64,
    /// Listeners are not polled until then (out of descriptors).
    paused_until: Option<Instant>,
    /// Connections closed unanswered (over a limit, or out of
    /// descriptors) since the last warning, and when that was.
    refused: u64,
    refused_logged: Option<Instant>,
}

impl Admin {
    /// Creates the admin socket (replacing a stale one of ours) and the
    /// metrics listener.
    pub(crate) fn bind(path: &Path, metrics: Option<SocketAddr>) -> Result<Admin> {
        // The metrics listener first: if it fails there is no socket file
        // to clean up.
        let metrics = match metrics {
            None => None,
            Some(addr) => {
                let l = TcpListener::bind(addr).map_err(|e| {
                    anyhow::anyhow!(super::listen_error(addr, &e, "server.metrics_listen"))
                })?;
                l.set_nonblocking(true)?;
                Some(l)
            }
        };
        super::check_socket_path(path).map_err(|e| anyhow::anyhow!(e))?;
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "admin socket {} is in use: is another halfsync running? Stop it or set server.admin_socket",
                    path.display()
                );
            }
            if !meta.file_type().is_socket() || meta.uid() != sys::euid() {
                bail!(
                    "{} exists and is not a stale halfsync admin socket of this user; remove it or set server.admin_socket",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale admin socket {}", path.display()))?;
        }
        // Created 0600 from the start: no window where others could connect.
        let old = sys::umask(0o177);
        let bound = UnixListener::bind(path);
        sys::umask(old);
        let unix =
            bound.with_context(|| format!("cannot create admin socket {}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 0600 {}", path.display()))?;
        unix.set_nonblocking(true)?;
        Ok(Admin {
            path: path.to_path_buf(),
            unix: Some(unix),
            metrics,
            conns: Vec::new(),
            next_id: 1,
            paused_until: None,
            refused: 0,
            refused_logged: None,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Appends pollfds: the admin socket, the metrics listener, then each
    /// client, in the order `on_ready` expects.
    pub(crate) fn fill_pollfds(&self, fds: &mut Vec<libc::pollfd>) {
        let paused = self.paused_until.is_some_and(|t| Instant::now() < t);
        let listener = |fd: Option<i32>| if paused { -1 } else { fd.unwrap_or(-1) };
        fds.push(sys::pollfd(
            listener(self.unix.as_ref().map(|l| l.as_raw_fd())),
            false,
        ));
        fds.push(sys::pollfd(
            listener(self.metrics.as_ref().map(|l| l.as_raw_fd())),
            false,
        ));
        for c in &self.conns {
            let mut p = sys::pollfd(c.stream.raw(), c.phase == Phase::Writing);
            if !matches!(c.phase, Phase::Reading | Phase::Lingering) {
                p.events &= !libc::POLLIN;
            }
            fds.push(p);
        }
    }

    /// Handles readiness (the pollfds `fill_pollfds` added, same order);
    /// returns the complete requests.
    pub(crate) fn on_ready(&mut self, fds: &[libc::pollfd]) -> Vec<Request> {
        let mut out = Vec::new();
        let ready: Vec<bool> = fds.iter().map(|p| p.revents != 0).collect();
        if ready.len() < 2 {
            return out;
        }
        // Clients first: accepting appends to `conns`. Each client's
        // readiness is found by its descriptor, not by its place: between
        // `fill_pollfds` and now the loop may have answered (and dropped) a
        // client, which shifts the places of those after it.
        let revents_of = |fd: i32| {
            fds.get(2..)
                .unwrap_or_default()
                .iter()
                .find(|p| p.fd == fd)
                .map_or(0, |p| p.revents)
        };
        let mut closed = Vec::new();
        for c in self.conns.iter_mut() {
            let revents = revents_of(c.stream.raw());
            if revents == 0 {
                continue;
            }
            match c.phase {
                Phase::Reading => match read_request(c) {
                    Ok(Some(r)) => out.push(r),
                    Ok(None) => {}
                    Err(e) => {
                        debug!("admin client: {e}");
                        closed.push(c.id);
                    }
                },
                Phase::Writing => {
                    if flush(c) && answered(c) {
                        closed.push(c.id);
                    }
                }
                Phase::Lingering => {
                    if !discard_input(c) {
                        closed.push(c.id);
                    }
                }
                // Hung up while its answer is pending (a reload's client
                // interrupted): forget it, or poll would report the hangup
                // on every turn until the answer.
                Phase::Waiting => {
                    if revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                        closed.push(c.id);
                    }
                }
            }
        }
        self.conns.retain(|c| !closed.contains(&c.id));
        let mut accepted = Vec::new();
        let mut out_of_fds = false;
        if ready[0]
            && let Some(l) = &self.unix
        {
            let mut room = MAX_ADMIN_CLIENTS.saturating_sub(self.clients(false));
            loop {
                match l.accept() {
                    Ok((s, _)) if room > 0 && s.set_nonblocking(true).is_ok() => {
                        room -= 1;
                        accepted.push((Stream::Unix(s), false));
                    }
                    Ok(_) => self.refused += 1, // closed at once
                    Err(e) => {
                        out_of_fds |= is_out_of_fds(&e);
                        break;
                    }
                }
            }
        }
        if ready[1]
            && let Some(l) = &self.metrics
        {
            let mut room = MAX_HTTP_CLIENTS.saturating_sub(self.clients(true));
            loop {
                match l.accept() {
                    Ok((s, _)) => {
                        // Full: a client done, silent or idle gives way,
                        // so that connections that send nothing cannot
                        // keep a load balancer's /ping out.
                        if room == 0
                            && let Some(k) = idle_http_client(&self.conns)
                        {
                            self.conns.remove(k);
                            self.refused += 1;
                            room = 1;
                        }
                        if room > 0 && s.set_nonblocking(true).is_ok() {
                            room -= 1;
                            accepted.push((Stream::Tcp(s), true));
                        } else {
                            self.refused += 1;
                        }
                    }
                    Err(e) => {
                        out_of_fds |= is_out_of_fds(&e);
                        break;
                    }
                }
            }
        }
        if out_of_fds {
            self.refused += 1;
            self.paused_until = Some(Instant::now() + ACCEPT_PAUSE);
        }
        if self.refused > 0
            && self
                .refused_logged
                .is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY)
        {
            warn!(
                refused = self.refused,
                admin_clients = self.clients(false),
                metrics_clients = self.clients(true),
                out_of_fds,
                "admin or metrics connections closed unanswered: at most {MAX_ADMIN_CLIENTS} admin and \
                 {MAX_HTTP_CLIENTS} metrics clients are served at once, each for at most 5 s (the \
                 oldest metrics client still sending its request gives way to a new one)"
            );
            self.refused = 0;
            self.refused_logged = Some(Instant::now());
        }
        for (s, http) in accepted {
            self.push(s, http);
        }
        out
    }

    /// Clients open now, of the metrics listener (`http`) or the admin
    /// socket.
    fn clients(&self, http: bool) -> usize {
        self.conns.iter().filter(|c| c.http == http).count()
    }

    fn push(&mut self, stream: Stream, http: bool) {
        let id = self.next_id;
        self.next_id += 1;
        self.conns.push(Conn {
            id,
            stream,
            http,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            phase: Phase::Reading,
            deadline: Instant::now() + CLIENT_TIMEOUT,
            linger: false,
            since: Instant::now(),
            scanned: 0,
        });
    }

    /// Sends an admin answer (one JSON line) and closes the connection.
    pub(crate) fn respond(&mut self, conn: u64, mut body: String) {
        body.push('\n');
        self.send(conn, body.into_bytes());
    }

    /// Sends an HTTP answer (`status` such as `200 OK`; `head`: headers
    /// only) and closes the connection.
    pub(crate) fn respond_http(&mut self, conn: u64, status: &str, body: &str, head: bool) {
        let content_type = if body.starts_with('#') {
            "text/plain; version=0.0.4; charset=utf-8"
        } else {
            "text/plain; charset=utf-8"
        };
        let bytes = http_answer(status, &[("Content-Type", content_type)], body, head);
        self.send(conn, bytes);
    }

    fn send(&mut self, conn: u64, bytes: Vec<u8>) {
        let Some(k) = self.conns.iter().position(|c| c.id == conn) else {
            return; // the client gave up
        };
        let c = &mut self.conns[k];
        c.out = bytes;
        c.out_pos = 0;
        c.phase = Phase::Writing;
        c.deadline = Instant::now() + CLIENT_TIMEOUT;
        if flush(c) && answered(c) {
            self.conns.remove(k);
        }
    }

    /// Drops clients past their deadline (waiting ones never expire: a
    /// reload may take long, and the client chose to wait). One that sent
    /// part of a request is told why first, as well as a socket buffer
    /// takes it (HTTP 408, or an admin JSON error); one that sent nothing
    /// is just closed, as nginx does.
    pub(crate) fn sweep(&mut self) {
        let now = Instant::now();
        for c in self
            .conns
            .iter_mut()
            .filter(|c| c.phase == Phase::Reading && c.deadline <= now && !c.inbuf.is_empty())
        {
            c.out = if c.http {
                http_answer(
                    "408 Request Timeout",
                    &[("Content-Type", "text/plain")],
                    "request not complete within 5 s\n",
                    false,
                )
            } else {
                let mut line =
                    err("admin command not complete within 5 s (one JSON object, then a newline)");
                line.push('\n');
                line.into_bytes()
            };
            c.out_pos = 0;
            let _ = flush(c);
        }
        self.conns
            .retain(|c| c.phase == Phase::Waiting || c.deadline > now);
    }

    /// When `sweep` next has something to do.
    pub(crate) fn next_deadline(&self) -> Instant {
        self.conns
            .iter()
            .filter(|c| c.phase != Phase::Waiting)
            .map(|c| c.deadline)
            .chain(self.paused_until.filter(|&t| t > Instant::now()))
            .min()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
    }

    /// Answers these clients before the master exits (blocking, briefly).
    pub(crate) fn answer_now(&mut self, conns: &[u64], body: &str) {
        for c in self.conns.iter_mut().filter(|c| conns.contains(&c.id)) {
            let mut line = body.as_bytes().to_vec();
            line.push(b'\n');
            if let Stream::Unix(s) = &mut c.stream {
                let _ = s.set_nonblocking(false);
                let _ = s.set_write_timeout(Some(Duration::from_secs(1)));
                let _ = s.write_all(&line);
            }
        }
    }

    /// Closes everything and removes the socket file.
    pub(crate) fn close(&mut self) {
        self.conns.clear();
        self.metrics = None;
        if self.unix.take().is_some()
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            warn!("cannot remove admin socket {}: {e}", self.path.display());
        }
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.close();
    }
}

/// Reads what is available; returns a request once one is complete.
fn read_request(c: &mut Conn) -> io::Result<Option<Request>> {
    let mut buf = [0u8; 4096];
    let mut eof = false;
    loop {
        match c.stream.read(&mut buf) {
            // An admin command without its newline, then the write side
            // shut: the command is what came.
            Ok(0) if !c.http && !c.inbuf.is_empty() => {
                eof = true;
                break;
            }
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed")),
            Ok(n) => {
                c.inbuf.extend_from_slice(&buf[..n]);
                // Empty lines before a request line are ignored (RFC 9112
                // 2.2: some clients send a CRLF after a previous request).
                if c.http && c.scanned == 0 {
                    let blank = c
                        .inbuf
                        .iter()
                        .take_while(|&&b| b == b'\r' || b == b'\n')
                        .count();
                    c.inbuf.drain(..blank);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        // A whole request: what follows (a body) is not read, and not held
        // against the limit.
        if request_end(c).is_some() {
            break;
        }
        if c.inbuf.len() > MAX_REQUEST {
            // Said, not just dropped; then a lingering close.
            c.out = if c.http {
                http_answer(
                    "431 Request Header Fields Too Large",
                    &[("Content-Type", "text/plain")],
                    "request head over 64 KiB\n",
                    false,
                )
            } else {
                let mut line = err("admin command over 64 KiB (one JSON object on one line)");
                line.push('\n');
                line.into_bytes()
            };
            c.inbuf = Vec::new();
            c.phase = Phase::Writing;
            c.linger = true;
            return Ok(None);
        }
    }
    if c.http {
        let Some(end) = request_end(c) else {
            return Ok(None);
        };
        let head = String::from_utf8_lossy(&c.inbuf[..end]).into_owned();
        let line = head.lines().next().unwrap_or_default().to_owned();
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        // An absolute URI (as sent to a proxy) names the path after the host.
        let target = ["http://", "https://"]
            .iter()
            .find_map(|scheme| target.strip_prefix(scheme))
            .map_or(target, |rest| rest.find('/').map_or("/", |i| &rest[i..]));
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let what = match path {
            "/metrics" => Some(Http::Metrics),
            "/ping" => Some(Http::Ping(
                query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("group="))
                    .map(percent_decode),
            )),
            _ => None,
        };
        let head = method == "HEAD";
        match what {
            Some(what) if method == "GET" || head => {
                c.phase = Phase::Waiting;
                return Ok(Some(Request::Http {
                    conn: c.id,
                    what,
                    head,
                }));
            }
            Some(_) => {
                c.out = http_answer(
                    "405 Method Not Allowed",
                    &[("Allow", "GET, HEAD"), ("Content-Type", "text/plain")],
                    &format!("method not allowed: {path} answers GET and HEAD\n"),
                    false,
                );
            }
            None => {
                c.out = http_answer(
                    "404 Not Found",
                    &[("Content-Type", "text/plain")],
                    "not found: metrics are at /metrics, the health check at /ping\n",
                    head,
                );
            }
        }
        c.phase = Phase::Writing;
        return Ok(None);
    }
    let Some(end) = request_end(c).or(eof.then_some(c.inbuf.len())) else {
        return Ok(None);
    };
    let line = String::from_utf8_lossy(&c.inbuf[..end]).into_owned();
    match serde_json::from_str::<Command>(line.trim()) {
        Ok(command) => {
            c.phase = Phase::Waiting;
            Ok(Some(Request::Admin {
                conn: c.id,
                command,
            }))
        }
        Err(e) => {
            let mut body = err(&format!("bad admin command: {e}"));
            body.push('\n');
            c.out = body.into_bytes();
            c.phase = Phase::Writing;
            Ok(None)
        }
    }
}

/// An HTTP/1.1 answer that closes the connection; `head`: without the
/// body (Content-Length still gives its size, as HEAD requires).
fn http_answer(status: &str, headers: &[(&str, &str)], body: &str, head: bool) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    if !head {
        out.push_str(body);
    }
    out.into_bytes()
}

/// A query value with its `%XX` escapes (and `+` for a space) decoded, as
/// a client that encodes every name sends it; a malformed escape is kept
/// as it is, and the bytes are read as UTF-8 (lossily).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether an accept failed for want of descriptors (the connection
/// stays in the backlog; polling the listener again at once would spin).
fn is_out_of_fds(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The metrics client to drop for a new one when all places are taken:
/// the longest lingering one, else the oldest that has not sent its whole
/// request, whatever it has sent so far. (A load balancer's request comes
/// in its first packet and is read at the next turn, long before it is
/// the oldest; connections opened to send nothing, or a byte, a few a
/// second, used to fill every place and keep its `/ping` out.)
fn idle_http_client(conns: &[Conn]) -> Option<usize> {
    let pick = |phase: Phase| {
        conns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.http && c.phase == phase)
            .min_by_key(|(_, c)| c.since)
            .map(|(k, _)| k)
    };
    pick(Phase::Lingering).or_else(|| pick(Phase::Reading))
}

/// The answer is out: true if the client can go now; false if it lingers
/// first (see `Phase::Lingering`): an HTTP client may have sent more (a
/// body) than was read, and closing then could reset the answer.
fn answered(c: &mut Conn) -> bool {
    if (c.linger || c.http) && c.stream.shutdown_write() {
        c.phase = Phase::Lingering;
        c.deadline = Instant::now() + LINGER;
        false
    } else {
        true
    }
}

/// Where the request in `c.inbuf` ends, if it is whole: an HTTP head at
/// its empty line (CRLF, or bare LF as RFC 9112 allows a recipient to
/// accept), an admin command at its newline.
fn request_end(c: &mut Conn) -> Option<usize> {
    // A terminator may straddle what was scanned and what is new.
    let from = c.scanned.saturating_sub(3).min(c.inbuf.len());
    let new = &c.inbuf[from..];
    let end = if c.http {
        new.windows(4)
            .position(|w| w == b"\r\n\r\n")
            .or_else(|| new.windows(2).position(|w| w == b"\n\n"))
    } else {
        new.iter().position(|&b| b == b'\n')
    };
    if end.is_none() {
        c.scanned = c.inbuf.len();
    }
    end.map(|e| from + e)
}

/// Reads and drops what a lingering client sends; false once it closed
/// (or failed).
fn discard_input(c: &mut Conn) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match c.stream.read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
}

/// Writes what it can; true when done (or failed) and the client can go.
fn flush(c: &mut Conn) -> bool {
    while c.out_pos < c.out.len() {
        match c.stream.write(&c.out[c.out_pos..]) {
            Ok(0) => return true,
            Ok(n) => c.out_pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::{Command, percent_decode};

    #[test]
    fn query_values_are_percent_decoded() {
        for (raw, want) in [
            ("echo", "echo"),
            ("ec%68o", "echo"),
            ("ec%68%6F%2f", "echo/"),
            ("a+b", "a b"),
            ("100%", "100%"),
            ("%zz%4", "%zz%4"),
            ("%C3%A9t%C3%A9", "\u{e9}t\u{e9}"),
            ("%ff", "\u{fffd}"),
        ] {
            assert_eq!(percent_decode(raw), want, "{raw}");
        }
    }

    /// Polls the admin's descriptors once (up to 2 s) and hands the result
    /// to `on_ready`, with `between` run after the poll, as the master's
    /// loop may answer clients between the two.
    fn turn(
        admin: &mut super::Admin,
        between: impl FnOnce(&mut super::Admin),
    ) -> Vec<super::Request> {
        let mut fds = Vec::new();
        admin.fill_pollfds(&mut fds);
        super::sys::poll(&mut fds, std::time::Duration::from_secs(2)).unwrap();
        between(admin);
        admin.on_ready(&fds)
    }

    /// A client answered (and dropped) between the poll and `on_ready`
    /// does not shift the others' readiness onto each other: a hangup is
    /// taken for the client that hung up, not for its neighbour, which
    /// still gets its answer. (Clients were matched by place.)
    #[test]
    fn readiness_goes_to_the_client_whose_it_is() {
        use std::io::{BufRead, Write};
        let dir = tempfile::tempdir().unwrap();
        let mut admin = super::Admin::bind(&dir.path().join("a.sock"), None).unwrap();
        let mut clients: Vec<std::os::unix::net::UnixStream> = (0..3)
            .map(|_| std::os::unix::net::UnixStream::connect(dir.path().join("a.sock")).unwrap())
            .collect();
        for c in &mut clients {
            c.write_all(b"{\"cmd\":\"reload\"}\n").unwrap();
        }
        // Accepted and read: three waiting clients, in order.
        let mut conns = Vec::new();
        for _ in 0..10 {
            for r in turn(&mut admin, |_| {}) {
                if let super::Request::Admin { conn, .. } = r {
                    conns.push(conn);
                }
            }
            if conns.len() == 3 {
                break;
            }
        }
        assert_eq!(conns.len(), 3);
        // The second hangs up; the first is answered between poll and
        // on_ready.
        drop(clients.remove(1));
        let first = conns[0];
        turn(&mut admin, |a| a.respond(first, "{\"ok\":true}".into()));
        // The third is still there to be answered.
        admin.respond(conns[2], "{\"ok\":true,\"n\":3}".into());
        let mut line = String::new();
        std::io::BufReader::new(&clients[1])
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "{\"ok\":true,\"n\":3}\n");
    }

    fn parse(s: &str) -> Result<Command, String> {
        serde_json::from_str::<Command>(s).map_err(|e| e.to_string())
    }

    #[test]
    fn commands_parse_and_unknown_fields_are_refused() {
        assert!(matches!(
            parse(r#"{"cmd":"status"}"#),
            Ok(Command::Status {})
        ));
        assert!(matches!(
            parse(r#"{"cmd":"reload"}"#),
            Ok(Command::Reload {})
        ));
        assert!(matches!(
            parse(r#"{"cmd":"stop","fast":true}"#),
            Ok(Command::Stop { fast: true })
        ));
        assert!(matches!(
            parse(r#"{"cmd":"scale","group":"g","workers":3}"#),
            Ok(Command::Scale { workers: 3, .. })
        ));
        for bad in [
            r#"{"cmd":"status","x":1}"#,
            r#"{"cmd":"reload","force":true}"#,
            r#"{"cmd":"stop","fats":true}"#,
            r#"{"cmd":"scale","group":"g","workers":3,"x":1}"#,
        ] {
            let e = parse(bad).expect_err(bad);
            assert!(e.contains("unknown field"), "{bad}: {e}");
        }
        assert!(parse(r#"{"cmd":"restart"}"#).is_err());
    }
}

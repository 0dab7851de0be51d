//! HTTP/1.1 on a Unix socket for the management API: requests parsed by
//! httparse, connections handled here so that every bound is ours. One
//! thread serves every client with `poll`; no client can hold it: a
//! request must arrive whole within [`Limits::request_time`], its head
//! within [`Limits::max_head`] bytes and its body within
//! [`Limits::max_body`]; at most [`Limits::max_clients`] are served at
//! once (the next get a 503 and are closed; beyond four times as many
//! they are closed unanswered). Each response closes its
//! connection (`Connection: close`): clients are scripts and scrapers, and
//! no idle connection is ever held.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

/// A request as a handler sees it.
#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path, without the query.
    pub path: String,
    pub body: Vec<u8>,
}

/// What a handler answers.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// Extra header lines (`Allow: GET`).
    pub headers: Vec<String>,
}

impl Response {
    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec_pretty(value).expect("JSON of plain values");
        body.push(b'\n');
        Response {
            status,
            content_type: "application/json",
            body,
            headers: Vec::new(),
        }
    }

    /// An error: `{"fault_message": reason}` (Firecracker's shape).
    pub fn error(status: u16, reason: impl Into<String>) -> Response {
        Response::json(
            status,
            &serde_json::json!({ "fault_message": reason.into() }),
        )
    }

    pub fn no_content() -> Response {
        Response {
            status: 204,
            content_type: "application/json",
            body: Vec::new(),
            headers: Vec::new(),
        }
    }

    pub fn text(status: u16, content_type: &'static str, body: String) -> Response {
        Response {
            status,
            content_type,
            body: body.into_bytes(),
            headers: Vec::new(),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nServer: rtvm\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            self.body.len()
        );
        if !self.body.is_empty() {
            out.push_str(&format!("Content-Type: {}\r\n", self.content_type));
        }
        for h in &self.headers {
            out.push_str(h);
            out.push_str("\r\n");
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// Answers requests; called on the server's thread, one at a time.
pub trait Handler {
    fn handle(&self, request: &Request) -> Response;
}

/// The server's bounds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_clients: usize,
    pub max_head: usize,
    pub max_body: usize,
    pub request_time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_clients: 16,
            max_head: 8 * 1024,
            max_body: 64 * 1024,
            request_time: Duration::from_secs(10),
        }
    }
}

/// Creates the API socket at `path`, mode 0600. A path that exists is
/// refused unless it is a stale socket (one nobody listens on), which is
/// replaced.
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(format!(
                    "{}: another process serves this socket",
                    path.display()
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| format!("{}: removing the stale socket: {e}", path.display()))?;
        }
        Ok(_) => {
            return Err(format!(
                "{}: exists and is not a socket; refusing to replace it",
                path.display()
            ))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", path.display())),
    }
    // Created 0600 from the start: a umask that lets others in never
    // applies, not even for an instant.
    // SAFETY: umask only changes this process's file-creation mask.
    let old = unsafe { libc::umask(0o177) };
    let listener = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(listener)
}

enum Phase {
    Reading,
    Writing { out: Vec<u8>, at: usize },
}

struct Client {
    stream: UnixStream,
    input: Vec<u8>,
    phase: Phase,
    deadline: Instant,
}

/// What reading a client's bytes came to.
enum Parsed {
    NeedMore,
    Done(Request),
    Bad(Response),
}

fn parse(input: &[u8], limits: &Limits) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(input) {
        Ok(httparse::Status::Partial) if input.len() > limits.max_head => {
            return Parsed::Bad(Response::error(431, "request head too large"))
        }
        Ok(httparse::Status::Partial) => return Parsed::NeedMore,
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Bad(Response::error(431, "too many header fields"))
        }
        Err(e) => return Parsed::Bad(Response::error(400, format!("malformed request: {e}"))),
    };
    if head > limits.max_head {
        return Parsed::Bad(Response::error(431, "request head too large"));
    }
    let mut length = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Parsed::Bad(Response::error(
                411,
                "chunked bodies are not accepted: send Content-Length",
            ));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            length = match std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                Some(n) => n,
                None => return Parsed::Bad(Response::error(400, "bad Content-Length")),
            };
        }
    }
    if length > limits.max_body {
        return Parsed::Bad(Response::error(
            413,
            format!("body over {} bytes", limits.max_body),
        ));
    }
    if input.len() < head + length {
        return Parsed::NeedMore;
    }
    let target = req.path.unwrap_or("/");
    let path = target.split('?').next().unwrap_or("/").to_string();
    Parsed::Done(Request {
        method: req.method.unwrap_or("").to_string(),
        path,
        body: input[head..head + length].to_vec(),
    })
}

/// Serves `listener` until `stop` is written; then finishes writing the
/// responses under way (up to a second) and returns.
pub fn serve(listener: &UnixListener, handler: &dyn Handler, stop: &EventFd, limits: Limits) {
    let mut clients: Vec<Client> = Vec::new();
    let mut stopping: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if let Some(since) = stopping {
            clients.retain(|c| matches!(c.phase, Phase::Writing { .. }));
            if clients.is_empty() || now.duration_since(since) > Duration::from_secs(1) {
                return;
            }
        }
        // Past their time: a request never completed gets a 408, a
        // response never taken is dropped.
        for c in &mut clients {
            if now >= c.deadline {
                match c.phase {
                    Phase::Reading => {
                        c.phase = Phase::Writing {
                            out: Response::error(408, "request not received in time").to_bytes(),
                            at: 0,
                        };
                        c.deadline = now + Duration::from_secs(1);
                    }
                    Phase::Writing { .. } => c.stream_done(),
                }
            }
        }
        clients.retain(|c| !c.closed());
        let mut fds = vec![
            poll_fd(stop.as_raw_fd(), libc::POLLIN),
            poll_fd(
                listener.as_raw_fd(),
                if stopping.is_none() { libc::POLLIN } else { 0 },
            ),
        ];
        for c in &clients {
            let events = match c.phase {
                Phase::Reading => libc::POLLIN,
                Phase::Writing { .. } => libc::POLLOUT,
            };
            fds.push(poll_fd(c.stream.as_raw_fd(), events));
        }
        let next = clients.iter().map(|c| c.deadline).min().map_or(1000, |d| {
            d.saturating_duration_since(now).as_millis().clamp(1, 1000) as i32
        });
        // SAFETY: `fds` is a live array of pollfd for the call.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, next) };
        if fds[0].revents != 0 && stopping.is_none() {
            let _ = stop.read();
            stopping = Some(Instant::now());
        }
        for (c, fd) in clients.iter_mut().zip(&fds[2..]) {
            if fd.revents != 0 {
                c.progress(handler, &limits);
            }
        }
        if fds[1].revents != 0 {
            accept_all(listener, &mut clients, &limits);
        }
    }
}

fn accept_all(listener: &UnixListener, clients: &mut Vec<Client>, limits: &Limits) {
    loop {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return,
            Err(e) => {
                // Out of descriptors, say: the next poll tries again.
                tracing::debug!("API: accept: {e}");
                return;
            }
        };
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        let busy = clients.len() >= limits.max_clients;
        // Beyond four times the limit, not even a 503: the connection is
        // closed at once, so a flood holds a bounded number of descriptors.
        if clients.len() >= limits.max_clients * 4 {
            drop(stream);
            continue;
        }
        let phase = if busy {
            Phase::Writing {
                out: Response::error(503, "too many clients; try again").to_bytes(),
                at: 0,
            }
        } else {
            Phase::Reading
        };
        clients.push(Client {
            stream,
            input: Vec::new(),
            phase,
            deadline: Instant::now()
                + if busy {
                    Duration::from_secs(1)
                } else {
                    limits.request_time
                },
        });
    }
}

impl Client {
    fn closed(&self) -> bool {
        matches!(&self.phase, Phase::Writing { out, at } if *at >= out.len())
    }

    fn stream_done(&mut self) {
        self.phase = Phase::Writing {
            out: Vec::new(),
            at: 0,
        };
    }

    fn progress(&mut self, handler: &dyn Handler, limits: &Limits) {
        match &mut self.phase {
            Phase::Reading => {
                let mut buf = [0u8; 4096];
                let cap = limits.max_head + limits.max_body;
                loop {
                    match self.stream.read(&mut buf) {
                        Ok(0) => {
                            // Gone before its request was whole.
                            return self.stream_done();
                        }
                        Ok(n) => {
                            self.input.extend_from_slice(&buf[..n]);
                            if self.input.len() > cap {
                                break;
                            }
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => return self.stream_done(),
                    }
                }
                let response = match parse(&self.input, limits) {
                    Parsed::NeedMore => return,
                    Parsed::Bad(response) => response,
                    Parsed::Done(request) => handler.handle(&request),
                };
                self.input = Vec::new();
                self.phase = Phase::Writing {
                    out: response.to_bytes(),
                    at: 0,
                };
                self.deadline = Instant::now() + limits.request_time;
                self.progress(handler, limits);
            }
            Phase::Writing { out, at } => {
                while *at < out.len() {
                    match self.stream.write(&out[*at..]) {
                        Ok(n) => *at += n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        // Vanished: nothing more to say to it.
                        Err(_) => return self.stream_done(),
                    }
                }
            }
        }
    }
}

fn poll_fd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn a_request_parses_once_its_body_is_whole_and_bounds_are_enforced() {
        let head = b"PUT /vm?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n";
        assert!(matches!(parse(head, &limits()), Parsed::NeedMore));
        let mut whole = head.to_vec();
        whole.extend_from_slice(b"{}\n\n");
        match parse(&whole, &limits()) {
            Parsed::Done(r) => {
                assert_eq!((r.method.as_str(), r.path.as_str()), ("PUT", "/vm"));
                assert_eq!(r.body, b"{}\n\n");
            }
            _ => panic!("not parsed"),
        }
        let status = |input: &[u8]| match parse(input, &limits()) {
            Parsed::Bad(r) => r.status,
            Parsed::NeedMore => 0,
            Parsed::Done(_) => 200,
        };
        assert_eq!(status(b"GARBAGE\x01 / HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            413
        );
        assert_eq!(
            status(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            411
        );
        assert_eq!(status(b"PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n"), 400);
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n", "a".repeat(9000));
        assert_eq!(status(long.as_bytes()), 431);
    }

    struct Hello;
    impl Handler for Hello {
        fn handle(&self, request: &Request) -> Response {
            Response::text(200, "text/plain", format!("hello {}", request.path))
        }
    }

    /// A client that never finishes its request is answered 408 once its
    /// time is up, and holds nobody else meanwhile.
    #[test]
    fn a_stalled_request_gets_408_while_others_are_served() {
        let dir = std::env::temp_dir().join(format!("rtvm-api-408-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("api.sock");
        let listener = bind(&path).unwrap();
        let stop = std::sync::Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let server_stop = stop.clone();
        let server = std::thread::spawn(move || {
            let limits = Limits {
                request_time: Duration::from_millis(300),
                ..Limits::default()
            };
            serve(&listener, &Hello, &server_stop, limits);
        });
        let mut stalled = UnixStream::connect(&path).unwrap();
        stalled.write_all(b"GET /slow HTTP/1.1\r\n").unwrap();
        let mut other = UnixStream::connect(&path).unwrap();
        other.write_all(b"GET /quick HTTP/1.1\r\n\r\n").unwrap();
        let mut answer = String::new();
        other.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("hello /quick"), "{answer}");
        let mut answer = String::new();
        stalled.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        stop.write(1).unwrap();
        server.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn binding_refuses_what_is_not_a_stale_socket_and_makes_the_socket_0600() {
        let dir = std::env::temp_dir().join(format!("rtvm-api-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("file");
        std::fs::write(&file, b"keep me").unwrap();
        assert!(bind(&file).unwrap_err().contains("is not a socket"));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
        let sock = dir.join("api.sock");
        let live = bind(&sock).unwrap();
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(bind(&sock).unwrap_err().contains("another process"));
        drop(live);
        // Nobody listens any more: a stale socket, replaced.
        let again = bind(&sock);
        assert!(again.is_ok(), "{again:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

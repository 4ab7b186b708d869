//! A local stand-in for the Hugging Face Hub, speaking the part of its file protocol that hf-hub
//! 0.4 uses (read from its `api/sync.rs`):
//! - `GET /{repo}/resolve/{revision}/{file}` answers small files itself, with `X-Repo-Commit` and
//!   an `ETag`; for `*.safetensors` (LFS files on the Hub) it answers `302` to an absolute CDN URL
//!   with `X-Repo-Commit`, `X-Linked-Etag` and `X-Linked-Size`, as the Hub does;
//! - `Range: bytes=A-` / `bytes=A-B` gets `206` and `Content-Range: bytes A-B/SIZE` (hf-hub's
//!   metadata request is `bytes=0-0`; a resumed download is `bytes=N-`);
//! - errors carry the Hub's `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`,
//!   `GatedRepo`): a gated repository answers 401 without `Authorization: Bearer`, 403 with a
//!   wrong token.
//!
//! Faults can be injected per file ([`Fault`]). One connection per request (`Connection: close`),
//! served in order by one thread.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One revision of a repository: its commit and its files.
#[derive(Clone)]
pub struct Revision {
    pub commit: String,
    pub files: HashMap<String, Vec<u8>>,
}

/// A repository: its revisions by branch name, and the token it needs if gated.
#[derive(Clone, Default)]
pub struct RepoSpec {
    pub revisions: HashMap<String, Revision>,
    pub gated_token: Option<String>,
}

/// A fault in the transfers of one file (not in hf-hub's `bytes=0-0` metadata requests).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fault {
    /// The next transfer is cut off after half its bytes; later ones are whole.
    CutOnce,
    /// Every transfer is cut off after half its bytes.
    CutAlways,
    /// The next transfer is cut off after half its bytes, and the resume request after it is
    /// answered with the whole file (a server that ignores `Range`).
    CutThenIgnoreRange,
    /// The next resume request is answered with the whole file.
    IgnoreRangeOnce,
}

/// A request the server answered.
#[derive(Clone, Debug)]
pub struct Logged {
    pub path: String,
    pub range: Option<String>,
    pub authorization: Option<String>,
    pub status: u16,
}

#[derive(Default)]
struct State {
    repos: HashMap<String, RepoSpec>,
    faults: HashMap<String, Fault>,
    log: Vec<Logged>,
}

/// The server; stopped (its port closed) when dropped.
pub struct FakeHub {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    /// Serves `repos` (by id, `org/name`) on a free port of 127.0.0.1.
    pub fn start(repos: HashMap<String, RepoSpec>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State { repos, ..State::default() }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(s) = stream {
                    // A client that hangs up early is its own business.
                    let _ = serve(s, &st, addr);
                }
            }
        });
        Self { addr, state, stop, thread: Some(thread) }
    }

    /// The `HF_ENDPOINT` value.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sets (or clears) the fault of `file`'s transfers.
    pub fn set_fault(&self, file: &str, fault: Option<Fault>) {
        let mut s = self.state.lock().unwrap();
        match fault {
            Some(f) => s.faults.insert(file.to_string(), f),
            None => s.faults.remove(file),
        };
    }

    /// The requests answered so far.
    pub fn log(&self) -> Vec<Logged> {
        self.state.lock().unwrap().log.clone()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees the flag and ends (closing the port).
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

/// A stable content hash (FNV-1a), hex: the ETag of a file.
fn etag(bytes: &[u8]) -> String {
    let h = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    format!("{h:016x}{:08x}", bytes.len())
}

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    /// Bytes of the body sent before the connection is closed (all when `None`).
    cut_at: Option<usize>,
}

impl Reply {
    fn error(status: u16, code: &str, message: &str) -> Self {
        let headers = vec![("X-Error-Code", code.to_string()), ("X-Error-Message", message.to_string())];
        Reply { status, headers, body: message.as_bytes().to_vec(), cut_at: None }
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>, addr: SocketAddr) -> std::io::Result<()> {
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let (range, authorization) = (headers.get("range").cloned(), headers.get("authorization").cloned());
    let reply = {
        let mut s = state.lock().unwrap();
        let reply = answer(&mut s, &path, range.as_deref(), authorization.as_deref(), addr);
        s.log.push(Logged { path, range, authorization, status: reply.status });
        reply
    };
    send(stream, reply)
}

fn answer(s: &mut State, path: &str, range: Option<&str>, auth: Option<&str>, addr: SocketAddr) -> Reply {
    // The CDN: /cdn/{repo}/{commit}/{file}, needing no token (the Hub's CDN URLs are signed).
    if let Some(rest) = path.strip_prefix("/cdn/") {
        let parts: Vec<&str> = rest.splitn(4, '/').collect();
        let [org, name, commit, file] = parts[..] else { return Reply::error(404, "EntryNotFound", "bad CDN path") };
        let found = s
            .repos
            .get(&format!("{org}/{name}"))
            .and_then(|r| r.revisions.values().find(|v| v.commit == commit).and_then(|v| v.files.get(file)).cloned());
        return match found {
            Some(bytes) => transfer(s, file, bytes, range, vec![]),
            None => Reply::error(404, "EntryNotFound", "no such CDN object"),
        };
    }
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let [org, name, "resolve", revision, file] = parts[..] else {
        return Reply::error(404, "RepoNotFound", "Repository not found");
    };
    let Some(repo) = s.repos.get(&format!("{org}/{name}")) else {
        return Reply::error(404, "RepoNotFound", "Repository not found");
    };
    if let Some(token) = &repo.gated_token {
        match auth {
            None => return Reply::error(401, "GatedRepo", "Access to this model is restricted. Please log in."),
            Some(a) if a != format!("Bearer {token}") => {
                return Reply::error(
                    403,
                    "GatedRepo",
                    "Access to this model is restricted; you are not in the authorized list.",
                )
            }
            Some(_) => {}
        }
    }
    let revision = revision.replace("%2F", "/");
    let by_name = repo.revisions.get(&revision);
    let Some(rev) = by_name.or_else(|| repo.revisions.values().find(|r| r.commit == revision)) else {
        return Reply::error(404, "RevisionNotFound", "Invalid rev id");
    };
    let Some(bytes) = rev.files.get(file).cloned() else {
        return Reply::error(404, "EntryNotFound", "Entry not found");
    };
    let (tag, commit) = (etag(&bytes), rev.commit.clone());
    if file.ends_with(".safetensors") {
        let headers = vec![
            ("Location", format!("http://{addr}/cdn/{org}/{name}/{commit}/{file}")),
            ("X-Repo-Commit", commit),
            ("X-Linked-Etag", format!("\"{tag}\"")),
            ("X-Linked-Size", bytes.len().to_string()),
        ];
        return Reply { status: 302, headers, body: vec![], cut_at: None };
    }
    transfer(s, file, bytes, range, vec![("ETag", format!("\"{tag}\"")), ("X-Repo-Commit", commit)])
}

/// `bytes` (or the part `range` asks for), with `file`'s fault applied.
fn transfer(
    s: &mut State,
    file: &str,
    bytes: Vec<u8>,
    range: Option<&str>,
    mut headers: Vec<(&'static str, String)>,
) -> Reply {
    let len = bytes.len();
    let (start, end) = match range.and_then(|r| r.strip_prefix("bytes=")).and_then(|r| r.split_once('-')) {
        Some((a, b)) => {
            (a.parse::<usize>().unwrap_or(0), b.parse().map_or(len.saturating_sub(1), |b: usize| b.min(len - 1)))
        }
        None => (0, len.saturating_sub(1)),
    };
    let probe = range == Some("bytes=0-0");
    let fault = if probe { None } else { s.faults.get(file).copied() };
    if start > 0 && fault == Some(Fault::IgnoreRangeOnce) {
        s.faults.remove(file);
        return Reply { status: 200, headers, body: bytes, cut_at: None };
    }
    if start >= len && len > 0 {
        // As the Hub's CDN answers a range past the end.
        headers.push(("Content-Range", format!("bytes */{len}")));
        return Reply { status: 416, headers, body: vec![], cut_at: None };
    }
    let body = bytes[start..=end].to_vec();
    let cut_at = match fault {
        Some(Fault::CutOnce) => s.faults.remove(file).map(|_| body.len() / 2),
        Some(Fault::CutAlways) => Some(body.len() / 2),
        Some(Fault::CutThenIgnoreRange) => {
            s.faults.insert(file.to_string(), Fault::IgnoreRangeOnce).map(|_| body.len() / 2)
        }
        _ => None,
    };
    if range.is_none() {
        return Reply { status: 200, headers, body, cut_at };
    }
    headers.push(("Content-Range", format!("bytes {start}-{end}/{len}")));
    Reply { status: 206, headers, body, cut_at }
}

fn send(mut stream: TcpStream, reply: Reply) -> std::io::Result<()> {
    let reason = match reply.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        416 => "Range Not Satisfiable",
        _ => "Not Found",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\n", reply.status);
    for (k, v) in &reply.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\nConnection: close\r\n\r\n", reply.body.len()));
    stream.write_all(head.as_bytes())?;
    let sent = reply.cut_at.unwrap_or(reply.body.len());
    stream.write_all(&reply.body[..sent])?;
    stream.flush()?;
    stream.shutdown(Shutdown::Both)
}

//! What can go wrong fetching from the Hub, each told with its way out, and how hf-hub's errors
//! map onto them (the Hub's `X-Error-Code` header tells a gated repository from a missing one).

use std::path::PathBuf;

use hf_hub::api::sync::ApiError;

/// A Hub repository could not provide its files.
#[derive(Debug, thiserror::Error)]
#[error("{repo}: {problem}")]
pub struct HubError {
    /// `repo_id@revision`.
    pub repo: String,
    /// What went wrong.
    pub problem: HubProblem,
}

/// Why a Hub repository could not provide its files.
#[derive(Debug, thiserror::Error)]
pub enum HubProblem {
    /// 401/403 without a token: a gated (licence to accept) or private repository.
    #[error(
        "{file}: the repository is gated or private (HTTP {status}{}): accept its licence at {page} \
         while logged in, then set HF_TOKEN to an access token of that account (or run `huggingface-cli login`)",
        server_says(.server_message)
    )]
    GatedNoToken {
        /// The file asked for.
        file: String,
        /// The HTTP status.
        status: u16,
        /// The repository's page, where the licence is accepted.
        page: String,
        /// The server's `X-Error-Message`, if any.
        server_message: Option<String>,
    },
    /// 401/403 with a token: the token's account has no access.
    #[error(
        "{file}: the repository is gated or private and the token (HF_TOKEN or the saved login) has no access \
         to it (HTTP {status}{}): accept its licence at {page} with the token's account, or use a token of an \
         account that has access",
        server_says(.server_message)
    )]
    GatedDenied {
        /// The file asked for.
        file: String,
        /// The HTTP status.
        status: u16,
        /// The repository's page, where the licence is accepted.
        page: String,
        /// The server's `X-Error-Message`, if any.
        server_message: Option<String>,
    },
    /// The repository does not exist (or is private and no token was given).
    #[error("no such repository at {endpoint} (HTTP {status} for {file}): check the id; a private repository also needs HF_TOKEN")]
    RepoNotFound {
        /// The file asked for.
        file: String,
        /// The HTTP status.
        status: u16,
        /// The Hub or mirror asked.
        endpoint: String,
    },
    /// The revision (branch, tag or commit) does not exist in the repository.
    #[error("no such revision (branch, tag or commit) in the repository (HTTP 404 for {file}): check --revision")]
    RevisionNotFound {
        /// The file asked for.
        file: String,
    },
    /// The repository lacks a file the model needs.
    #[error("{file} not found in the repository (HTTP 404 for {url})")]
    FileNotFound {
        /// The file asked for.
        file: String,
        /// The URL asked.
        url: String,
    },
    /// Another HTTP error status.
    #[error("{file}: HTTP {status} from {url}{}", server_says(.server_message))]
    Status {
        /// The file asked for.
        file: String,
        /// The HTTP status.
        status: u16,
        /// The URL asked.
        url: String,
        /// The server's `X-Error-Message`, if any.
        server_message: Option<String>,
    },
    /// The endpoint cannot be reached and the cache holds no complete copy.
    #[error(
        "cannot reach {endpoint} ({reason}) and the cache {} holds no complete copy: check the network, \
         or HF_ENDPOINT for a mirror",
        .cache.display()
    )]
    Unreachable {
        /// The Hub or mirror asked.
        endpoint: String,
        /// The transport error.
        reason: String,
        /// The cache folder.
        cache: PathBuf,
    },
    /// A download was cut off (and so were its retries).
    #[error(
        "the download of {file} was cut off ({reason}), its retries too; the bytes received are kept in the \
         cache {} and the next run resumes from them",
        .cache.display()
    )]
    Interrupted {
        /// The file.
        file: String,
        /// The I/O or transport error.
        reason: String,
        /// The cache folder.
        cache: PathBuf,
    },
    /// A downloaded file has the wrong size (twice), so it was removed from the cache.
    #[error(
        "the download of {file} has {got} bytes instead of {expected} (the server may ignore resume ranges); \
         it was removed from the cache"
    )]
    WrongSize {
        /// The file.
        file: String,
        /// Its size on disk.
        got: u64,
        /// The size the server announced.
        expected: u64,
    },
    /// The endpoint answered, but not as the Hub does.
    #[error("{file}: the server at {endpoint} does not answer like the Hub (header {header} missing or invalid): check HF_ENDPOINT")]
    NotAHub {
        /// The file asked for.
        file: String,
        /// The Hub or mirror asked.
        endpoint: String,
        /// The header it lacks.
        header: &'static str,
    },
    /// A `model.safetensors.index.json` without a `weight_map` of file names.
    #[error("{}: not a sharded-weights index (no weight_map of file names)", .path.display())]
    BadIndex {
        /// The index in the cache.
        path: PathBuf,
    },
    /// `HF_HUB_OFFLINE=1` and the cache holds no complete copy.
    #[error("not in the local cache {} (config.json, tokenizer.json and every weight file) and HF_HUB_OFFLINE=1", .cache.display())]
    NotCached {
        /// The cache folder.
        cache: PathBuf,
    },
    /// Any other failure of hf-hub (a cache write, a lock).
    #[error("{file}: {source}")]
    Api {
        /// The file.
        file: String,
        /// hf-hub's error.
        source: ApiError,
    },
}

fn server_says(message: &Option<String>) -> String {
    message.as_ref().map(|m| format!(": {m}")).unwrap_or_default()
}

/// Where a request went: what [`classify`] needs to explain a failure.
pub(crate) struct Request<'a> {
    /// The Hub or mirror.
    pub endpoint: &'a str,
    /// The repository id.
    pub repo_id: &'a str,
    /// The file.
    pub file: &'a str,
    /// The file's URL.
    pub url: &'a str,
    /// Whether a token was sent.
    pub token: bool,
    /// The cache folder.
    pub cache: &'a std::path::Path,
}

/// The problem behind hf-hub's `err` for the request `req`.
pub(crate) fn classify(err: ApiError, req: &Request<'_>) -> HubProblem {
    let file = req.file.to_string();
    let cache = req.cache.to_path_buf();
    match err {
        ApiError::RequestError(e) => match *e {
            ureq::Error::Status(status, response) => {
                let header = |name: &str| response.header(name).map(str::to_string);
                let (code, server_message) = (header("x-error-code"), header("x-error-message"));
                let page = format!("{}/{}", req.endpoint, req.repo_id);
                match (status, code.as_deref()) {
                    (_, Some("RepoNotFound")) => {
                        HubProblem::RepoNotFound { file, status, endpoint: req.endpoint.to_string() }
                    }
                    (_, Some("RevisionNotFound")) => HubProblem::RevisionNotFound { file },
                    (_, Some("EntryNotFound")) | (404, _) => HubProblem::FileNotFound { file, url: req.url.into() },
                    (_, Some("GatedRepo")) | (401 | 403, _) if req.token => {
                        HubProblem::GatedDenied { file, status, page, server_message }
                    }
                    (_, Some("GatedRepo")) | (401 | 403, _) => {
                        HubProblem::GatedNoToken { file, status, page, server_message }
                    }
                    _ => HubProblem::Status { file, status, url: req.url.into(), server_message },
                }
            }
            ureq::Error::Transport(t) => match t.kind() {
                ureq::ErrorKind::Dns | ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::ProxyConnect => {
                    HubProblem::Unreachable { endpoint: req.endpoint.to_string(), reason: t.to_string(), cache }
                }
                _ => HubProblem::Interrupted { file, reason: t.to_string(), cache },
            },
        },
        // hf-hub gives up on a cut transfer with the error of its last try.
        ApiError::TooManyRetries(last) => classify(*last, req),
        ApiError::IoError(e) if is_cut(&e) => HubProblem::Interrupted { file, reason: e.to_string(), cache },
        ApiError::MissingHeader(header) | ApiError::InvalidHeader(header) => {
            HubProblem::NotAHub { file, endpoint: req.endpoint.to_string(), header }
        }
        source => HubProblem::Api { file, source },
    }
}

/// A transfer that ended early (as opposed to a local file error).
fn is_cut(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | TimedOut)
}

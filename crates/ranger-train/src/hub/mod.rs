//! Downloads a model repository from the Hugging Face Hub (or a mirror) into the shared cache,
//! configured from the environment as the Python tools are: `HF_ENDPOINT`, `HF_HUB_CACHE` /
//! `HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`. When the endpoint is out of reach, a complete cached
//! snapshot is used, with a note.

mod error;
mod progress;
mod snapshot;

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, CacheRepo, Repo, RepoType};

use error::{classify, Request};
pub use error::{HubError, HubProblem};
use progress::Tracker;

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// How often hf-hub resumes a cut transfer within one run (after 0.3–0.8 s, then a little longer).
const RETRIES: usize = 3;
const REQUIRED: [&str; 2] = ["config.json", "tokenizer.json"];
/// Fetched when the repository has them.
const OPTIONAL: [&str; 3] = ["tokenizer_config.json", "generation_config.json", "chat_template.jinja"];
const INDEX: &str = "model.safetensors.index.json";

/// Where the Hub and its cache are, and who asks: read from the environment as `huggingface_hub`
/// reads it.
#[derive(Debug, Clone)]
pub struct HubEnv {
    /// The Hub or a mirror (`HF_ENDPOINT`, default `https://huggingface.co`), no trailing slash.
    pub endpoint: String,
    /// The cache folder (`HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`).
    pub cache: PathBuf,
    /// `HF_TOKEN`, else the token `huggingface-cli login` saved in `$HF_HOME`.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE=1`: the cache only.
    pub offline: bool,
}

impl HubEnv {
    /// The settings of this process's environment.
    pub fn from_env() -> Self {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        let endpoint = var("HF_ENDPOINT").map_or(DEFAULT_ENDPOINT.to_string(), |e| e.trim_end_matches('/').into());
        // HF_HUB_CACHE names the cache folder itself, HF_HOME its parent (hf-hub reads only HF_HOME).
        let cache = var("HF_HUB_CACHE").map_or_else(|| Cache::from_env().path().clone(), PathBuf::from);
        let token = var("HF_TOKEN").or_else(|| Cache::from_env().token());
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
        Self { endpoint, cache, token, offline }
    }
}

/// Finds in the cache, or downloads into it, what a load needs of `repo_id` at `revision`
/// (config.json, the tokenizer files, the weights) and returns the snapshot folder.
pub fn fetch(repo_id: &str, revision: &str, env: &HubEnv) -> Result<PathBuf, HubError> {
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let cache = Cache::new(env.cache.clone());
    let fail = |problem| HubError { repo: format!("{repo_id}@{revision}"), problem };
    if env.offline {
        let not_cached = || fail(HubProblem::NotCached { cache: env.cache.clone() });
        return snapshot::complete_snapshot(&cache, &repo).ok_or_else(not_cached);
    }
    match download(repo_id, &repo, env) {
        Ok(dir) => Ok(dir),
        Err(HubProblem::Unreachable { endpoint, reason, cache: folder }) => {
            match snapshot::complete_snapshot(&cache, &repo) {
                Some(dir) => {
                    eprintln!("note: cannot reach {endpoint} ({reason}); using the cached snapshot {}", dir.display());
                    Ok(dir)
                }
                None => Err(fail(HubProblem::Unreachable { endpoint, reason, cache: folder })),
            }
        }
        Err(problem) => Err(fail(problem)),
    }
}

fn download(repo_id: &str, repo: &Repo, env: &HubEnv) -> Result<PathBuf, HubProblem> {
    let api = ApiBuilder::from_cache(Cache::new(env.cache.clone()))
        .with_endpoint(env.endpoint.clone())
        .with_token(env.token.clone())
        .with_retries(RETRIES)
        .with_progress(false)
        .build()
        .map_err(|source| HubProblem::Api { file: String::new(), source })?;
    let files =
        Files { api: api.repo(repo.clone()), cached: Cache::new(env.cache.clone()).repo(repo.clone()), env, repo_id };
    let mut dir = PathBuf::new();
    for f in REQUIRED {
        dir = files.get(f)?.parent().map(Path::to_path_buf).unwrap_or_default();
    }
    for f in OPTIONAL {
        files.get_if_present(f)?;
    }
    let weights = match files.get_if_present(INDEX)? {
        Some(index) => snapshot::shard_names(&index).ok_or(HubProblem::BadIndex { path: index })?,
        None => vec!["model.safetensors".to_string()],
    };
    for f in &weights {
        files.get(f)?;
    }
    Ok(dir)
}

/// One repository's files at one revision, from the cache or the endpoint.
struct Files<'a> {
    api: ApiRepo,
    cached: CacheRepo,
    env: &'a HubEnv,
    repo_id: &'a str,
}

impl Files<'_> {
    /// The cached copy of `file`, else a download, checked against the size the server announced:
    /// one of another size is removed and downloaded once more.
    fn get(&self, file: &str) -> Result<PathBuf, HubProblem> {
        if let Some(path) = self.cached.get(file) {
            return Ok(path);
        }
        let url = self.api.url(file);
        let req = Request {
            endpoint: &self.env.endpoint,
            repo_id: self.repo_id,
            file,
            url: &url,
            token: self.env.token.is_some(),
            cache: &self.env.cache,
        };
        let mut tries = 0;
        loop {
            let mut tracker = Tracker::new();
            let path = self.api.download_with_progress(file, &mut tracker).map_err(|e| classify(e, &req))?;
            let got = std::fs::metadata(&path).map_or(0, |m| m.len());
            if got == tracker.expected {
                return Ok(path);
            }
            remove_download(&path);
            tries += 1;
            if tries == 2 {
                return Err(HubProblem::WrongSize { file: file.to_string(), got, expected: tracker.expected });
            }
        }
    }

    /// [`Files::get`], with `None` for a file the repository does not have.
    fn get_if_present(&self, file: &str) -> Result<Option<PathBuf>, HubProblem> {
        match self.get(file) {
            Ok(path) => Ok(Some(path)),
            Err(HubProblem::FileNotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Removes a downloaded file from the cache: its blob and the snapshot's link to it.
fn remove_download(link: &Path) {
    if let Ok(blob) = std::fs::canonicalize(link) {
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(link);
}

//! The Hub download path of the real binary, against a local server that speaks the Hub's file
//! protocol (tests/fake_hub): a fresh download into an empty cache, a cached re-run with the
//! server gone, `--revision`, a gated repository with and without `HF_TOKEN`, missing
//! repositories, revisions and files, and transfers cut off halfway.

mod fake_hub;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

use fake_hub::{FakeHub, Fault, RepoSpec, Revision};
use ranger_train::testing::{temp_dir, TempDir};

const MAIN: &str = "0123456789abcdef0123456789abcdef01234567";
const V2: &str = "89abcdef0123456789abcdef0123456789abcdef";
const WEIGHTS: &str = "model.safetensors";

/// The files of a tiny random Llama model (random weights for `seed`), by name.
fn tiny_files(seed: u64) -> Files {
    // Tests run in parallel: each call writes into a folder of its own.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let dir = temp_dir(&format!("hub-files-{seed}-{}", CALLS.fetch_add(1, Ordering::SeqCst)));
    ranger_train::testing::write_tiny_model(&dir, &ranger_train::testing::tiny_config("llama"), seed).unwrap();
    let files = std::fs::read_dir(&*dir).unwrap().map(|e| e.unwrap().path());
    files.map(|p| (p.file_name().unwrap().to_str().unwrap().to_string(), std::fs::read(&p).unwrap())).collect()
}

/// A repository's files by name.
type Files = HashMap<String, Vec<u8>>;

fn repo(revisions: &[(&str, &str, &Files)], gated_token: Option<&str>) -> RepoSpec {
    let revisions = revisions
        .iter()
        .map(|(name, commit, files)| {
            (name.to_string(), Revision { commit: commit.to_string(), files: (*files).clone() })
        })
        .collect();
    RepoSpec { revisions, gated_token: gated_token.map(String::from) }
}

/// A server with `org/tiny` (main: the tiny model of seed 1) and the given other repositories.
fn hub_with(files: &Files, others: Vec<(&str, RepoSpec)>) -> FakeHub {
    let mut repos: HashMap<String, RepoSpec> = others.into_iter().map(|(id, r)| (id.to_string(), r)).collect();
    repos.insert("org/tiny".into(), repo(&[("main", MAIN, files)], None));
    FakeHub::start(repos)
}

/// `ranger-tune generate` of two tokens from `model`, with `HF_HOME=home`, `HF_ENDPOINT=endpoint`
/// and nothing else of the Hub's or a proxy's settings from this environment.
fn generate(endpoint: &str, home: &Path, model: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ranger-tune"));
    c.args(["generate", "--model", model, "--prompt", "the sky is", "--max-tokens", "2", "--temperature", "0"]);
    c.args(["--device", "cpu"]).args(args);
    for var in ["HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_TOKEN", "ALL_PROXY", "HTTPS_PROXY", "HTTP_PROXY"] {
        c.env_remove(var).env_remove(var.to_ascii_lowercase());
    }
    c.env("HF_HOME", home).env("HF_ENDPOINT", endpoint).envs(env.iter().copied());
    c.output().expect("running ranger-tune")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", text(&o));
    o
}

/// The error text of a failed run.
fn failure(o: Output) -> String {
    assert!(!o.status.success(), "expected a failure: {}", text(&o));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `org/tiny`'s folder in the cache under `home`.
fn cached_repo(home: &Path) -> PathBuf {
    home.join("hub").join("models--org--tiny")
}

/// Asserts that the snapshot of `commit` holds exactly `files`, each a link to a blob, and that no
/// partial download is left.
fn assert_snapshot(home: &Path, commit: &str, files: &Files) {
    let snapshot = cached_repo(home).join("snapshots").join(commit);
    for (name, bytes) in files {
        let path = snapshot.join(name);
        assert!(path.symlink_metadata().unwrap().file_type().is_symlink(), "{} is no link to a blob", path.display());
        assert!(std::fs::read(&path).unwrap() == *bytes, "{} differs from the served file", path.display());
    }
    assert_eq!(std::fs::read_dir(&snapshot).unwrap().count(), files.len());
    assert!(partials(home).is_empty(), "partial downloads left: {:?}", partials(home));
}

/// The partial downloads (`blobs/*.part`) in the cache under `home`.
fn partials(home: &Path) -> Vec<PathBuf> {
    let blobs = cached_repo(home).join("blobs");
    let entries: Vec<PathBuf> =
        std::fs::read_dir(blobs).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    entries.into_iter().filter(|p| p.extension().is_some_and(|e| e == "part")).collect()
}

/// The `Range` headers of the transfers of the weights from the CDN (not the `bytes=0-0` probes).
fn weight_transfers(hub: &FakeHub) -> Vec<String> {
    let log = hub.log().into_iter().filter(|l| l.path.starts_with("/cdn/") && l.path.ends_with(WEIGHTS));
    log.filter_map(|l| l.range).filter(|r| r != "bytes=0-0").collect()
}

#[test]
fn a_fresh_download_fills_the_empty_cache() {
    let (files, home) = (tiny_files(1), temp_dir("hub-fresh"));
    let hub = hub_with(&files, vec![]);
    ok(generate(&hub.endpoint(), &home, "org/tiny", &[], &[]));
    assert_eq!(std::fs::read_to_string(cached_repo(&home).join("refs/main")).unwrap(), MAIN);
    assert_snapshot(&home, MAIN, &files);
    assert!(hub.log().iter().any(|l| l.path.starts_with("/cdn/")), "the weights came through the CDN redirect");
}

#[test]
fn a_cached_model_loads_with_the_server_gone() {
    let (files, home, empty) = (tiny_files(1), temp_dir("hub-offline"), temp_dir("hub-offline-empty"));
    let hub = hub_with(&files, vec![]);
    let endpoint = hub.endpoint();
    ok(generate(&endpoint, &home, "org/tiny", &[], &[]));
    drop(hub);
    let again = text(&ok(generate(&endpoint, &home, "org/tiny", &[], &[])));
    assert!(
        again.contains(&format!("cannot reach {endpoint}")) && again.contains("using the cached snapshot"),
        "{again}"
    );
    let err = failure(generate(&endpoint, &empty, "org/tiny", &[], &[]));
    assert!(err.contains("org/tiny@main: cannot reach") && err.contains("HF_ENDPOINT"), "{err}");
}

#[test]
fn a_revision_fetches_that_revision() {
    let (main, v2, home) = (tiny_files(1), tiny_files(2), temp_dir("hub-revision"));
    assert_ne!(main[WEIGHTS], v2[WEIGHTS]);
    let hub = hub_with(&main, vec![("org/two", repo(&[("main", MAIN, &main), ("v2", V2, &v2)], None))]);
    ok(generate(&hub.endpoint(), &home, "org/two", &[], &["--revision", "v2"]));
    let cached = home.join("hub").join("models--org--two");
    assert_eq!(std::fs::read_to_string(cached.join("refs/v2")).unwrap(), V2);
    assert!(!cached.join("refs/main").exists() && !cached.join("snapshots").join(MAIN).exists());
    let weights = std::fs::read(cached.join("snapshots").join(V2).join(WEIGHTS)).unwrap();
    assert!(weights == v2[WEIGHTS], "the weights of v2");
    let resolves: Vec<_> = hub.log().into_iter().filter(|l| l.path.contains("/resolve/")).collect();
    assert!(resolves.iter().all(|l| l.path.starts_with("/org/two/resolve/v2/")), "{resolves:?}");
}

#[test]
fn a_gated_repository_needs_hf_token() {
    let (files, home) = (tiny_files(1), temp_dir("hub-gated"));
    let hub = hub_with(&files, vec![("org/gated", repo(&[("main", MAIN, &files)], Some("hf_secret")))]);
    let err = failure(generate(&hub.endpoint(), &home, "org/gated", &[], &[]));
    let page = format!("{}/org/gated", hub.endpoint());
    for part in
        ["org/gated@main: config.json: the repository is gated", "HTTP 401", "licence", page.as_str(), "set HF_TOKEN"]
    {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    let err = failure(generate(&hub.endpoint(), &home, "org/gated", &[("HF_TOKEN", "hf_wrong")], &[]));
    assert!(err.contains("has no access") && err.contains("HTTP 403"), "{err}");
    ok(generate(&hub.endpoint(), &home, "org/gated", &[("HF_TOKEN", "hf_secret")], &[]));
    let resolves = hub.log().into_iter().filter(|l| l.path.starts_with("/org/gated/resolve/") && l.status != 401);
    assert!(resolves.clone().count() > 0);
    assert!(resolves.filter(|l| l.status < 400).all(|l| l.authorization.as_deref() == Some("Bearer hf_secret")));
}

#[test]
fn missing_repositories_revisions_and_files_are_named() {
    let (files, home) = (tiny_files(1), temp_dir("hub-missing"));
    let mut no_weights = files.clone();
    no_weights.remove(WEIGHTS);
    let hub = hub_with(&files, vec![("org/noweights", repo(&[("main", MAIN, &no_weights)], None))]);
    let err = failure(generate(&hub.endpoint(), &home, "org/absent", &[], &[]));
    assert!(err.contains("org/absent@main: no such repository") && err.contains("HTTP 404 for config.json"), "{err}");
    let err = failure(generate(&hub.endpoint(), &home, "org/tiny", &[], &["--revision", "nope"]));
    assert!(err.contains("org/tiny@nope: no such revision"), "{err}");
    let err = failure(generate(&hub.endpoint(), &home, "org/noweights", &[], &[]));
    let url = format!("{}/org/noweights/resolve/main/{WEIGHTS}", hub.endpoint());
    assert!(
        err.contains(&format!("org/noweights@main: {WEIGHTS} not found in the repository (HTTP 404 for {url})")),
        "{err}"
    );
}

/// `org/tiny` served with `fault` on its weights, an empty cache, and a first run's output.
fn run_with_fault(name: &str, fault: Fault) -> (Files, TempDir, FakeHub, Output) {
    let (files, home) = (tiny_files(1), temp_dir(name));
    let hub = hub_with(&files, vec![]);
    hub.set_fault(WEIGHTS, Some(fault));
    let out = generate(&hub.endpoint(), &home, "org/tiny", &[], &[]);
    (files, home, hub, out)
}

#[test]
fn a_cut_download_resumes_where_it_stopped() {
    let (files, home, hub, out) = run_with_fault("hub-cut-once", Fault::CutOnce);
    ok(out);
    let half = files[WEIGHTS].len() / 2;
    assert_eq!(weight_transfers(&hub), ["bytes=0-".to_string(), format!("bytes={half}-")]);
    assert_snapshot(&home, MAIN, &files);
}

#[test]
fn a_download_cut_on_every_try_fails_then_the_next_run_resumes_it() {
    let (files, home, hub, out) = run_with_fault("hub-cut-always", Fault::CutAlways);
    let err = failure(out);
    assert!(err.contains(&format!("the download of {WEIGHTS} was cut off")) && err.contains("resumes"), "{err}");
    let snapshot = cached_repo(&home).join("snapshots").join(MAIN);
    assert!(!snapshot.join(WEIGHTS).exists(), "a cut file is never in the snapshot");
    let part = partials(&home);
    assert_eq!(part.len(), 1);
    let kept = std::fs::metadata(&part[0]).unwrap().len() as usize;
    assert!(kept > 0 && kept < files[WEIGHTS].len(), "{kept} bytes kept");
    hub.set_fault(WEIGHTS, None);
    ok(generate(&hub.endpoint(), &home, "org/tiny", &[], &[]));
    assert_eq!(weight_transfers(&hub).last().unwrap(), &format!("bytes={kept}-"));
    assert_snapshot(&home, MAIN, &files);
}

#[test]
fn a_resume_answered_with_the_whole_file_is_caught_and_downloaded_again() {
    let (files, home, hub, out) = run_with_fault("hub-ignore-range", Fault::CutThenIgnoreRange);
    ok(out);
    let half = files[WEIGHTS].len() / 2;
    let expected = ["bytes=0-".to_string(), format!("bytes={half}-"), "bytes=0-".to_string()];
    assert_eq!(weight_transfers(&hub), expected, "cut, resumed (answered whole: too long), downloaded again");
    assert_snapshot(&home, MAIN, &files);
}

/// hf-hub keeps a complete `.part` when its last retry finished the file (it reports that as a
/// failure). The next run asks for bytes past its end, which the server refuses (416); hf-hub's
/// retry then asks from 0 and appends, so the file comes out too long: the size check removes it
/// and the file is downloaded once more, whole and correct.
#[test]
fn a_complete_partial_download_is_started_over() {
    let (files, home, hub, out) = run_with_fault("hub-full-part", Fault::CutAlways);
    failure(out);
    let part = partials(&home);
    assert_eq!(part.len(), 1);
    std::fs::write(&part[0], &files[WEIGHTS]).unwrap();
    hub.set_fault(WEIGHTS, None);
    ok(generate(&hub.endpoint(), &home, "org/tiny", &[], &[]));
    let size = files[WEIGHTS].len();
    let transfers = weight_transfers(&hub);
    let refused = transfers.iter().position(|r| *r == format!("bytes={size}-")).expect("a resume past the end");
    assert!(transfers[refused + 1..].iter().all(|r| r == "bytes=0-"), "then whole downloads: {transfers:?}");
    assert_snapshot(&home, MAIN, &files);
}

//! Loading by Hub repository id from the local Hugging Face cache (HF_HUB_CACHE, HF_HUB_OFFLINE=1,
//! --revision): the same folder layout `huggingface_hub` writes. (The download itself is tested
//! against a local Hub server: bin/ranger-tune/tests/hub_download.rs.)
//! One test only, because it sets process-wide environment variables.

mod common;

use ranger_train::source::{load, HubOptions};

#[test]
fn loads_from_the_offline_cache_by_repo_id_and_revision() {
    let cache = common::temp_dir("hub-cache");
    let repo = cache.join("models--test-org--tiny");
    for (rev, commit, seed) in [("main", "0123abcd", 1), ("v2", "4567ef01", 2)] {
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join(rev), commit).unwrap();
        common::write_tiny_model(&repo.join("snapshots").join(commit), &common::tiny_config("llama"), seed);
    }
    // SAFETY: this test binary has a single test, so no other thread reads the environment.
    unsafe {
        std::env::set_var("HF_HUB_CACHE", &*cache);
        std::env::set_var("HF_HUB_OFFLINE", "1");
    }
    let main = load("test-org/tiny", &HubOptions::default()).unwrap();
    assert_eq!(main.origin, "test-org/tiny");
    assert_eq!(main.decoder().unwrap().num_hidden_layers, 2);
    let v2 = load("test-org/tiny", &HubOptions { revision: Some("v2".into()) }).unwrap();
    let a = &main.weights["model.norm.weight"];
    let b = &v2.weights["model.norm.weight"];
    assert_ne!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap(), "the revision selects the snapshot");
    let err = load("test-org/absent", &HubOptions::default()).err().unwrap().to_string();
    assert!(err.contains("test-org/absent") && err.contains("HF_HUB_OFFLINE=1"), "{err}");
    let err = load("./no/such/folder", &HubOptions::default()).err().unwrap().to_string();
    assert!(err.contains("no such file or folder"), "{err}");
}

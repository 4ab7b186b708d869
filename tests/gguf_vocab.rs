//! The GGUF tokenizer rebuild against real tokenizers: llama.cpp's vocabulary-only test files
//! (`ggml-vocab-*.gguf`, fetched and sha256-checked by tools/fetch_test_assets.sh from the
//! llama-cpp-python sdist on PyPI) come with test texts (`.inp`) and the ids the original
//! Hugging Face tokenizer gave each (`.out`, `encode(text, add_special_tokens=False)`).
//! ranger-tune's tokenizer, rebuilt from each file's metadata, gives every one of them.

mod common;

use std::path::Path;

/// Every test text of `ggml-vocab-{name}.gguf` encodes to the original tokenizer's ids.
fn check(dir: &Path, name: &str) {
    let file = dir.join(format!("ggml-vocab-{name}.gguf"));
    let tok = ranger_train::gguf::load_gguf_tokenizer(&file).unwrap();
    let inp = std::fs::read_to_string(file.with_extension("gguf.inp")).unwrap();
    let out = std::fs::read_to_string(file.with_extension("gguf.out")).unwrap();
    let texts: Vec<&str> = inp.split("\n__ggml_vocab_test__\n").collect();
    let ids: Vec<Vec<u32>> = out.lines().map(|l| l.split_whitespace().map(|x| x.parse().unwrap()).collect()).collect();
    assert!(texts.len() >= ids.len() && ids.len() >= 40, "{name}: {} texts, {} id lines", texts.len(), ids.len());
    for (text, want) in texts.iter().zip(&ids) {
        let got = tok.encode(text, false).unwrap().0;
        assert_eq!(&got, want, "{name}: {text:?}");
    }
    eprintln!("{name}: all {} texts give the original tokenizer's ids", ids.len());
}

#[test]
fn gguf_tokenizers_match_the_original_tokenizers() {
    let dir = common::fetched_asset("vocab");
    // SentencePiece: Llama 2's and Phi-3's (llama.cpp's `llama` tokenizer model).
    // Byte-level BPE: GPT-2's, Llama 3's (digits in threes, whole-word vocabulary hits before any
    // merge), Qwen2's and Qwen3.5's (digits one by one).
    for name in ["llama-spm", "phi-3", "gpt-2", "llama-bpe", "qwen2", "qwen35"] {
        check(&dir, name);
    }
}

//! Real chat templates rendered as transformers renders them: Gemma 2's, Phi-3.5's and SmolLM3's
//! (llama.cpp's `models/templates`, fetched with the vocabulary files by
//! tools/fetch_test_assets.sh) over a few conversations, against what transformers'
//! `apply_chat_template` wrote (tests/fixtures/chat_templates.json, by
//! tools/make_chat_template_fixtures.py): the same text, the same refusals, and for Phi-3.5 the
//! same ids under the real Phi-3 tokenizer (rebuilt from llama.cpp's ggml-vocab-phi-3.gguf).

mod common;

use ranger_train::tokenizer::{Message, TextTokenizer};
use serde_json::{json, Value};

#[test]
fn chat_templates_render_as_transformers_renders_them() {
    let assets = common::fetched_asset("vocab");
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat_templates.json")).unwrap(),
    )
    .unwrap();
    let phi3 = ranger_train::gguf::load_gguf_tokenizer(&assets.join("ggml-vocab-phi-3.gguf")).unwrap();
    for name in ["gemma2", "phi3", "smollm3"] {
        let f = &fixture[name];
        let template =
            std::fs::read_to_string(assets.join(format!("{}.jinja", f["template"].as_str().unwrap()))).unwrap();
        let config = json!({"bos_token": f["bos_token"], "eos_token": f["eos_token"]});
        let tok = TextTokenizer::new(phi3.inner.clone(), config, Some(template));
        let cases = f["cases"].as_array().unwrap();
        for case in cases {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let gen = case["add_generation_prompt"].as_bool().unwrap();
            let ours = tok.apply_chat_template(&messages, gen);
            match case.get("rendered") {
                Some(want) => {
                    let ours = ours.unwrap_or_else(|e| panic!("{name}: {e}"));
                    assert_eq!(ours, want.as_str().unwrap(), "{name}, generation prompt {gen}");
                    if let Some(ids) = case.get("ids") {
                        let want: Vec<u32> = serde_json::from_value(ids.clone()).unwrap();
                        assert_eq!(tok.encode(&ours, false).unwrap().0, want, "{name}: ids");
                    }
                }
                // transformers refused the conversation (Gemma: no system role): so do we.
                None => assert!(ours.is_err(), "{name}: {} should be refused", case["error"]),
            }
        }
        eprintln!("{name}: {} renderings as transformers'", cases.len());
    }
}

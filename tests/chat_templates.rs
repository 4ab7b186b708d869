//! Real chat templates rendered and tokenized as transformers does, against what transformers'
//! `apply_chat_template` wrote (tests/fixtures/chat_templates.json, by
//! tools/make_chat_template_fixtures.py):
//! - Gemma 2's, Phi-3.5's and SmolLM3's templates (llama.cpp's `models/templates`, fetched with
//!   the vocabulary files by tools/fetch_test_assets.sh): the same text and the same refusals;
//!   the same ids under the real Phi-3 tokenizer (rebuilt from llama.cpp's ggml-vocab-phi-3.gguf)
//!   and the real Gemma 2 tokenizer;
//! - Gemma 3 as a user's folder has it: the real tokenizer's own files (its `tokenizer.json` and
//!   the `tokenizer_config.json` that holds the template), loaded as a model folder's are;
//! - the tokens a `messages` record trains on (the assistant turns) and a `text` record's ids.

mod common;

use ranger_train::data::encode_record;
use ranger_train::tokenizer::{Message, TextTokenizer};
use serde_json::{json, Value};

#[test]
fn chat_templates_render_as_transformers_renders_them() {
    let assets = common::fetched_asset("vocab");
    let gemma = common::fetched_asset("gemma");
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/chat_templates.json")).unwrap(),
    )
    .unwrap();
    let phi3 = ranger_train::gguf::load_gguf_tokenizer(&assets.join("ggml-vocab-phi-3.gguf")).unwrap();
    for name in ["gemma2", "gemma3", "phi3", "smollm3"] {
        let f = &fixture[name];
        let tok = match f["template"].as_str() {
            // The folder's own template and special tokens.
            None => TextTokenizer::from_dir(&gemma.join(name)).unwrap(),
            Some(file) => {
                let template = std::fs::read_to_string(assets.join(format!("{file}.jinja"))).unwrap();
                let config = json!({"bos_token": f["bos_token"], "eos_token": f["eos_token"]});
                // Ids are recorded for the model's own tokenizer only; any tokenizer renders.
                let inner = match name {
                    "gemma2" => TextTokenizer::from_dir(&gemma.join("gemma2")).unwrap().inner,
                    _ => phi3.inner.clone(),
                };
                TextTokenizer::new(inner, config, Some(template))
            }
        };
        let cases = f["cases"].as_array().unwrap();
        let (mut with_ids, mut masks) = (0, 0);
        for case in cases {
            let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
            let gen = case["add_generation_prompt"].as_bool().unwrap();
            let ours = tok.apply_chat_template(&messages, gen);
            let Some(want) = case.get("rendered") else {
                // transformers refused the conversation (Gemma 2: no system role): so do we.
                assert!(ours.is_err(), "{name}: {} should be refused", case["error"]);
                continue;
            };
            let ours = ours.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(ours, want.as_str().unwrap(), "{name}, generation prompt {gen}");
            let Some(ids) = case.get("ids") else { continue };
            let want: Vec<u32> = serde_json::from_value(ids.clone()).unwrap();
            assert_eq!(tok.encode(&ours, false).unwrap().0, want, "{name}: ids");
            with_ids += 1;
            if let Some(mask) = case.get("assistant_mask") {
                let mask: Vec<bool> = mask.as_array().unwrap().iter().map(|m| m.as_i64() == Some(1)).collect();
                let ex = encode_record(&json!({"messages": case["messages"]}), &tok, true).unwrap();
                assert_eq!(ex.ids, want, "{name}: a messages record's ids");
                assert_eq!(ex.target, mask, "{name}: the tokens trained on are the assistant turns'");
                masks += 1;
            }
        }
        if let Some(plain) = f.get("plain") {
            // A `text` record: the tokenizer's special tokens (Gemma: <bos>), then eos.
            let want: Vec<u32> = serde_json::from_value(plain["ids"].clone()).unwrap();
            let ex = encode_record(&json!({"text": plain["text"]}), &tok, true).unwrap();
            assert_eq!(ex.ids[..ex.ids.len() - 1], want[..], "{name}: a text record's ids");
            assert_eq!(ex.ids.last().copied(), tok.eos_id, "{name}: a text record ends with eos");
        }
        // A chat reply stops at the token that closes the template's assistant turn.
        let turn_end = ranger_train::generate::turn_end_id(&tok).map(|id| tok.inner.id_to_token(id).unwrap());
        let want = match name {
            "gemma2" | "gemma3" => Some("<end_of_turn>"),
            "phi3" => Some("<|end|>"),
            _ => None, // SmolLM3's `<|im_end|>` is not a token of the Phi-3 tokenizer it is rendered with
        };
        assert_eq!(turn_end.as_deref(), want, "{name}: the end of an assistant turn");
        eprintln!("{name}: {} renderings as transformers', {with_ids} with its ids, {masks} masks", cases.len());
    }
}

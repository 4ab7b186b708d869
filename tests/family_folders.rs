//! What ranger-tune writes for each decoder family has the layout transformers and PEFT wrote
//! for it (tests/fixtures/families, by tools/make_family_fixtures.py): a full fine-tune's model
//! folder holds exactly the tensors (names, shapes, dtypes) of the folder transformers saved for
//! the family, with its `model_type` and architecture, and a LoRA run's adapter exactly the
//! tensors of the adapter PEFT saved with the same rank and targets (GPT-2: `fan_in_fan_out`).
//! So `from_pretrained` finds every key it expects and no other. That the values then give the
//! same logits in transformers and PEFT is checked by hand (README: `tools/check_eval_loss.py`,
//! `tools/check_peft_load.py`; CI has no torch).

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use ranger_train::TrainConfig;
use serde_json::{json, Value};

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Name -> (shape, dtype) of every tensor of a safetensors file.
fn layout(path: &Path) -> BTreeMap<String, (Vec<usize>, String)> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    tensors.into_iter().map(|(n, t)| (n, (t.dims().to_vec(), format!("{:?}", t.dtype())))).collect()
}

#[test]
fn every_decoder_family_writes_transformers_and_peft_layouts() {
    for family in ["gemma2", "gemma3", "phi3", "phi4mini", "smollm3", "gpt2"] {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/families").join(family);
        let dir = common::temp_dir(&format!("layout-{family}"));
        // The fixture's model with the tiny word-level tokenizer (its 40-token vocabulary holds it).
        let base = dir.join("base");
        std::fs::create_dir_all(&base).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(fixture.join("base").join(f), base.join(f)).unwrap();
        }
        assert!(common::TINY_VOCAB <= read_json(&base.join("config.json"))["vocab_size"].as_u64().unwrap() as usize);
        std::fs::write(base.join("tokenizer.json"), common::tiny_tokenizer_json().to_string()).unwrap();
        std::fs::write(
            base.join("tokenizer_config.json"),
            json!({"eos_token": "<eos>", "pad_token": "<pad>"}).to_string(),
        )
        .unwrap();
        let lines: Vec<String> = common::WORDS.chunks(5).map(|w| json!({"text": w.join(" ")}).to_string()).collect();
        std::fs::write(dir.join("data.jsonl"), lines.join("\n")).unwrap();
        let adapter_config = read_json(&fixture.join("lora/adapter_config.json"));
        let run = |out: &str, lora: bool| {
            let cfg = TrainConfig {
                model: base.display().to_string(),
                data: dir.join("data.jsonl").display().to_string(),
                output: dir.join(out).display().to_string(),
                max_seq_length: 16,
                batch_size: 2,
                max_steps: Some(2),
                lora,
                lora_rank: adapter_config["r"].as_u64().unwrap() as usize,
                lora_targets: serde_json::from_value(adapter_config["target_modules"].clone()).unwrap(),
                ..Default::default()
            };
            common::quiet(cfg).run().unwrap().output.unwrap()
        };

        let full = run("full", false);
        assert_eq!(
            layout(&full.join("model.safetensors")),
            layout(&fixture.join("base/model.safetensors")),
            "{family}: the model folder's tensors"
        );
        let (ours, theirs) = (read_json(&full.join("config.json")), read_json(&fixture.join("base/config.json")));
        for key in ["model_type", "architectures"] {
            assert_eq!(ours[key], theirs[key], "{family}: config.json {key}");
        }

        let adapter = run("lora", true);
        assert_eq!(
            layout(&adapter.join("adapter_model.safetensors")),
            layout(&fixture.join("lora/adapter_model.safetensors")),
            "{family}: the adapter's tensors"
        );
        let ours = read_json(&adapter.join("adapter_config.json"));
        for key in ["peft_type", "task_type", "r", "fan_in_fan_out"] {
            assert_eq!(ours[key], adapter_config[key], "{family}: adapter_config.json {key}");
        }
        eprintln!("{family}: model folder and adapter in transformers' and PEFT's layout");
    }
}

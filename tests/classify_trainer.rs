//! Sequence classification on tiny random models: CSV / JSONL data and their errors, label
//! maps, training, the best model, Hugging Face output reloaded by `predict`, bit-exact resume,
//! LoRA adapters in PEFT's SEQ_CLS format, and decoders as classifiers.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use ranger_train::classify::{labels_from_records, read_records, Columns};
use ranger_train::config::{BestMetric, TaskKind};
use ranger_train::predict::load_classifier;
use ranger_train::source::{load, HubOptions};
use ranger_train::testing::{tiny_encoder_config, write_tiny_encoder};
use ranger_train::{prepare, TrainConfig, TrainError};
use serde_json::json;

use common::{quiet, read_json};

/// Texts about colours: "warm" when they mention red, "cool" for blue or green.
fn colour_rows(n: usize, offset: usize) -> Vec<(String, &'static str)> {
    let subjects = ["the cat", "the dog", "my mat", "the sky", "the grass"];
    (0..n)
        .map(|i| {
            let k = i + offset;
            let (colour, label) = [("red", "warm"), ("blue", "cool"), ("green", "cool")][k % 3];
            (format!("{} is {colour} .", subjects[(k / 3) % subjects.len()]), label)
        })
        .collect()
}

fn write_csv(path: &Path, rows: &[(String, &str)]) {
    let mut s = String::from("id,sentence,category\n");
    for (i, (t, l)) in rows.iter().enumerate() {
        s.push_str(&format!("{i},\"{t}\",{l}\n"));
    }
    std::fs::write(path, s).unwrap();
}

/// A temporary folder for test `name` with a tiny `model_type` model and train/validation CSVs.
fn setup(name: &str, model_type: &str) -> common::TempDir {
    let dir = common::temp_dir(name);
    if model_type == "llama" {
        common::write_tiny_model(&dir.join("model"), &common::tiny_config("llama"), 1);
    } else {
        write_tiny_encoder(&dir.join("model"), &tiny_encoder_config(model_type), 1).unwrap();
    }
    write_csv(&dir.join("train.csv"), &colour_rows(48, 0));
    write_csv(&dir.join("val.csv"), &colour_rows(12, 1));
    dir
}

fn config(dir: &Path, steps: usize) -> TrainConfig {
    TrainConfig {
        task: TaskKind::Classify,
        model: dir.join("model").display().to_string(),
        data: dir.join("train.csv").display().to_string(),
        validation_file: Some(dir.join("val.csv").display().to_string()),
        text_column: "sentence".into(),
        label_column: "category".into(),
        output: dir.join("out").display().to_string(),
        max_seq_length: 16,
        batch_size: 8,
        learning_rate: Some(1e-2),
        eps: Some(1e-8),
        // RAdam's rectification with beta2 = 0.999 keeps steps small for hundreds of steps;
        // 0.99 finishes it within these short runs.
        beta2: Some(0.99),
        max_steps: Some(steps),
        warmup_steps: Some(2),
        eval_every: 6,
        metric_for_best: BestMetric::Accuracy,
        device: common::test_device_spec(),
        ..Default::default()
    }
}

#[test]
fn bert_classifier_trains_keeps_the_best_and_reloads() {
    let dir = setup("cls-bert", "bert");
    let mut cfg = config(&dir, 96);
    cfg.learning_rate = Some(3e-2);
    cfg.eval_every = 24;
    let mut t = quiet(cfg);
    let s = t.run().unwrap();
    assert!(s.eval_accuracy.unwrap() >= 0.99, "{s:?}");
    // metrics.jsonl has the classification figures, per class.
    let metrics = common::read_jsonl(&dir.join("out/metrics.jsonl"));
    let last = metrics.iter().rev().find(|m| m.get("eval_accuracy").is_some()).unwrap();
    assert_eq!(last["eval_per_class"].as_array().unwrap().len(), 2);
    assert_eq!(
        last["eval_per_class"][0]["support"].as_u64().unwrap() + last["eval_per_class"][1]["support"].as_u64().unwrap(),
        12
    );
    // The output is a BertForSequenceClassification folder with the label maps.
    let model_dir = s.output.clone().unwrap();
    let cfg = read_json(&model_dir.join("config.json"));
    assert_eq!(cfg["architectures"], json!(["BertForSequenceClassification"]));
    assert_eq!(cfg["id2label"], json!({"0": "cool", "1": "warm"}));
    assert_eq!(cfg["label2id"], json!({"cool": 0, "warm": 1}));
    let names: Vec<String> = candle_core::safetensors::load(model_dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_keys()
        .collect();
    for n in
        ["bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight", "classifier.bias"]
    {
        assert!(names.iter().any(|m| m == n), "{n} missing from the saved model");
    }
    // best/ holds the best evaluation, and reloading it gives the same accuracy.
    let best = s.best_model.clone().unwrap();
    let results = read_json(&best.join("eval_results.json"));
    let clf =
        load_classifier(load(best.to_str().unwrap(), &HubOptions::default()).unwrap(), None, DType::F32, &Device::Cpu)
            .unwrap();
    let val = dir.join("val.csv");
    let records =
        read_records(&val, &Columns { text: "sentence".into(), text_pair: None, label: Some("category".into()) })
            .unwrap();
    let preds = clf.predict(&records, 16, 5, &val).unwrap();
    let correct = preds.iter().zip(&records).filter(|(p, r)| Some(&p.label) == r.label.as_ref()).count();
    assert_eq!(correct as f64 / records.len() as f64, results["classes"]["accuracy"].as_f64().unwrap());
    let p = &preds[0];
    assert!((p.scores.values().sum::<f32>() - 1.0).abs() < 1e-5);
}

#[test]
fn classification_resume_is_exact() {
    // lora: None for full fine-tuning, else (DoRA, dropout).
    for (model_type, lora) in
        [("distilbert", None), ("llama", None), ("bert", Some((false, 0.0))), ("roberta", Some((true, 0.1)))]
    {
        let dir = setup(&format!("cls-resume-{model_type}-{lora:?}"), model_type);
        let n = 7; // crosses a Lookahead sync (k = 6) and an epoch (48 examples / 8 per step = 6 steps)
                   // The same run stopped after each of its first n steps (the stop flag is what Ctrl-C
                   // sets), then resumed from the output folder.
        let (straight, _, mut resumed) =
            common::straight_and_resumed(&common::with_lora(config(&dir, 2 * n), lora), &dir, n, |s| {
                assert_eq!(s.stopped, "interrupted")
            });
        assert_eq!(resumed.state().step, n);
        resumed.run().unwrap();
        for ((name, a), (_, b)) in straight.session().vars().iter().zip(resumed.session().vars()) {
            let d = common::max_abs_diff(a.as_tensor(), b.as_tensor());
            assert_eq!(d, 0.0, "{model_type} (lora {lora:?}): {name} differs after resume");
        }
        assert_eq!(straight.state().best_score, resumed.state().best_score);
    }
}

#[test]
fn lora_classifier_adapter_in_peft_format_round_trips() {
    let dir = setup("cls-lora", "roberta");
    let mut cfg = config(&dir, 12);
    cfg.lora = true;
    cfg.lora_rank = 4;
    cfg.learning_rate = Some(2e-2);
    // Besides the head (always trained), one module the user names, as PEFT's modules_to_save.
    cfg.modules_to_save = vec!["embeddings.LayerNorm".into()];
    let mut t = quiet(cfg);
    let trainable: usize = t.trainable_parameters();
    let s = t.run().unwrap();
    let adapter = s.output.clone().unwrap();
    assert!(adapter.ends_with("adapter"));
    let ac = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(ac["task_type"], "SEQ_CLS");
    assert_eq!(ac["modules_to_save"], json!(["classifier", "embeddings.LayerNorm"]));
    assert_eq!(ac["target_modules"], json!(["query", "key", "value", "output.dense", "intermediate.dense"]));
    let tensors = candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    assert!(tensors.contains_key("base_model.model.roberta.encoder.layer.0.attention.self.query.lora_A.weight"));
    assert!(tensors.contains_key("base_model.model.roberta.encoder.layer.1.attention.output.dense.lora_B.weight"));
    assert!(tensors.contains_key("base_model.model.classifier.out_proj.weight"));
    assert!(tensors.contains_key("base_model.model.classifier.dense.bias"));
    assert!(tensors.contains_key("base_model.model.roberta.embeddings.LayerNorm.weight"));
    // 2 layers x 6 projections x (A + B), the 4 head tensors and the 2 LayerNorm ones; nothing
    // of the frozen base.
    assert_eq!(tensors.len(), 2 * 6 * 2 + 4 + 2);
    assert_eq!(tensors.values().map(|t| t.elem_count()).sum::<usize>(), trainable);
    // Base + adapter reproduces the evaluated model, unmerged and merged.
    let probe = dir.join("val.csv");
    let records = read_records(&probe, &Columns { text: "sentence".into(), text_pair: None, label: None }).unwrap();
    let clf = load_classifier(
        load(dir.join("model").to_str().unwrap(), &HubOptions::default()).unwrap(),
        Some(&adapter),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let preds = clf.predict(&records, 16, 4, &probe).unwrap();
    let eval = t.evaluate().unwrap().unwrap();
    let correct = preds
        .iter()
        .zip(
            read_records(&probe, &Columns { text: "sentence".into(), text_pair: None, label: Some("category".into()) })
                .unwrap(),
        )
        .filter(|(p, r)| Some(&p.label) == r.label.as_ref())
        .count();
    assert_eq!(correct as f64 / records.len() as f64, eval.classes.unwrap().accuracy);
    let merged: std::collections::HashMap<_, _> = clf.model.merged_weights().unwrap().into_iter().collect();
    let plain = ranger_train::model::SequenceClassifier::new(clf.model.config.clone(), 2, &merged).unwrap();
    let ex = ranger_train::classify::encode_records(&records, &clf.tokenizer, &clf.labels, 16, &probe).unwrap();
    let refs: Vec<_> = ex.iter().collect();
    let b = ranger_train::classify::collate(
        &refs,
        clf.tokenizer.pad_id,
        ranger_train::model::MaskKind::Padding,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let d = common::max_abs_diff(&plain.forward(&b).unwrap(), &clf.model.forward(&b).unwrap());
    assert!(d < 1e-5, "merged classifier differs by {d}");
    let trained = t
        .with_slow_weights(|s| {
            let m = s.task().classifier().unwrap();
            let b = ranger_train::classify::collate(
                &refs,
                clf.tokenizer.pad_id,
                ranger_train::model::MaskKind::Padding,
                DType::F32,
                m.device(),
            )
            .unwrap();
            m.forward(&b).unwrap()
        })
        .unwrap();
    common::assert_same_outputs(
        &clf.model.forward(&b).unwrap(),
        &trained,
        "base + adapter (LoRA, head, saved LayerNorm) is not the trained classifier",
    );
    // PEFT lists both `classifier` and `score` in every SEQ_CLS adapter; going on from such an
    // adapter ignores the head this model lacks, as PEFT does.
    let mut peft_like = ac.clone();
    peft_like["modules_to_save"] = json!(["classifier", "score", "embeddings.LayerNorm"]);
    std::fs::write(adapter.join("adapter_config.json"), peft_like.to_string()).unwrap();
    let mut more = config(&dir, 1);
    more.lora = true;
    more.lora_adapter = Some(adapter.display().to_string());
    more.output = dir.join("more").display().to_string();
    let more = quiet(more);
    assert_eq!(more.session().vars().len(), t.session().vars().len());
}

#[test]
fn decoder_classifier_writes_labels_and_padding() {
    let dir = setup("cls-llama", "llama");
    // Integer labels keep their values as ids.
    let rows: Vec<(String, &str)> =
        colour_rows(24, 0).into_iter().map(|(t, l)| (t, if l == "warm" { "1" } else { "0" })).collect();
    let mut s = String::new();
    for (t, l) in &rows {
        s.push_str(&json!({"sentence": t, "category": l.parse::<u32>().unwrap()}).to_string());
        s.push('\n');
    }
    std::fs::write(dir.join("train.jsonl"), s).unwrap();
    let mut cfg = config(&dir, 6);
    cfg.data = dir.join("train.jsonl").display().to_string();
    cfg.validation_file = None;
    let mut t = quiet(cfg);
    let out = t.run().unwrap().output.unwrap();
    let c = read_json(&out.join("config.json"));
    assert_eq!(c["architectures"], json!(["LlamaForSequenceClassification"]));
    assert_eq!(c["id2label"], json!({"0": "0", "1": "1"}));
    assert_eq!(c["pad_token_id"], json!(2));
    let names: Vec<String> =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap().into_keys().collect();
    assert!(names.iter().any(|n| n == "score.weight"));
    assert!(!names.iter().any(|n| n == "lm_head.weight"));
}

#[test]
fn classification_data_errors_name_the_file_and_line() {
    let dir = setup("cls-errors", "bert");
    // A missing column names the column and lists those there are.
    let mut cfg = config(&dir, 1);
    cfg.label_column = "labels".into();
    let err = prepare(cfg).err().unwrap().to_string();
    assert!(err.contains("train.csv:1") && err.contains("\"labels\"") && err.contains("category"), "{err}");
    // A validation label the model does not know names its line.
    std::fs::write(
        dir.join("val.csv"),
        "sentence,category\n\"the cat is red .\",warm\n\"the sky is blue .\",lukewarm\n",
    )
    .unwrap();
    let err = prepare(config(&dir, 1)).err().unwrap().to_string();
    assert!(err.contains("val.csv:3") && err.contains("lukewarm"), "{err}");
    // JSONL: a non-string text names its line.
    std::fs::write(
        dir.join("bad.jsonl"),
        "{\"sentence\": \"the cat\", \"category\": \"warm\"}\n{\"sentence\": 5, \"category\": \"cool\"}\n",
    )
    .unwrap();
    let mut cfg = config(&dir, 1);
    cfg.data = dir.join("bad.jsonl").display().to_string();
    cfg.validation_file = None;
    match prepare(cfg) {
        Err(TrainError::Data { line, message, .. }) => {
            assert!(line == 2 && message.contains("sentence"), "{line}: {message}")
        }
        other => panic!("expected a data error, got {:?}", other.err()),
    }
    // Integer labels sort numerically.
    let recs: Vec<ranger_train::classify::Record> = ["10", "2", "1"]
        .iter()
        .map(|l| ranger_train::classify::Record { line: 1, text: "x".into(), pair: None, label: Some(l.to_string()) })
        .collect();
    assert_eq!(labels_from_records(&recs), vec!["1", "2", "10"]);
}

#[test]
fn text_pairs_reach_the_model_as_two_segments() {
    let dir = setup("cls-pairs", "bert");
    let mut s = String::from("premise,hypothesis,label\n");
    for (i, (t, l)) in colour_rows(16, 0).iter().enumerate() {
        s.push_str(&format!(
            "\"{t}\",\"{} is red .\",{}\n",
            if i % 2 == 0 { "the cat" } else { "the dog" },
            if *l == "warm" { "yes" } else { "no" }
        ));
    }
    std::fs::write(dir.join("pairs.csv"), s).unwrap();
    let mut cfg = config(&dir, 2);
    cfg.data = dir.join("pairs.csv").display().to_string();
    cfg.validation_file = None;
    cfg.text_column = "premise".into();
    cfg.text_pair_column = Some("hypothesis".into());
    cfg.label_column = "label".into();
    let t = quiet(cfg);
    let ranger_train::task::Task::Classify { train, labels, .. } = t.session().task() else {
        panic!("not a classifier")
    };
    assert_eq!(labels, &vec!["no".to_string(), "yes".to_string()]);
    let e = &train.sequences[0];
    // [CLS] a [SEP] b [SEP]: the second text and its [SEP] have token type 1.
    assert_eq!(e.ids[0], 2);
    assert_eq!(e.ids.iter().filter(|&&i| i == 3).count(), 2);
    let first_sep = e.ids.iter().position(|&i| i == 3).unwrap();
    assert!(
        e.type_ids[..=first_sep].iter().all(|&t| t == 0) && e.type_ids[first_sep + 1..].iter().all(|&t| t == 1),
        "{:?}",
        e.type_ids
    );
}

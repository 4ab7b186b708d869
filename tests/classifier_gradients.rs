//! Sequence classifiers: every trainable tensor of every supported backbone (BERT, RoBERTa,
//! DistilBERT, a Llama decoder) gets its true gradient (finite-difference check in f64 on tiny
//! random configs, with padding and text pairs in the batch); padding never changes a row's
//! logits; and the BERT encoder agrees with candle-transformers' inference implementation.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use ranger_train::classify::{collate, LabeledText};
use ranger_train::model::classifier::ClassifierBatch;
use ranger_train::model::{BackboneConfig, ModelConfig, SequenceClassifier};
use ranger_train::rng::Rng;
use ranger_train::testing::{random_classifier_weights, tiny_encoder_config, TINY_ENCODER_VOCAB};
use serde_json::Value;

const LABELS: usize = 3;

fn build(config: &Value, dtype: DType, seed: u64) -> (Vec<(String, Var)>, SequenceClassifier) {
    let backbone = ModelConfig::from_json(config.clone(), "test").unwrap().backbone();
    let weights = random_classifier_weights(&backbone, LABELS, seed, dtype).unwrap();
    let vars: Vec<(String, Var)> = backbone
        .weight_shapes(LABELS)
        .into_iter()
        .map(|(n, _)| (n.clone(), Var::from_tensor(&weights[&n]).unwrap()))
        .collect();
    let map: HashMap<String, Tensor> = vars.iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect();
    (vars, SequenceClassifier::new(backbone, LABELS, &map).unwrap())
}

fn batch(model: &SequenceClassifier, ex: &[LabeledText]) -> ClassifierBatch {
    let refs: Vec<&LabeledText> = ex.iter().collect();
    collate(&refs, 0, model.mask_kind(), model.mask_dtype(), &Device::Cpu).unwrap()
}

fn loss(model: &SequenceClassifier, b: &ClassifierBatch) -> Tensor {
    model.loss_sum(&model.forward(b).unwrap(), &b.labels).unwrap()
}

/// Compares the analytic gradient `g[i]` of `var` with a central finite difference.
fn check_element(model: &SequenceClassifier, b: &ClassifierBatch, var: &Var, g: &[f64], i: usize, what: &str) {
    common::check_gradient_element(var, g, i, what, || loss(model, b).to_scalar::<f64>().unwrap());
}

fn gradient_check(config: Value, vocab: usize) {
    let name = config["model_type"].as_str().unwrap().to_string();
    let (vars, model) = build(&config, DType::F64, 11);
    let b = batch(&model, &common::labeled_examples(vocab));
    let grads = loss(&model, &b).backward().unwrap();
    let mut rng = Rng::new(17);
    for (wname, var) in &vars {
        let g = common::gradient(&grads, var, &format!("{name}: {wname}"));
        // Key biases have a true gradient of zero (softmax is shift-invariant per query).
        let key_bias = wname.ends_with("key.bias") || wname.ends_with("k_lin.bias") || wname.ends_with("k_proj.bias");
        if !key_bias {
            assert!(g.iter().any(|x| *x != 0.0), "{name}: {wname} has an all-zero gradient");
        }
        // Embedding tables: check rows the batch uses, where the gradient is not trivially 0.
        let nonzero: Vec<usize> = (0..g.len()).filter(|&i| g[i] != 0.0).collect();
        for k in 0..4 {
            let i =
                if k % 2 == 0 && !nonzero.is_empty() { nonzero[rng.below(nonzero.len())] } else { rng.below(g.len()) };
            check_element(&model, &b, var, &g, i, &format!("{name}: {wname}"));
        }
    }
}

#[test]
fn bert_classifier_gradients() {
    gradient_check(tiny_encoder_config("bert"), TINY_ENCODER_VOCAB);
}

#[test]
fn roberta_classifier_gradients() {
    gradient_check(tiny_encoder_config("roberta"), TINY_ENCODER_VOCAB);
}

#[test]
fn distilbert_classifier_gradients() {
    gradient_check(tiny_encoder_config("distilbert"), TINY_ENCODER_VOCAB);
}

#[test]
fn llama_classifier_gradients() {
    gradient_check(common::tiny_config("llama"), common::TINY_VOCAB);
}

/// ModernBERT's classifier: bidirectional with a local layer, LayerNorms without biases, GeGLU
/// with the exact GELU, its dense/GELU/LayerNorm head over mean pooling and over the first token.
#[test]
fn modernbert_classifier_gradients() {
    let mut config = common::tiny_config("modernbert");
    gradient_check(config.clone(), common::TINY_VOCAB);
    config["classifier_pooling"] = serde_json::json!("cls");
    gradient_check(config, common::TINY_VOCAB);
}

/// GPT-2's classifier (`GPT2ForSequenceClassification`): learned positions, LayerNorms.
#[test]
fn gpt2_classifier_gradients() {
    gradient_check(common::tiny_config("gpt2"), common::TINY_VOCAB);
}

/// Phi-3's classifier: fused projections, partial rotary, LongRoPE, and a causal mask within its
/// sliding window.
#[test]
fn phi3_classifier_gradients() {
    gradient_check(common::tiny_config("phi3"), common::TINY_VOCAB);
}

#[test]
fn qwen2_classifier_gradients() {
    gradient_check(common::tiny_config("qwen2"), common::TINY_VOCAB);
}

/// A row's logits do not depend on the padding around it (encoders attend to no padding;
/// decoders pool at the last real token).
#[test]
fn padding_does_not_change_logits() {
    for config in [
        tiny_encoder_config("bert"),
        tiny_encoder_config("roberta"),
        tiny_encoder_config("distilbert"),
        common::tiny_config("llama"),
        common::tiny_config("modernbert"),
        // LongRoPE picks its factors from the batch's longest position (as transformers does),
        // so a padded row can change factors: here the context holds every batch.
        {
            let mut c = common::tiny_config("phi3");
            c["original_max_position_embeddings"] = serde_json::json!(64);
            c
        },
    ] {
        let decoder = ["llama", "phi3", "modernbert"].iter().any(|t| config["model_type"] == *t);
        let vocab = if decoder { common::TINY_VOCAB } else { TINY_ENCODER_VOCAB };
        let (_, model) = build(&config, DType::F64, 5);
        let ex = common::labeled_examples(vocab);
        let together = model.forward(&batch(&model, &ex)).unwrap();
        for (i, e) in ex.iter().enumerate() {
            let alone = model.forward(&batch(&model, std::slice::from_ref(e))).unwrap();
            let d = (together.get(i).unwrap() - alone.get(0).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(d < 1e-10, "{}: row {i} differs by {d} when padded", config["model_type"]);
        }
    }
}

/// Our BERT encoder and candle-transformers' `BertModel` give the same hidden states on the
/// same weights (token types and padding included).
#[test]
fn bert_encoder_matches_candle_transformers() {
    let config = tiny_encoder_config("bert");
    let backbone = ModelConfig::from_json(config.clone(), "test").unwrap().backbone();
    let BackboneConfig::Encoder(enc_cfg) = &backbone else { unreachable!() };
    let weights = random_classifier_weights(&backbone, LABELS, 7, DType::F32).unwrap();
    let ours = ranger_train::model::Encoder::new(enc_cfg.clone(), &weights).unwrap();
    let ex = common::labeled_examples(TINY_ENCODER_VOCAB);
    let refs: Vec<&LabeledText> = ex.iter().collect();
    let b = collate(&refs, 0, ranger_train::model::MaskKind::Padding, DType::F32, &Device::Cpu).unwrap();
    let h_ours = ours.forward(&b.input_ids, b.token_type_ids.as_ref(), &b.mask).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let c: candle_transformers::models::bert::Config = serde_json::from_value(config).unwrap();
    let theirs = candle_transformers::models::bert::BertModel::load(vb.pp("bert"), &c).unwrap();
    let lengths: Vec<usize> = ex.iter().map(|e| e.ids.len()).collect();
    let s = b.input_ids.dim(1).unwrap();
    let attention: Vec<u32> = lengths.iter().flat_map(|&l| (0..s).map(move |j| u32::from(j < l))).collect();
    let attention = Tensor::from_vec(attention, (ex.len(), s), &Device::Cpu).unwrap();
    let h_theirs = theirs.forward(&b.input_ids, b.token_type_ids.as_ref().unwrap(), Some(&attention)).unwrap();
    for (i, &l) in lengths.iter().enumerate() {
        let a = h_ours.get(i).unwrap().narrow(0, 0, l).unwrap();
        let t = h_theirs.get(i).unwrap().narrow(0, 0, l).unwrap();
        let d = (a - t).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "row {i}: hidden states differ by {d}");
    }
}

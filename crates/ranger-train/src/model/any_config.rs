//! The configuration of any supported model: a Llama-family decoder or a BERT-family encoder.

use super::bert::{EncoderConfig, EncoderFamily};
use super::classifier::BackboneConfig;
use super::config::LlamaConfig;

/// The configuration of any supported model, told apart by `model_type`.
// A configuration is built once per model: boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum ModelConfig {
    /// A Llama-family decoder.
    Decoder(LlamaConfig),
    /// A BERT-family encoder.
    Encoder(EncoderConfig),
}

impl ModelConfig {
    /// Parses a `config.json` value; `source` names the file in errors.
    pub fn from_json(raw: serde_json::Value, source: &str) -> crate::Result<Self> {
        let mt = raw.get("model_type").and_then(serde_json::Value::as_str).unwrap_or_default();
        if EncoderFamily::from_model_type(mt).is_some() {
            Ok(Self::Encoder(EncoderConfig::from_json(raw, source)?))
        } else {
            Ok(Self::Decoder(LlamaConfig::from_json(raw, source)?))
        }
    }

    /// The decoder configuration; an encoder is an error naming `origin` (encoders can only be
    /// trained as classifiers).
    pub fn decoder(&self, origin: &str) -> crate::Result<&LlamaConfig> {
        match self {
            Self::Decoder(c) if c.bidirectional => Err(crate::TrainError::Config {
                origin: origin.to_string(),
                message: "a ModernBERT encoder has no language-model head here; train it with --task classify".into(),
            }),
            Self::Decoder(c) => Ok(c),
            Self::Encoder(c) => Err(crate::TrainError::Config {
                origin: origin.to_string(),
                message: format!(
                    "a {} encoder has no language-model head; train it with --task classify",
                    c.family.prefix()
                ),
            }),
        }
    }

    /// As the backbone of a classifier.
    pub fn backbone(&self) -> BackboneConfig {
        match self {
            Self::Decoder(c) => BackboneConfig::Decoder(c.clone()),
            Self::Encoder(c) => BackboneConfig::Encoder(c.clone()),
        }
    }

    /// The `config.json` as read.
    pub fn raw(&self) -> &serde_json::Value {
        match self {
            Self::Decoder(c) => &c.raw,
            Self::Encoder(c) => &c.raw,
        }
    }
}

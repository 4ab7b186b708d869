//! Tokenizer plus chat template (rendered with minijinja, as transformers' `apply_chat_template`).

use std::path::Path;

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::error::{Result, TrainError};

/// Byte range `(start, end)` of each token in the encoded text.
pub type Offsets = Vec<(usize, usize)>;

/// One chat message.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// The text.
    pub content: String,
}

/// A tokenizer with the special tokens and chat template of its `tokenizer_config.json`.
#[derive(Clone)]
pub struct TextTokenizer {
    /// The Hugging Face tokenizer.
    pub inner: Tokenizer,
    /// `bos_token` text, if any.
    pub bos_token: Option<String>,
    /// `eos_token` text.
    pub eos_token: Option<String>,
    /// End-of-sequence id (appended to plain-text and completion examples).
    pub eos_id: Option<u32>,
    /// Padding id (the pad token, else EOS, else 0).
    pub pad_id: u32,
    /// The Jinja chat template.
    pub chat_template: Option<String>,
    /// `tokenizer_config.json` as read (written back with the model).
    pub config: Value,
    /// The chat template, compiled on first use (data loading renders it many times).
    compiled: std::sync::OnceLock<std::result::Result<minijinja::Environment<'static>, String>>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("eos_id", &self.eos_id).field("pad_id", &self.pad_id).finish()
    }
}

fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// The chat template of the folder `dir` whose `tokenizer_config.json` is `config`: its
/// `chat_template` (a string, or the entry named `default` of a list), else the file
/// `chat_template.jinja` (where newer checkpoints keep it).
fn template_in(config: &Value, dir: &Path) -> Result<Option<String>> {
    let jinja = dir.join("chat_template.jinja");
    Ok(match config.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str).map(String::from)),
        _ if jinja.exists() => Some(std::fs::read_to_string(&jinja).map_err(TrainError::io(&jinja))?),
        _ => None,
    })
}

/// The `tokenizer_config.json` of the folder `dir` (an empty object when it has none).
fn read_config(dir: &Path) -> Result<Value> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(Value::Object(Default::default()));
    }
    let text = std::fs::read_to_string(&path).map_err(TrainError::io(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Tokenizer(format!("{}: {e}", path.display())))
}

/// The chat template a tokenizer folder holds (see [`TextTokenizer::from_dir`]), without loading
/// its tokenizer; `None` when it has none.
pub fn read_chat_template(dir: &Path) -> Result<Option<String>> {
    template_in(&read_config(dir)?, dir)
}

impl TextTokenizer {
    /// Loads `tokenizer.json` and (if present) `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&tj).map_err(|e| TrainError::Tokenizer(format!("{}: {e}", tj.display())))?;
        let config = read_config(dir)?;
        let chat_template = template_in(&config, dir)?;
        Ok(Self::new(inner, config, chat_template))
    }

    /// Builds from parts (the GGUF path uses this).
    pub fn new(mut inner: Tokenizer, config: Value, chat_template: Option<String>) -> Self {
        let bos_token = token_text(config.get("bos_token"));
        let eos_token = token_text(config.get("eos_token"));
        let pad_token = token_text(config.get("pad_token"));
        let eos_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let pad_id = pad_token.as_deref().and_then(|t| inner.token_to_id(t)).or(eos_id).unwrap_or(0);
        // Batches are padded and truncated by us, never by the tokenizer.
        inner.with_padding(None);
        let _ = inner.with_truncation(None);
        Self {
            inner,
            bos_token,
            eos_token,
            eos_id,
            pad_id,
            chat_template,
            config,
            compiled: std::sync::OnceLock::new(),
        }
    }

    /// This tokenizer with `template` as its chat template instead of its own.
    pub fn with_chat_template(self, template: String) -> Self {
        Self::new(self.inner, self.config, Some(template))
    }

    /// This tokenizer with the chat template read from the file `path` (`--chat-template`).
    pub fn with_chat_template_file(self, path: &Path) -> Result<Self> {
        let template = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
        if template.trim().is_empty() {
            return Err(TrainError::Template(format!("{}: the chat template file is empty", path.display())));
        }
        Ok(self.with_chat_template(template))
    }

    /// Token ids and byte offsets of `text`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, Offsets)> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| TrainError::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| TrainError::Tokenizer(e.to_string()))
    }

    /// Renders `messages` with the chat template.
    pub fn apply_chat_template(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            TrainError::Template("this tokenizer has no chat_template, so `messages` data cannot be rendered (give one with --chat-template FILE)".into())
        })?;
        let env = self
            .compiled
            .get_or_init(|| {
                let mut env = minijinja::Environment::new();
                // As transformers compiles chat templates: a block tag's line break and the
                // indentation before it are not output (multi-line templates: SmolLM3, Qwen).
                env.set_trim_blocks(true);
                env.set_lstrip_blocks(true);
                minijinja_contrib::add_to_environment(&mut env);
                env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
                env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
                    Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
                });
                env.add_template_owned("chat", template.to_string()).map_err(|e| e.to_string())?;
                Ok(env)
            })
            .as_ref()
            .map_err(|e| TrainError::Template(e.clone()))?;
        let tmpl = env.get_template("chat").map_err(|e| TrainError::Template(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        })
        .map_err(|e| TrainError::Template(e.to_string()))
    }
}

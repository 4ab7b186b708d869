//! Where a run's options come from: the defaults, then the TOML file, then the flags given on
//! the command line, each layer winning over the one before.

use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgMatches, FromArgMatches};

use super::{ConfigError, TrainConfig};

/// Flags that also turn `lora` on when given on the command line (in a file they do not, as
/// before: there each key says only what it says).
const IMPLY_LORA: &[&str] = &["dora", "rslora", "lora_adapter"];

impl TrainConfig {
    /// The options of a TOML file (flat keys named as the fields), the defaults for the rest.
    /// Unknown keys are refused; the error names the file and the key.
    pub fn from_toml(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Toml { path: path.to_path_buf(), source })
    }

    /// The options of `ranger-tune train`: the defaults, overridden by the TOML `file` (its path
    /// and text) when there is one, overridden by the flags given on the command line (those
    /// `matches` report as [`ValueSource::CommandLine`]). `--dora`, `--rslora` and
    /// `--lora-adapter` imply `--lora`. The model and the data must be named by one or the other.
    pub fn from_matches_and_toml(matches: &ArgMatches, file: Option<(&Path, &str)>) -> Result<Self, ConfigError> {
        let mut cfg = match file {
            Some((path, text)) => Self::from_toml(path, text)?,
            None => Self::default(),
        };
        cfg.overlay_flags(matches)?;
        if cfg.model.is_empty() {
            return Err(ConfigError::MissingModel);
        }
        if cfg.data.is_empty() {
            return Err(ConfigError::MissingData);
        }
        Ok(cfg)
    }

    /// Replaces each option given on the command line by its flag's value. Field by field
    /// through TOML tables, so no list of fields is kept here (flag ids are the field names).
    fn overlay_flags(&mut self, matches: &ArgMatches) -> Result<(), ConfigError> {
        let given = |id: &str| matches.value_source(id) == Some(ValueSource::CommandLine);
        let flags = toml::Table::try_from(Self::from_arg_matches(matches)?)?;
        let mut merged = toml::Table::try_from(&*self)?;
        for (id, value) in flags {
            if given(&id) {
                merged.insert(id, value);
            }
        }
        *self = merged.try_into().expect("a table written from a TrainConfig reads back as one");
        if IMPLY_LORA.iter().any(|id| given(id)) {
            self.lora = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::{DTypeArg, OptimizerKind, ScheduleKind, TaskKind};

    fn matches(flags: &[&str]) -> ArgMatches {
        TrainConfig::command().try_get_matches_from([&["train"][..], flags].concat()).unwrap()
    }

    fn from(flags: &[&str], toml: Option<&str>) -> Result<TrainConfig, ConfigError> {
        let path = PathBuf::from("run.toml");
        TrainConfig::from_matches_and_toml(&matches(flags), toml.map(|t| (path.as_path(), t)))
    }

    const REQUIRED: [&str; 4] = ["--model", "m", "--data", "d.jsonl"];

    #[test]
    fn the_flags_are_well_formed() {
        TrainConfig::command().debug_assert();
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = TrainConfig::default();
        assert_eq!((c.model.as_str(), c.data.as_str(), c.output.as_str()), ("", "", "ranger-output"));
        assert_eq!((c.task, c.optimizer, c.lr_scheduler, c.dtype), Default::default());
        assert!(c.mask_prompt && c.centralize && !c.pack && !c.lora);
        assert_eq!((c.learning_rate, c.beta2, c.lookahead_alpha, c.flat_fraction), (None, None, 0.5, 0.7));
        assert_eq!((c.max_seq_length, c.batch_size, c.lookahead_k, c.seed), (512, 4, 6, 42));
        assert_eq!((c.max_shard_size, c.save_total_limit, c.lora_rank, c.lora_alpha), (5_000_000_000, 2, 8, 16.0));
        assert_eq!((c.text_column.as_str(), c.label_column.as_str(), c.device.as_str()), ("text", "label", "auto"));
        assert_eq!((c.beta1, c.eps, c.max_steps, &c.labels), (None, None, None, &None));
        assert!(c.lora_targets.is_empty() && c.modules_to_save.is_empty());
        // A file that says nothing changes nothing.
        assert_eq!(TrainConfig::from_toml(Path::new("empty.toml"), "").unwrap(), c);
    }

    #[test]
    fn flags_win_over_the_file_which_wins_over_the_defaults() {
        let file = "model = \"from-file\"\ndata = \"f.jsonl\"\nmax_steps = 50\nlearning_rate = 0.01\npack = true\n\
                    mask_prompt = false\nlr_scheduler = \"flat-cosine\"\ntask = \"classify\"\nlabels = [\"a\", \"b\"]\n";
        let c = from(&["--max-steps", "3", "--dtype", "bf16", "--optimizer", "radam"], Some(file)).unwrap();
        assert_eq!((c.model.as_str(), c.data.as_str()), ("from-file", "f.jsonl"));
        assert_eq!(c.max_steps, Some(3), "the flag wins");
        assert_eq!(c.learning_rate, Some(0.01), "the file wins over the default");
        assert!(c.pack && !c.mask_prompt, "flags not given leave the file's booleans alone");
        assert_eq!((c.lr_scheduler, c.task), (ScheduleKind::FlatCosine, TaskKind::Classify));
        assert_eq!((c.dtype, c.optimizer), (DTypeArg::Bf16, OptimizerKind::Radam));
        assert_eq!(c.labels, Some(vec!["a".to_string(), "b".to_string()]));
        assert_eq!(c.batch_size, 4, "neither: the default");
        // A flag equal to the default still wins over the file.
        let c = from(&["--learning-rate", "5e-5", "--max-steps", "7"], Some(file)).unwrap();
        assert_eq!((c.learning_rate, c.max_steps), (Some(5e-5), Some(7)));
    }

    #[test]
    fn negative_flags_lists_and_short_names() {
        let c = from(&[&REQUIRED[..], &["--no-mask-prompt", "--no-centralize", "-o", "out"]].concat(), None).unwrap();
        assert!(!c.mask_prompt && !c.centralize);
        assert_eq!(c.output, "out");
        let c = from(
            &[
                &REQUIRED[..],
                &["--labels", "neg,pos", "--lora-targets", "q_proj,v_proj", "--modules-to-save", "lm_head"],
            ]
            .concat(),
            None,
        )
        .unwrap();
        assert_eq!(c.labels, Some(vec!["neg".into(), "pos".into()]));
        assert_eq!(c.lora_targets, ["q_proj", "v_proj"]);
        assert_eq!(c.modules_to_save, ["lm_head"]);
        // The file's list is replaced, not extended.
        let c = from(&["--lora-targets", "o_proj"], Some("model = \"m\"\ndata = \"d\"\nlora_targets = [\"q_proj\"]\n"));
        assert_eq!(c.unwrap().lora_targets, ["o_proj"]);
    }

    #[test]
    fn dora_rslora_and_an_adapter_imply_lora_as_flags() {
        for flags in [&["--dora"][..], &["--rslora"], &["--lora-adapter", "a"], &["--lora"]] {
            let c = from(&[&REQUIRED[..], flags].concat(), None).unwrap();
            assert!(c.lora, "{flags:?}");
        }
        let c = from(&[&REQUIRED[..], &["--dora"]].concat(), None).unwrap();
        assert!(c.dora && !c.rslora && c.lora_adapter.is_none());
        assert!(!from(&REQUIRED, None).unwrap().lora);
        // In a file each key says only what it says.
        let c = from(&REQUIRED, Some("dora = true\n")).unwrap();
        assert!(c.dora && !c.lora);
    }

    #[test]
    fn model_and_data_are_required_from_one_side_or_the_other() {
        let e = from(&["--data", "d"], None).unwrap_err();
        assert_eq!(e.to_string(), "--model is required (a Hub id, a model folder or a .gguf file)");
        assert!(matches!(from(&["--model", "m"], None), Err(ConfigError::MissingData)));
        assert_eq!(from(&["--model", "m"], None).unwrap_err().to_string(), "--data is required");
        assert!(from(&["--model", "m"], Some("data = \"d\"")).is_ok());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_file_and_key() {
        for (text, key) in [("learning_rat = 0.1\n", "learning_rat"), ("lr_scheduler = \"cosin\"\n", "cosin")] {
            let e = from(&REQUIRED, Some(text)).unwrap_err();
            assert!(matches!(e, ConfigError::Toml { .. }));
            assert_eq!(e.to_string(), "run.toml: invalid config");
            let source = std::error::Error::source(&e).unwrap().to_string();
            assert!(source.contains(key), "{source}");
        }
    }

    #[test]
    fn non_finite_values_pass_through() {
        let c = from(&[&REQUIRED[..], &["--max-grad-norm", "inf"]].concat(), Some("weight_decay = nan\n")).unwrap();
        assert!(c.max_grad_norm.is_infinite() && c.weight_decay.is_nan());
    }
}

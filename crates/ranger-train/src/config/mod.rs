//! Every option of a training run, each written once: [`TrainConfig`] is at the same time the
//! `ranger-tune train` flags (clap), the keys of a TOML config file (serde) and what the trainer
//! reads; which options a resume may change is declared beside it ([`MAY_CHANGE_ON_RESUME`]).

mod device;
mod error;
mod kinds;
mod layers;
mod resume;
mod run_defaults;
mod train_config;

pub use device::parse_device;
pub use error::ConfigError;
pub use kinds::{
    BestMetric, DTypeArg, EvalWeights, GgufTypeArg, NanPolicy, OptimizerKernel, OptimizerKind, QuantizeArg,
    ScheduleKind, TaskKind,
};
pub use resume::{ResumeMismatch, MAY_CHANGE_ON_RESUME};
pub use run_defaults::{
    default_beta1, default_beta2, default_eps, default_learning_rate, run_length_factor, MAX_AUTO_BETA2,
    MAX_SHORT_RUN_BOOST, MIN_AUTO_BETA2, MIN_LONG_RUN_FACTOR, PUBLISHED_RANGER_BETA1, RECTIFIER_WARMUP_FRACTION,
    REFERENCE_RUN_STEPS,
};
pub use train_config::TrainConfig;

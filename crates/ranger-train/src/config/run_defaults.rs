//! The defaults of `ranger-tune train` that depend on the run: the peak learning rate (per
//! optimizer, task and full / LoRA) and Adam's β2 for RAdam and Ranger (from the run's length).
//! They come from the recipe study (`tools/recipe_study.py`, README "Choosing settings"). The
//! library's `ParamsRanger::default()` keeps the published Ranger values; these are the CLI's.

use super::{OptimizerKind, TaskKind, TrainConfig};

/// RAdam's rectifier holds the adaptive step back for about 2 / (1 − β2) steps (arXiv
/// 1908.03265, §5); the chosen β2 makes that this fraction of the run.
pub const RECTIFIER_WARMUP_FRACTION: f64 = 0.25;
/// The smallest β2 chosen from the run length: below it the second moment averages too few
/// steps to be a variance estimate.
pub const MIN_AUTO_BETA2: f64 = 0.9;
/// The largest: the published default, reached by runs of 8,000 steps and more.
pub const MAX_AUTO_BETA2: f64 = 0.999;

/// The peak learning rate when none is given: each optimizer's best in the recipe study's
/// sweeps (SmolLM2-135M on chat data at 100 steps, full and LoRA; all-MiniLM-L6-v2 spam
/// classifier at 30 steps). RAdam was not swept: it gets half of Ranger's, the step Ranger's
/// Lookahead (α = 0.5) takes from its fast weights.
pub fn default_learning_rate(optimizer: OptimizerKind, task: TaskKind, lora: bool) -> f64 {
    let ranger = match (task, lora) {
        (TaskKind::CausalLm, false) => 1e-3,
        (TaskKind::CausalLm, true) => 5e-3,
        (TaskKind::Classify, _) => 3e-3,
    };
    match (optimizer, task, lora) {
        (OptimizerKind::Ranger, ..) => ranger,
        (OptimizerKind::Radam, ..) => ranger / 2.0,
        (OptimizerKind::Adamw, TaskKind::CausalLm, false) => 2e-4,
        (OptimizerKind::Adamw, TaskKind::CausalLm, true) => 2e-3,
        (OptimizerKind::Adamw, TaskKind::Classify, _) => 2e-4,
    }
}

/// β1 when none is given: Ranger's 0.95, torch's 0.9 for the others.
pub fn default_beta1(optimizer: OptimizerKind) -> f64 {
    if optimizer == OptimizerKind::Ranger {
        0.95
    } else {
        0.9
    }
}

/// ε when none is given: 1e-8 for every optimizer. The published Ranger's 1e-5 is larger than
/// most gradient elements of a fine-tune once the global norm is clipped to 1 (over 10^8
/// parameters they average ~1e-4 and many are far smaller), so it damps those updates; the
/// recipe study measured the difference.
pub fn default_eps(_optimizer: OptimizerKind) -> f64 {
    1e-8
}

/// β2 when none is given: 0.999 for AdamW (torch's); for RAdam and Ranger the β2 whose
/// rectifier warmup, 2 / (1 − β2) steps, is [`RECTIFIER_WARMUP_FRACTION`] of a run of
/// `total_steps`, within [[`MIN_AUTO_BETA2`], [`MAX_AUTO_BETA2`]], rounded to 4 decimals.
pub fn default_beta2(optimizer: OptimizerKind, total_steps: usize) -> f64 {
    if optimizer == OptimizerKind::Adamw {
        return 0.999;
    }
    let warmup = RECTIFIER_WARMUP_FRACTION * total_steps as f64;
    let beta2 = 1.0 - 2.0 / warmup.max(1.0);
    (beta2.clamp(MIN_AUTO_BETA2, MAX_AUTO_BETA2) * 1e4).round() / 1e4
}

impl TrainConfig {
    /// Fills in the learning rate, β1, β2 and ε when they are unset, for a run of `total_steps`
    /// optimizer steps, and says what was chosen for the learning rate and β2 and why (one line
    /// each). A resumed run plans the same steps, so it chooses the same values, and the
    /// checkpoint records them.
    pub fn fill_run_defaults(&mut self, total_steps: usize) -> Vec<String> {
        let mut notes = vec![];
        self.beta1.get_or_insert(default_beta1(self.optimizer));
        self.eps.get_or_insert(default_eps(self.optimizer));
        let optimizer = format!("{:?}", self.optimizer).to_lowercase();
        if self.learning_rate.is_none() {
            let lr = default_learning_rate(self.optimizer, self.task, self.lora);
            self.learning_rate = Some(lr);
            let what = if self.lora { "LoRA" } else { "full fine-tune" };
            notes
                .push(format!("learning rate {lr:e}: the default for {optimizer}, {what} (--learning-rate to change)"));
        }
        if self.beta2.is_none() {
            let beta2 = default_beta2(self.optimizer, total_steps);
            self.beta2 = Some(beta2);
            if self.optimizer != OptimizerKind::Adamw {
                let warmup = 2.0 / (1.0 - beta2);
                notes.push(format!(
                    "beta2 {beta2}: RAdam's warmup of ~2/(1-beta2) = {warmup:.0} steps in this {total_steps}-step run \
                     (a quarter of it, with beta2 kept within [{MIN_AUTO_BETA2}, {MAX_AUTO_BETA2}]; --beta2 to change)"
                ));
            }
        }
        notes
    }

    /// Fills in β1 and ε of a config saved before the chosen values were recorded, with the
    /// values those versions used (β1 as today; ε 1e-5 for Ranger, 1e-8 for the others), so that
    /// resuming such a checkpoint with today's defaults is refused instead of silently changed.
    pub fn fill_legacy_defaults(&mut self) {
        self.beta1.get_or_insert(default_beta1(self.optimizer));
        self.eps.get_or_insert(if self.optimizer == OptimizerKind::Ranger { 1e-5 } else { 1e-8 });
    }

    /// The peak learning rate (the default until [`TrainConfig::fill_run_defaults`] ran).
    pub fn lr(&self) -> f64 {
        self.learning_rate.unwrap_or_else(|| default_learning_rate(self.optimizer, self.task, self.lora))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beta2_follows_the_run_length_within_bounds() {
        assert_eq!(default_beta2(OptimizerKind::Ranger, 30), MIN_AUTO_BETA2);
        assert_eq!(default_beta2(OptimizerKind::Ranger, 100), 0.92);
        assert_eq!(default_beta2(OptimizerKind::Ranger, 300), 0.9733);
        assert_eq!(default_beta2(OptimizerKind::Radam, 1000), 0.992);
        assert_eq!(default_beta2(OptimizerKind::Ranger, 100_000), MAX_AUTO_BETA2);
        assert_eq!(default_beta2(OptimizerKind::Adamw, 30), 0.999);
        // The rectifier's warmup never exceeds a quarter of a run that can afford it.
        for steps in [80, 100, 300, 1000, 8000] {
            let b = default_beta2(OptimizerKind::Ranger, steps);
            assert!(2.0 / (1.0 - b) <= 0.2501 * steps as f64, "{steps} steps: beta2 {b}");
        }
    }

    #[test]
    fn filling_in_keeps_what_was_given_and_repeats_on_resume() {
        let mut given = TrainConfig { learning_rate: Some(0.1), beta2: Some(0.5), ..Default::default() };
        assert!(given.fill_run_defaults(300).is_empty());
        assert_eq!((given.learning_rate, given.beta2), (Some(0.1), Some(0.5)));
        assert_eq!((given.beta1, given.eps), (Some(0.95), Some(1e-8)), "filled in silently");
        let mut a = TrainConfig { lora: true, ..Default::default() };
        let mut b = a.clone();
        assert_eq!(a.fill_run_defaults(300).len(), 2, "both chosen and said");
        b.fill_run_defaults(300);
        assert_eq!(a, b, "the same run chooses the same values");
        assert_eq!((a.learning_rate, a.beta2), (Some(default_learning_rate(a.optimizer, a.task, true)), Some(0.9733)));
    }

    #[test]
    fn an_old_checkpoint_config_gets_the_values_it_ran_with() {
        let mut old = TrainConfig { learning_rate: Some(5e-5), beta2: Some(0.999), ..Default::default() };
        old.fill_legacy_defaults();
        assert_eq!((old.beta1, old.eps), (Some(0.95), Some(1e-5)));
        let mut now = TrainConfig::default();
        now.fill_run_defaults(100);
        let options: Vec<String> = now.resume_mismatches(&old).iter().map(|m| m.option.clone()).collect();
        assert_eq!(options, ["beta2", "eps", "learning_rate"], "refused, naming what changed");
    }
}

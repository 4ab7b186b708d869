//! The defaults of `ranger-tune train` that depend on the run: the peak learning rate (per
//! optimizer, task and full / LoRA), β1 (the same for all) and Adam's β2 for RAdam and Ranger
//! (from the run's length).
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

/// Ranger's and RAdam's default learning rate is set for runs of this many optimizer steps; a
/// shorter run gets a higher one and a longer causal-LM run a lower one (see
/// [`run_length_factor`]).
pub const REFERENCE_RUN_STEPS: usize = 100;
/// The most a short run raises the learning rate (reached at 25 steps).
pub const MAX_SHORT_RUN_BOOST: f64 = 4.0;
/// The lowest a long causal-LM run's learning rate falls (reached at 1,600 steps).
pub const MIN_LONG_RUN_FACTOR: f64 = 0.25;

/// How much Ranger's and RAdam's default learning rate is scaled for a run of `total_steps`.
///
/// - Shorter than [`REFERENCE_RUN_STEPS`]: raised by `REFERENCE_RUN_STEPS / total_steps`, at most
///   [`MAX_SHORT_RUN_BOOST`]. In a short run the rectifier's warmup (β2 no lower than
///   [`MIN_AUTO_BETA2`]) and Lookahead's trailing slow weights take a larger share of the steps,
///   and the recipe study's 30-step sweeps put the best rate at 3–4 times the 100-step one.
/// - Longer (causal LMs): lowered by `sqrt(REFERENCE_RUN_STEPS / total_steps)`, at least
///   [`MIN_LONG_RUN_FACTOR`], so the distance a run's noisy steps carry the weights from the
///   base model stays about that of a 100-step run. In the study's 300-step chat runs this kept
///   far more of what the model knew (general-knowledge loss 1.20 instead of 1.77 full, 1.65
///   instead of 2.07 LoRA, over two seeds) at the same LoRA task loss and a full one of 0.0002
///   instead of 0.0001. A classifier's head starts from scratch and has nothing to forget, so
///   its rate is not lowered.
pub fn run_length_factor(optimizer: OptimizerKind, task: TaskKind, total_steps: usize) -> f64 {
    if optimizer == OptimizerKind::Adamw {
        return 1.0;
    }
    let ratio = REFERENCE_RUN_STEPS as f64 / total_steps.max(1) as f64;
    if ratio >= 1.0 {
        ratio.min(MAX_SHORT_RUN_BOOST)
    } else if task == TaskKind::CausalLm {
        ratio.sqrt().max(MIN_LONG_RUN_FACTOR)
    } else {
        1.0
    }
}

/// The peak learning rate when none is given, for a run of `total_steps` optimizer steps:
/// each optimizer's best in the recipe study's sweeps (SmolLM2-135M on chat and email data,
/// full and LoRA; the all-MiniLM-L6-v2 spam classifier, full and LoRA). Ranger's: 5e-4 for a
/// full fine-tune (causal LM or classifier), 7e-3 for a causal LM with LoRA, 3e-3 for a LoRA
/// classifier, for 100-step runs, times [`run_length_factor`] for shorter and longer ones. (A
/// classifier's was 1e-3 full or LoRA, taken from the causal-LM sweeps. With β1 0.95, the
/// classifiers' default then: over four seeds a full
/// fine-tune at 5e-4 reached 96.2 % held-out accuracy at 100 steps against 94.6 %, and 92.9 %
/// against 92.5 % at 30, where the short-run rule makes it 1.67e-3. Over two seeds a LoRA
/// classifier at 3e-3 reached 89.0 % against 78.9 % at 30 steps and 93.4 % against 90.1 % at
/// 100; 7e-3 did better at 100 steps (94.8 %), but at 30 (2.33e-2) it made Gemma 3 270M's
/// training loss jump to 5 and ended at 87.5 %, against 92.75 % at 3e-3's 1e-2.) AdamW's does not
/// depend on the run or the task: 2e-4 full, 2e-3 LoRA (a LoRA classifier's was 2e-4, which
/// reached 65.6 % at 30 steps and 87.4 % at 100 against 92.2 % and 94.5 % at 2e-3). RAdam was not
/// swept: it gets half of Ranger's, the step Ranger's Lookahead (α = 0.5) takes from its fast
/// weights. Rounded to 3 significant digits.
pub fn default_learning_rate(optimizer: OptimizerKind, task: TaskKind, lora: bool, total_steps: usize) -> f64 {
    let ranger = match (task, lora) {
        (_, false) => 5e-4,
        (TaskKind::CausalLm, true) => 7e-3,
        (TaskKind::Classify, true) => 3e-3,
    };
    let lr = match optimizer {
        OptimizerKind::Ranger => ranger,
        OptimizerKind::Radam => ranger / 2.0,
        OptimizerKind::Adamw if lora => 2e-3,
        OptimizerKind::Adamw => 2e-4,
    } * run_length_factor(optimizer, task, total_steps);
    let scale = 10f64.powi(2 - lr.log10().floor() as i32);
    (lr * scale).round() / scale
}

/// β1 when none is given: 0.9 (torch's) for every optimizer and task. In the recipe study's
/// causal-LM cells (chat and email text, full and LoRA, 30 to 300 steps) it put Ranger ahead of
/// AdamW in 9 of 12 against 5 with the published Ranger's 0.95, and forgot less in 10. Classifiers
/// kept 0.95 until sixteen seeds at 30 steps and eight at 100 measured both: 91.1 % held-out
/// accuracy against 90.6 % (loss 0.2348 against 0.2621) at 30, level at 100 (95.4 % against
/// 95.3 %, loss 0.1435 against 0.1434).
pub fn default_beta1(_optimizer: OptimizerKind, _task: TaskKind) -> f64 {
    0.9
}

/// The published Ranger's β1: the CLI's default for every Ranger run before causal LMs got 0.9,
/// and for Ranger's classifiers until they did too.
pub const PUBLISHED_RANGER_BETA1: f64 = 0.95;

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
    /// optimizer steps, and says what was chosen for Ranger's β1, the learning rate and RAdam's
    /// and Ranger's β2, and why (one line each). A resumed run plans the same steps, so it
    /// chooses the same values, and the checkpoint records them.
    pub fn fill_run_defaults(&mut self, total_steps: usize) -> Vec<String> {
        let mut notes = vec![];
        let optimizer = format!("{:?}", self.optimizer).to_lowercase();
        if self.beta1.is_none() {
            let beta1 = default_beta1(self.optimizer, self.task);
            self.beta1 = Some(beta1);
            // Only Ranger's differs from what its users may expect (the published Ranger's 0.95).
            if self.optimizer == OptimizerKind::Ranger {
                notes.push(format!(
                    "beta1 {beta1}: the default for ranger (the published Ranger's 0.95 learned less; --beta1 to change)"
                ));
            }
        }
        self.eps.get_or_insert(default_eps(self.optimizer));
        if self.learning_rate.is_none() {
            let lr = default_learning_rate(self.optimizer, self.task, self.lora, total_steps);
            self.learning_rate = Some(lr);
            let what = match (self.task, self.lora) {
                (TaskKind::Classify, false) => "classifier",
                (TaskKind::Classify, true) => "LoRA classifier",
                (TaskKind::CausalLm, true) => "LoRA",
                (TaskKind::CausalLm, false) => "full fine-tune",
            };
            let factor = run_length_factor(self.optimizer, self.task, total_steps);
            let why = if factor > 1.0 {
                format!(", raised {factor:.2}x for a run shorter than {REFERENCE_RUN_STEPS} steps")
            } else if factor < 1.0 {
                format!(
                    ", lowered to {factor:.2}x for a run longer than {REFERENCE_RUN_STEPS} steps, \
                     so that it forgets less of what the model knew"
                )
            } else {
                String::new()
            };
            notes.push(format!(
                "learning rate {lr:e}: the default for {optimizer}, {what}{why} (--learning-rate to change)"
            ));
        }
        if self.beta2.is_none() {
            let beta2 = default_beta2(self.optimizer, total_steps);
            self.beta2 = Some(beta2);
            if self.optimizer != OptimizerKind::Adamw {
                let warmup = 2.0 / (1.0 - beta2);
                // Say so when a bound, not the quarter, chose it (a short run's warmup is longer).
                let share = if beta2 <= MIN_AUTO_BETA2 {
                    format!("more than a quarter of it: beta2 is kept at {MIN_AUTO_BETA2} or above")
                } else if beta2 >= MAX_AUTO_BETA2 {
                    format!("less than a quarter of it: beta2 is kept at {MAX_AUTO_BETA2} or below")
                } else {
                    "a quarter of it".to_string()
                };
                notes.push(format!(
                    "beta2 {beta2}: RAdam's warmup of ~2/(1-beta2) = {warmup:.0} steps in this {total_steps}-step run \
                     ({share}; --beta2 to change)"
                ));
            }
        }
        notes
    }

    /// Fills in β1 and ε of a config saved before the chosen values were recorded, with the
    /// values those versions used (β1 0.95 for Ranger, 0.9 for the others; ε 1e-5 for Ranger,
    /// 1e-8 for the others), so that resuming such a checkpoint with today's defaults is refused
    /// instead of silently changed.
    pub fn fill_legacy_defaults(&mut self) {
        let ranger = self.optimizer == OptimizerKind::Ranger;
        self.beta1.get_or_insert(if ranger { PUBLISHED_RANGER_BETA1 } else { 0.9 });
        self.eps.get_or_insert(if ranger { 1e-5 } else { 1e-8 });
    }

    /// The peak learning rate (until [`TrainConfig::fill_run_defaults`] ran, the default for a
    /// run of [`REFERENCE_RUN_STEPS`] steps or more).
    pub fn lr(&self) -> f64 {
        self.learning_rate
            .unwrap_or_else(|| default_learning_rate(self.optimizer, self.task, self.lora, REFERENCE_RUN_STEPS))
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
    fn the_learning_rate_follows_the_run_length_within_its_bounds() {
        let lr = |opt, lora, steps| default_learning_rate(opt, TaskKind::CausalLm, lora, steps);
        assert_eq!(lr(OptimizerKind::Ranger, true, 100), 7e-3);
        assert_eq!(lr(OptimizerKind::Ranger, true, 50), 1.4e-2);
        assert_eq!(lr(OptimizerKind::Ranger, true, 30), 2.33e-2, "rounded to 3 digits");
        assert_eq!(lr(OptimizerKind::Ranger, false, 30), 1.67e-3);
        assert_eq!(lr(OptimizerKind::Ranger, false, 10), 2e-3, "capped at 4x");
        assert_eq!(lr(OptimizerKind::Radam, false, 30), 8.33e-4);
        // Longer causal-LM runs: sqrt(100 / steps), the values the recipe study ran at 300 steps.
        assert_eq!(lr(OptimizerKind::Ranger, false, 300), 2.89e-4);
        assert_eq!(lr(OptimizerKind::Ranger, true, 300), 4.04e-3);
        assert_eq!(lr(OptimizerKind::Ranger, true, 400), 3.5e-3);
        assert_eq!(lr(OptimizerKind::Ranger, true, 1600), 1.75e-3, "the floor is reached");
        assert_eq!(lr(OptimizerKind::Ranger, true, 100_000), 1.75e-3, "and kept");
        assert_eq!(lr(OptimizerKind::Radam, false, 400), 1.25e-4);
        for steps in [30, 300, 10_000] {
            assert_eq!(lr(OptimizerKind::Adamw, true, steps), 2e-3, "AdamW's does not depend on the run");
        }
        let classifier = |steps| default_learning_rate(OptimizerKind::Ranger, TaskKind::Classify, false, steps);
        assert_eq!(classifier(100), 5e-4);
        assert_eq!(classifier(30), 1.67e-3);
        assert_eq!(classifier(1000), 5e-4, "a classifier's is not lowered");
        let lora_classifier = |steps| default_learning_rate(OptimizerKind::Ranger, TaskKind::Classify, true, steps);
        assert_eq!((lora_classifier(100), lora_classifier(30)), (3e-3, 1e-2));
        assert_eq!(default_learning_rate(OptimizerKind::Adamw, TaskKind::Classify, true, 30), 2e-3);
        assert_eq!(default_learning_rate(OptimizerKind::Adamw, TaskKind::Classify, false, 30), 2e-4);
        // The factor is continuous at the reference length and monotone on each side.
        let f = |steps| run_length_factor(OptimizerKind::Ranger, TaskKind::CausalLm, steps);
        assert_eq!(f(REFERENCE_RUN_STEPS), 1.0);
        assert!((1..3000).all(|n| f(n) >= f(n + 1)));
    }

    #[test]
    fn filling_in_keeps_what_was_given_and_repeats_on_resume() {
        let mut given = TrainConfig { learning_rate: Some(0.1), beta2: Some(0.5), ..Default::default() };
        let notes = given.fill_run_defaults(300);
        assert_eq!((given.learning_rate, given.beta2), (Some(0.1), Some(0.5)));
        assert!(notes.len() == 1 && notes[0].starts_with("beta1 0.9:"), "only the unset one said: {notes:?}");
        assert_eq!((given.beta1, given.eps), (Some(0.9), Some(1e-8)), "ε filled in silently");
        let mut all = TrainConfig { beta1: Some(0.8), ..given.clone() };
        assert!(all.fill_run_defaults(300).is_empty());
        assert_eq!(all.beta1, Some(0.8));
        let mut a = TrainConfig { lora: true, ..Default::default() };
        let mut b = a.clone();
        let notes = a.fill_run_defaults(300);
        assert_eq!(notes.len(), 3, "all three chosen and said");
        assert!(notes[0].starts_with("beta1 0.9: the default for ranger (the published"), "{notes:?}");
        assert!(
            notes[1].starts_with("learning rate 4.04e-3: the default for ranger, LoRA, lowered to 0.58x"),
            "{notes:?}"
        );
        assert!(notes[2].ends_with("steps in this 300-step run (a quarter of it; --beta2 to change)"), "{notes:?}");
        b.fill_run_defaults(300);
        assert_eq!(a, b, "the same run chooses the same values");
        // A bound, not the quarter, chooses a short or very long run's β2, and the note says so.
        let note = |steps| TrainConfig::default().fill_run_defaults(steps).pop().unwrap();
        assert!(note(30).contains("= 20 steps in this 30-step run (more than a quarter of it: beta2 is kept at 0.9"));
        assert!(note(20_000).contains("(less than a quarter of it: beta2 is kept at 0.999 or below;"));
        assert_eq!(
            (a.learning_rate, a.beta2),
            (Some(default_learning_rate(a.optimizer, a.task, true, 300)), Some(0.9733))
        );
    }

    #[test]
    fn beta1_is_torch_s_for_every_optimizer_and_task() {
        use {OptimizerKind::*, TaskKind::*};
        for task in [CausalLm, Classify] {
            for opt in [Ranger, Radam, Adamw] {
                assert_eq!(default_beta1(opt, task), 0.9, "{opt:?} {task:?}");
            }
        }
        for lora in [false, true] {
            let mut classifier = TrainConfig { task: Classify, lora, ..Default::default() };
            classifier.fill_run_defaults(100);
            assert_eq!(classifier.beta1, Some(0.9));
        }
    }

    #[test]
    fn an_old_checkpoint_config_gets_the_values_it_ran_with() {
        let mut old = TrainConfig { learning_rate: Some(5e-5), beta2: Some(0.999), ..Default::default() };
        old.fill_legacy_defaults();
        assert_eq!((old.beta1, old.eps), (Some(0.95), Some(1e-5)));
        let mut now = TrainConfig::default();
        now.fill_run_defaults(100);
        let options: Vec<String> = now.resume_mismatches(&old).iter().map(|m| m.option.clone()).collect();
        assert_eq!(options, ["beta1", "beta2", "eps", "learning_rate"], "refused, naming what changed");
        let mut adamw = TrainConfig { optimizer: OptimizerKind::Adamw, ..Default::default() };
        adamw.fill_legacy_defaults();
        assert_eq!((adamw.beta1, adamw.eps), (Some(0.9), Some(1e-8)));
    }

    #[test]
    fn a_checkpoint_of_the_earlier_beta1_default_is_refused_not_changed() {
        // A Ranger run saved when its default β1 was 0.95 (causal LMs before they got 0.9,
        // classifiers until they did too) records it; resuming it with today's defaults must
        // name β1 rather than go on with 0.9.
        for task in [TaskKind::CausalLm, TaskKind::Classify] {
            let mut saved = TrainConfig { task, ..Default::default() };
            saved.fill_run_defaults(300);
            saved.beta1 = Some(PUBLISHED_RANGER_BETA1);
            let mut now = TrainConfig { task, ..Default::default() };
            now.fill_run_defaults(300);
            let mismatches = now.resume_mismatches(&saved);
            assert_eq!(mismatches.len(), 1, "{task:?}");
            assert_eq!(mismatches[0].to_string(), "beta1 is 0.95 in the checkpoint but 0.9 now");
            now.beta1 = Some(0.95);
            assert!(now.resume_mismatches(&saved).is_empty(), "--beta1 0.95 resumes it");
        }
    }
}

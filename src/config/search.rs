//! A config's `[search]` table: the space `mnist-lab search` samples trials
//! from, and how it schedules them.
//!
//! ```toml
//! [search]
//! scheduler = "asha"      # or "random": every trial to train.epochs
//! trials = 16
//! metric = "val_acc"      # or "val_loss"; never the test set
//! seed = 0
//! min_epochs = 2          # asha: the first rung
//! reduction = 3           # asha: 1 in `reduction` trials goes on at each rung
//!
//! [search.space]
//! "optimizer.lr" = { log_uniform = [1e-3, 1e-1] }
//! "optimizer.weight_decay" = { uniform = [0.0, 1e-3] }
//! "data.augment_shift" = { int = [0, 2] }
//! "model.batch_norm" = { choice = [false, true] }
//! ```

use std::collections::BTreeMap;

use rand::Rng;
use serde::{Deserialize, Serialize};
use smart_default::SmartDefault;

use crate::util::invalid::{InvalidField, invalid};

/// The most trials one search samples.
pub const MAX_TRIALS: usize = 10_000;

/// `[search]`: the space and the schedule of a search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, SmartDefault)]
#[serde(deny_unknown_fields, default)]
pub struct SearchConfig {
    pub scheduler: Scheduler,
    /// Trials sampled from the space.
    #[default(16)]
    pub trials: usize,
    /// What a trial is judged by, on its validation split.
    pub metric: Metric,
    /// Seeds the sampling of the trials (each trial trains with the config's `seed`).
    pub seed: u64,
    /// `asha`: epochs of the first rung.
    #[default(1)]
    pub min_epochs: usize,
    /// `asha`: each rung keeps the best 1 in `reduction` trials and trains them
    /// `reduction` times as long.
    #[default(3)]
    pub reduction: usize,
    /// Dotted config keys (quoted) to the distribution each is drawn from.
    pub space: BTreeMap<String, Distribution>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    /// Every trial trains to `train.epochs`.
    Random,
    /// Successive halving: rungs at `min_epochs`, `min_epochs * reduction`, ...
    /// up to `train.epochs`; the best 1 in `reduction` of each rung go on.
    #[default]
    Asha,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Best validation accuracy so far: higher is better.
    #[default]
    ValAcc,
    /// Lowest validation loss so far: lower is better.
    ValLoss,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::ValAcc => "val_acc",
            Metric::ValLoss => "val_loss",
        }
    }

    /// A value as a score where higher is better; no value scores lowest.
    pub fn score(self, value: Option<f64>) -> f64 {
        match (self, value) {
            (_, None) => f64::NEG_INFINITY,
            (Metric::ValAcc, Some(v)) => v,
            (Metric::ValLoss, Some(v)) => -v,
        }
    }
}

/// Where a searched key's values come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Distribution {
    /// A float uniform in `[low, high)`.
    Uniform([f64; 2]),
    /// A float whose logarithm is uniform: `low > 0` (learning rates).
    LogUniform([f64; 2]),
    /// A whole number from `low` to `high`, both included.
    Int([i64; 2]),
    /// One of the values listed, each as likely.
    Choice(Vec<toml::Value>),
}

impl Distribution {
    /// One value drawn from the distribution.
    pub fn sample(&self, rng: &mut impl Rng) -> toml::Value {
        match self {
            Distribution::Uniform([low, high]) => toml::Value::Float(rng.random_range(*low..*high)),
            Distribution::LogUniform([low, high]) => {
                let log = rng.random_range(low.ln()..high.ln());
                // Six significant digits: names and tables stay readable.
                toml::Value::Float(format!("{:.6e}", log.exp()).parse().unwrap_or(log.exp()))
            }
            Distribution::Int([low, high]) => toml::Value::Integer(rng.random_range(*low..=*high)),
            Distribution::Choice(values) => values[rng.random_range(0..values.len())].clone(),
        }
    }

    fn check(&self) -> Result<(), String> {
        match self {
            Distribution::Uniform([low, high])
                if !(low.is_finite() && high.is_finite() && low < high) =>
            {
                Err(format!(
                    "uniform = [{low}, {high}]: expected finite low < high"
                ))
            }
            Distribution::LogUniform([low, high])
                if !(*low > 0.0 && high.is_finite() && low < high) =>
            {
                Err(format!(
                    "log_uniform = [{low}, {high}]: expected 0 < low < high"
                ))
            }
            Distribution::Int([low, high]) if low > high => {
                Err(format!("int = [{low}, {high}]: expected low <= high"))
            }
            Distribution::Choice(values) if values.is_empty() => {
                Err("choice = []: expected at least one value".into())
            }
            _ => Ok(()),
        }
    }
}

impl SearchConfig {
    /// Range checks, given the epochs a trial may train and whether images are
    /// held out for validation.
    pub fn validate(&self, epochs: usize, validation_size: usize) -> Result<(), InvalidField> {
        if !(1..=MAX_TRIALS).contains(&self.trials) {
            return invalid(
                "search.trials",
                format!("expected 1 to {MAX_TRIALS}, got {}", self.trials),
            );
        }
        if self.reduction < 2 {
            return invalid(
                "search.reduction",
                format!("expected at least 2, got {}", self.reduction),
            );
        }
        if !(1..=epochs).contains(&self.min_epochs) {
            return invalid(
                "search.min_epochs",
                format!(
                    "expected 1 to train.epochs ({epochs}), got {}",
                    self.min_epochs
                ),
            );
        }
        if validation_size == 0 {
            return invalid(
                "search.metric",
                "a search judges trials on the validation split; set data.validation_size above 0",
            );
        }
        if self.space.is_empty() {
            return invalid("search.space", "expected at least one key to search");
        }
        for (key, distribution) in &self.space {
            if key == "name"
                || key == "seed"
                || key.starts_with("search")
                || key.starts_with("sweep")
            {
                return invalid(&format!("search.space.{key}"), "cannot be searched");
            }
            distribution
                .check()
                .or_else(|message| invalid(&format!("search.space.{key}"), message))?;
        }
        Ok(())
    }

    /// The epochs each rung trains to: `min_epochs * reduction^k` below
    /// `epochs`, then `epochs` (`random`: `epochs` alone).
    pub fn rungs(&self, epochs: usize) -> Vec<usize> {
        if self.scheduler == Scheduler::Random {
            return vec![epochs];
        }
        let mut rungs = Vec::new();
        let mut rung = self.min_epochs;
        while rung * self.reduction <= epochs && rung < epochs {
            rungs.push(rung);
            rung *= self.reduction;
        }
        rungs.push(epochs);
        rungs
    }

    /// Each trial's values, drawn in order from one stream seeded by `seed`:
    /// the same seed gives the same trials.
    pub fn sample_trials(&self) -> Vec<Vec<(String, toml::Value)>> {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed);
        (0..self.trials)
            .map(|_| {
                (self.space.iter())
                    .map(|(key, distribution)| (key.clone(), distribution.sample(&mut rng)))
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn search(text: &str) -> SearchConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn rungs_grow_by_the_reduction_and_end_at_the_epochs() {
        let asha = SearchConfig {
            min_epochs: 2,
            reduction: 3,
            ..Default::default()
        };
        assert_eq!(asha.rungs(20), [2, 6, 20]);
        assert_eq!(asha.rungs(18), [2, 6, 18]);
        assert_eq!(asha.rungs(2), [2]);
        let random = SearchConfig {
            scheduler: Scheduler::Random,
            ..asha
        };
        assert_eq!(random.rungs(20), [20]);
    }

    #[test]
    fn the_same_seed_draws_the_same_trials_within_their_ranges() {
        let text = "trials = 50\nseed = 3\n[space]\n\"optimizer.lr\" = { log_uniform = [1e-3, 1e-1] }\n\
                    \"data.augment_shift\" = { int = [0, 2] }\n\"model.batch_norm\" = { choice = [false, true] }\n\
                    \"optimizer.weight_decay\" = { uniform = [0.0, 1e-3] }\n";
        let config = search(text);
        config.validate(10, 5000).unwrap();
        let trials = config.sample_trials();
        assert_eq!(trials, config.sample_trials());
        assert_ne!(
            trials,
            SearchConfig {
                seed: 4,
                ..config.clone()
            }
            .sample_trials()
        );
        for trial in &trials {
            let value = |key: &str| trial.iter().find(|(k, _)| k == key).unwrap().1.clone();
            let lr = value("optimizer.lr").as_float().unwrap();
            assert!((1e-3..1e-1).contains(&lr), "{lr}");
            let shift = value("data.augment_shift").as_integer().unwrap();
            assert!((0..=2).contains(&shift));
            assert!(value("model.batch_norm").is_bool());
        }
        let shifts: std::collections::HashSet<i64> = (trials.iter())
            .map(|t| {
                t.iter()
                    .find(|(k, _)| k == "data.augment_shift")
                    .unwrap()
                    .1
                    .as_integer()
                    .unwrap()
            })
            .collect();
        assert_eq!(shifts.len(), 3, "every value of the range is drawn");
    }

    #[test]
    fn bad_spaces_name_the_key() {
        let bad = |text: &str| search(text).validate(10, 5000).unwrap_err().to_string();
        assert!(
            bad("[space]\n\"optimizer.lr\" = { log_uniform = [0.0, 1.0] }\n")
                .contains("search.space.optimizer.lr")
        );
        assert!(bad("[space]\n\"x\" = { int = [3, 1] }\n").contains("low <= high"));
        assert!(bad("trials = 0\n[space]\n\"x\" = { int = [0, 1] }\n").contains("search.trials"));
        assert!(
            bad("min_epochs = 11\n[space]\n\"x\" = { int = [0, 1] }\n")
                .contains("search.min_epochs")
        );
        assert!(bad("").contains("search.space"));
        let no_validation = search("[space]\n\"x\" = { int = [0, 1] }\n").validate(10, 0);
        assert!(
            no_validation
                .unwrap_err()
                .to_string()
                .contains("validation_size")
        );
        assert!(
            toml::from_str::<SearchConfig>("metric = \"test_acc\"\n").is_err(),
            "never the test set"
        );
    }
}

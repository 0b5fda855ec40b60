//! The experiment config: one TOML file whose sections are declared beside what
//! they configure (`[data]` in [`crate::data`], `[model]` in [`crate::model`],
//! `[optimizer]`, `[schedule]` and `[train]` in [`crate::train`], `[device]` in
//! [`crate::util::device`]), with their defaults on the fields.
//!
//! Loading goes in three steps so every error can point at its source:
//! 1. the file is deserialized on its own (syntax errors, unknown keys and wrong
//!    types come back from `toml` with the line and column);
//! 2. each `--set KEY=VALUE` ([`overrides`]) is applied to the parsed table and
//!    the result is deserialized again (errors name the override);
//! 3. [`Config::validate`] checks ranges and combinations, and the error names the
//!    dotted key plus its line in the file, or the override that set it.
//!
//! [`grid`] reads a config's `[sweep]` table, [`search`] its `[search]` table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::model::ModelConfig;
use crate::train::optim::OptimizerConfig;
use crate::train::schedule::ScheduleConfig;
use crate::train::{TrainConfig, TrainSetup};
use crate::util::device::DeviceConfig;
use crate::util::fsio::FileError;

pub mod grid;
pub mod overrides;
pub mod search;
mod validate;

pub use grid::SweepAxis;
pub use overrides::{Override, parse_value};
pub use search::SearchConfig;
pub use validate::validate_name;

/// Everything a run needs, as read from a config file plus overrides.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Run name; the run directory is `<name>-<UTC time>`. Defaults to the file stem.
    pub name: String,
    /// Seeds parameter initialisation, the validation split, shuffling and dropout.
    pub seed: u64,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleConfig,
    pub train: TrainConfig,
    pub device: DeviceConfig,
    /// `[sweep]`: dotted keys (quoted or as nested tables) to lists of values;
    /// `mnist-lab sweep` runs one config per combination. Expanded runs save their
    /// config without it.
    #[serde(skip_serializing_if = "toml::Table::is_empty")]
    pub sweep: toml::Table,
    /// `[search]`: a space of settings and a schedule; `mnist-lab search`
    /// samples trials from it. Trials save their config without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<SearchConfig>,
}

/// A config that could not be read, with where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Read(#[from] FileError),
    #[error("invalid config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("invalid override --set {assignment}: {message}")]
    Override { assignment: String, message: String },
}

impl Config {
    /// Reads `path`, applies `overrides` in order and validates the result.
    pub fn load(path: &Path, overrides: &[Override]) -> Result<Config, ConfigError> {
        let text = crate::util::fsio::read_text(path)?;
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        Config::from_toml(&text, path, stem.as_deref(), overrides)
    }

    /// Parses config text (`origin` names it in errors) with overrides.
    pub fn from_toml(
        text: &str,
        origin: &Path,
        default_name: Option<&str>,
        overrides: &[Override],
    ) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: origin.to_path_buf(),
            message,
        };
        // Deserializing straight from the text keeps toml's line numbers in errors.
        let mut config: Config = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        let mut table: toml::Table = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for assignment in overrides {
            let as_error = |message: String| ConfigError::Override {
                assignment: assignment.to_string(),
                message,
            };
            overrides::set_dotted(&mut table, &assignment.key, assignment.value.clone())
                .map_err(as_error)?;
            config = table
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| as_error(e.message().trim().to_string()))?;
        }
        if config.name.is_empty() {
            config.name = default_name.unwrap_or("run").to_string();
        }
        if let Err(field) = config.validate() {
            let (key, full) = (&field.key, field.to_string());
            return Err(match overrides.iter().rev().find(|o| &o.key == key) {
                Some(assignment) => ConfigError::Override {
                    assignment: assignment.to_string(),
                    message: full,
                },
                None => match overrides::key_line(text, key) {
                    Some(line) => invalid(format!("line {line}: {full}")),
                    None => invalid(full),
                },
            });
        }
        Ok(config)
    }

    /// The config with every default filled in, as TOML: what a run saves.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.resolved()).expect("a Config always serializes to TOML")
    }

    /// The config with the learning-rate default written in.
    fn resolved(&self) -> Config {
        let mut resolved = self.clone();
        resolved.optimizer.lr = Some(self.optimizer.lr());
        resolved
    }

    /// Every field as a flat dotted key (`optimizer.lr`, `model.batch_norm`,
    /// `sweep` when the grid is empty), the learning-rate default resolved.
    pub fn flattened(&self) -> BTreeMap<String, serde_json::Value> {
        let resolved = toml::Value::try_from(self.resolved()).expect("a Config always serializes");
        let mut flat = BTreeMap::new();
        flatten("", &resolved, &mut flat);
        flat
    }

    /// What the run learns with: the [`Config::flattened`] keys but the name,
    /// the sweep grid, where the data is and the device.
    pub fn hyperparameters(&self) -> BTreeMap<String, serde_json::Value> {
        let mut flat = self.flattened();
        flat.retain(|key, _| {
            !(key == "name"
                || key == "data.dir"
                || key.starts_with("sweep")
                || key.starts_with("search")
                || key.starts_with("device."))
        });
        flat
    }

    /// The sections the trainer reads.
    pub fn train_setup(&self) -> TrainSetup {
        TrainSetup {
            model: self.model.clone(),
            optimizer: self.optimizer.clone(),
            schedule: self.schedule.clone(),
            train: self.train.clone(),
            augment: crate::data::augment::Augment {
                shift: self.data.augment_shift,
                rotate_degrees: self.data.augment_rotate,
                scale: self.data.augment_scale,
            },
            seed: self.seed,
        }
    }
}

/// Adds the leaves of `value` under `prefix` to `out` as JSON values.
fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, serde_json::Value>) {
    match value {
        toml::Value::Table(table) if !table.is_empty() => {
            for (key, value) in table {
                let dotted = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&dotted, value, out);
            }
        }
        leaf => {
            let json = serde_json::to_value(leaf).unwrap_or(serde_json::Value::Null);
            out.insert(prefix.to_string(), json);
        }
    }
}

/// The `*.toml` files directly in `dir`, sorted by name.
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = std::fs::read_dir(dir).map_err(FileError::on("read", dir))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelKind;
    use crate::util::device::DeviceSpec;

    fn parse(text: &str, overrides: &[&str]) -> Result<Config, ConfigError> {
        let overrides: Vec<Override> = overrides.iter().map(|o| o.parse().unwrap()).collect();
        Config::from_toml(text, Path::new("test.toml"), Some("test"), &overrides)
    }

    #[test]
    fn empty_file_gives_defaults_named_after_the_file() {
        let config = parse("", &[]).unwrap();
        assert_eq!(config.name, "test");
        assert_eq!(config.data.validation_size, 5000);
        assert_eq!(config.train.epochs, 20);
        assert_eq!(config.optimizer.lr(), 0.01);
        assert_eq!(config.device.kind, DeviceSpec::Auto);
    }

    #[test]
    fn unknown_key_names_the_key_and_line() {
        let err = parse("[optimizer]\nlr = 0.1\nlearning_rate = 0.1\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml"), "{err}");
        assert!(err.contains("learning_rate"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn wrong_type_names_the_line() {
        let err = parse("[train]\nepochs = \"ten\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn out_of_range_value_names_key_and_line() {
        let err = parse("seed = 1\n[optimizer]\nlr = -0.5\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("optimizer.lr"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("> 0"), "{err}");
    }

    #[test]
    fn bad_enum_value_lists_the_choices() {
        let err = parse("[model]\nkind = \"resnet\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("resnet") && err.contains("custom_mlp"),
            "{err}"
        );
        let err = parse("[device]\nkind = \"gpu\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cuda:N"), "{err}");
    }

    #[test]
    fn overrides_replace_and_add_fields() {
        let config = parse(
            "[optimizer]\nlr = 0.1\n",
            &[
                "optimizer.lr=0.05",
                "train.epochs=1",
                "model.kind=custom_mlp",
                "data.dir=/tmp/x",
            ],
        )
        .unwrap();
        assert_eq!(config.optimizer.lr, Some(0.05));
        assert_eq!(config.train.epochs, 1);
        assert_eq!(config.model.kind, ModelKind::CustomMlp);
        assert_eq!(config.data.dir, Some(PathBuf::from("/tmp/x")));
    }

    #[test]
    fn bad_override_names_the_override() {
        let err = parse("", &["train.epoch=1"]).unwrap_err().to_string();
        assert!(
            err.contains("--set train.epoch=1") && err.contains("epoch"),
            "{err}"
        );
        let err = parse("", &["train.epochs=0"]).unwrap_err().to_string();
        assert!(err.contains("--set train.epochs=0"), "{err}");
        let err = parse("", &["seed.x=1"]).unwrap_err().to_string();
        assert!(
            err.contains("seed.x") && err.contains("expected u64"),
            "{err}"
        );
        assert!("novalue".parse::<Override>().is_err());
    }

    #[test]
    fn device_specs_parse_and_print() {
        for text in ["auto", "cpu", "cuda:0", "cuda:3"] {
            assert_eq!(text.parse::<DeviceSpec>().unwrap().to_string(), text);
        }
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn resolved_config_round_trips() {
        let config = parse("[optimizer]\nkind = \"adam\"\n", &["model.dropout=0.25"]).unwrap();
        let text = config.to_toml();
        assert!(text.contains("lr = 0.001"), "{text}");
        let again = parse(&text, &[]).unwrap();
        assert_eq!(again.optimizer.lr, Some(0.001));
        assert_eq!(again.model, config.model);
    }

    #[test]
    fn early_stopping_without_validation_is_refused() {
        let err = parse(
            "[data]\nvalidation_size = 0\n[train]\nearly_stopping = 3\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("train.early_stopping") && err.contains("data.validation_size = 0"),
            "{err}"
        );
        assert!(parse("[data]\nvalidation_size = 0\n", &[]).is_ok());
    }

    #[test]
    fn lenet5_without_padding_is_refused() {
        let err = parse("[data]\npad_to_32 = false\n", &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("data.pad_to_32") && err.contains("line 2"),
            "{err}"
        );
        assert!(
            parse(
                "[data]\npad_to_32 = false\n[model]\nkind = \"custom_mlp\"\n",
                &[]
            )
            .is_ok()
        );
    }
}

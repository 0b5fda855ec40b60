//! Experiment configuration: the TOML schema, its defaults, `--set` overrides and
//! validation.
//!
//! Loading goes in three steps so every error can point at its source:
//! 1. the file is deserialized on its own (syntax errors, unknown keys and wrong
//!    types come back from `toml` with the line and column);
//! 2. each `--set KEY=VALUE` is applied to the parsed table and the result is
//!    deserialized again (errors name the override);
//! 3. [`Config::validate`] checks ranges and combinations, and the error names the
//!    dotted key plus its line in the file, or the override that set it.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

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
}

/// `[data]`: where MNIST is and how it is split and prepared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Directory with the four IDX files (`.gz` or raw). Unset: `$MNIST_DIR`, then `data/mnist`.
    pub dir: Option<PathBuf>,
    /// Images held out of the 60,000 training images for validation (seeded split).
    pub validation_size: usize,
    /// Train on only this many of the remaining training images (unset: all).
    pub train_size: Option<usize>,
    /// Evaluate on only the first this many test images (unset: all 10,000).
    pub test_size: Option<usize>,
    /// Zero-pad 28x28 images to 32x32, as in the LeNet-5 paper (LeNet5 needs it).
    pub pad_to_32: bool,
    /// Standardise pixels with MNIST's mean 0.1307 and std 0.3081 (else scale to [0, 1]).
    pub normalize: bool,
    /// Augmentation: shift each training image by a random 0..=N pixels along
    /// each axis, every epoch anew (0 = off).
    pub augment_shift: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            dir: None,
            validation_size: 5000,
            train_size: None,
            test_size: None,
            pad_to_32: true,
            normalize: true,
            augment_shift: 0,
        }
    }
}

/// `[model]`: which network and which regularising layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub kind: ModelKind,
    /// BatchNorm before every hidden activation.
    pub batch_norm: bool,
    /// Dropout probability on the hidden fully connected activations (0 = off).
    pub dropout: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::Lenet5,
            batch_norm: false,
            dropout: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    Lenet5,
    CustomMlp,
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ModelKind::Lenet5 => "lenet5",
            ModelKind::CustomMlp => "custom_mlp",
        })
    }
}

/// `[optimizer]`: SGD (with PyTorch's momentum, Nesterov and L2 semantics), Adam or AdamW.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    /// Peak learning rate. Unset: 0.01 for SGD, 0.001 for Adam and AdamW.
    pub lr: Option<f64>,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD Nesterov momentum (needs momentum > 0).
    pub nesterov: bool,
    /// SGD and Adam: L2 penalty added to the gradient. AdamW: decoupled decay.
    pub weight_decay: f64,
    /// Adam/AdamW first-moment decay.
    pub beta1: f64,
    /// Adam/AdamW second-moment decay.
    pub beta2: f64,
    /// Adam/AdamW denominator epsilon.
    pub eps: f64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Sgd,
            lr: None,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl OptimizerConfig {
    /// The learning rate, with the kind's default where the config has none.
    pub fn lr(&self) -> f64 {
        self.lr.unwrap_or(match self.kind {
            OptimizerKind::Sgd => 0.01,
            OptimizerKind::Adam | OptimizerKind::Adamw => 0.001,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Sgd,
    Adam,
    Adamw,
}

/// `[schedule]`: how the learning rate moves over the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    /// `step`: multiply the rate by `gamma` every `step_size` epochs.
    pub step_size: usize,
    pub gamma: f64,
    /// `cosine`: the rate the cosine decays to at the end of the run.
    pub min_lr: f64,
    /// Linear warm-up from 0 over this many epochs (fractions allowed), any kind.
    pub warmup_epochs: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Constant,
            step_size: 10,
            gamma: 0.1,
            min_lr: 0.0,
            warmup_epochs: 0.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    Step,
    Cosine,
}

/// `[train]`: the loop itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Batch size for validation and test evaluation (no gradients, so larger).
    pub eval_batch_size: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 20,
            batch_size: 64,
            eval_batch_size: 1000,
        }
    }
}

/// `[device]`: where the tensors live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceConfig {
    /// `auto` (CUDA when built with it and a GPU is present, else CPU), `cpu`, `cuda`, `cuda:N`.
    pub kind: DeviceSpec,
    /// CPU threads (0 = one per core).
    pub threads: usize,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            kind: DeviceSpec::Auto,
            threads: 0,
        }
    }
}

/// A device request as written in a config: `auto`, `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let expected =
            || format!("expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got {text:?}");
        match text {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => {
                let ordinal = text.strip_prefix("cuda:").ok_or_else(expected)?;
                ordinal
                    .parse()
                    .map(DeviceSpec::Cuda)
                    .map_err(|_| expected())
            }
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl Serialize for DeviceSpec {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DeviceSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A config that could not be read, with where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("invalid override --set {assignment}: {message}")]
    Override { assignment: String, message: String },
}

/// One axis of a sweep grid: a dotted key and the values it takes.
pub type SweepAxis = (String, Vec<toml::Value>);

/// One `--set KEY=VALUE` override.
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// Dotted key, e.g. `optimizer.lr`.
    pub key: String,
    pub value: toml::Value,
}

impl std::str::FromStr for Override {
    type Err = String;

    /// Parses `KEY=VALUE`. VALUE is read as a TOML value (`0.05`, `true`, `"x"`,
    /// `[1, 2]`); a bare word that is not one, such as a path, is taken as a string.
    fn from_str(assignment: &str) -> Result<Self, String> {
        let (key, value) = assignment
            .split_once('=')
            .ok_or_else(|| format!("expected KEY=VALUE, got {assignment:?}"))?;
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(format!(
                "expected a dotted key such as optimizer.lr, got {key:?}"
            ));
        }
        Ok(Override {
            key: key.to_string(),
            value: parse_value(value),
        })
    }
}

/// Reads `text` as a TOML value (`0.05`, `true`, `"x"`, `[1, 2]`); a bare word that
/// is not one, such as a path, is taken as a string.
pub fn parse_value(text: &str) -> toml::Value {
    let text = text.trim();
    toml::from_str::<toml::Table>(&format!("value = {text}"))
        .ok()
        .and_then(|mut table| table.remove("value"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

impl fmt::Display for Override {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

impl Config {
    /// Reads `path`, applies `overrides` in order and validates the result.
    pub fn load(path: &Path, overrides: &[Override]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
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
            set_dotted(&mut table, &assignment.key, assignment.value.clone()).map_err(as_error)?;
            config = table
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| as_error(e.message().trim().to_string()))?;
        }
        if config.name.is_empty() {
            config.name = default_name.unwrap_or("run").to_string();
        }
        if let Err((key, message)) = config.validate() {
            let full = format!("{key}: {message}");
            return Err(match overrides.iter().rev().find(|o| o.key == key) {
                Some(assignment) => ConfigError::Override {
                    assignment: assignment.to_string(),
                    message: full,
                },
                None => match key_line(text, &key) {
                    Some(line) => invalid(format!("line {line}: {full}")),
                    None => invalid(full),
                },
            });
        }
        Ok(config)
    }

    /// Range and consistency checks; the error is `(dotted key, what was expected)`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let fail = |key: &str, message: String| Err((key.to_string(), message));
        if !is_valid_name(&self.name) {
            return fail(
                "name",
                format!(
                    "expected letters, digits, '-', '_' or '.', got {:?}",
                    self.name
                ),
            );
        }
        self.sweep_axes()?;
        let data = &self.data;
        if data.validation_size == 0 {
            return fail(
                "data.validation_size",
                "expected at least 1 image: validation picks the checkpoint, never the test set"
                    .into(),
            );
        }
        if data.validation_size >= 60_000 {
            return fail(
                "data.validation_size",
                format!(
                    "expected fewer than the 60000 training images, got {}",
                    data.validation_size
                ),
            );
        }
        if data.augment_shift > 4 {
            return fail(
                "data.augment_shift",
                format!("expected 0 to 4 pixels, got {}", data.augment_shift),
            );
        }
        if data.train_size == Some(0) {
            return fail("data.train_size", "expected at least 1 image".into());
        }
        if data.test_size == Some(0) {
            return fail("data.test_size", "expected at least 1 image".into());
        }
        if self.model.kind == ModelKind::Lenet5 && !data.pad_to_32 {
            return fail(
                "data.pad_to_32",
                "lenet5 needs 32x32 inputs (its third convolution leaves 1x1); set it to true"
                    .into(),
            );
        }
        if !(0.0..1.0).contains(&self.model.dropout) {
            return fail(
                "model.dropout",
                format!(
                    "expected a probability in [0, 1), got {}",
                    self.model.dropout
                ),
            );
        }
        let opt = &self.optimizer;
        if let Some(lr) = opt.lr
            && !(lr > 0.0 && lr.is_finite())
        {
            return fail("optimizer.lr", format!("expected a number > 0, got {lr}"));
        }
        if !(0.0..1.0).contains(&opt.momentum) {
            return fail(
                "optimizer.momentum",
                format!("expected a number in [0, 1), got {}", opt.momentum),
            );
        }
        if opt.nesterov && opt.momentum == 0.0 {
            return fail(
                "optimizer.nesterov",
                "Nesterov momentum needs optimizer.momentum > 0".into(),
            );
        }
        if !(opt.weight_decay >= 0.0 && opt.weight_decay.is_finite()) {
            return fail(
                "optimizer.weight_decay",
                format!("expected a number >= 0, got {}", opt.weight_decay),
            );
        }
        for (key, beta) in [
            ("optimizer.beta1", opt.beta1),
            ("optimizer.beta2", opt.beta2),
        ] {
            if !(0.0..1.0).contains(&beta) {
                return fail(key, format!("expected a number in [0, 1), got {beta}"));
            }
        }
        if opt.eps.is_nan() || opt.eps <= 0.0 {
            return fail(
                "optimizer.eps",
                format!("expected a number > 0, got {}", opt.eps),
            );
        }
        let schedule = &self.schedule;
        if schedule.step_size == 0 {
            return fail("schedule.step_size", "expected at least 1 epoch".into());
        }
        if !(schedule.gamma > 0.0 && schedule.gamma <= 1.0) {
            return fail(
                "schedule.gamma",
                format!("expected a number in (0, 1], got {}", schedule.gamma),
            );
        }
        if !(schedule.min_lr >= 0.0 && schedule.min_lr <= opt.lr()) {
            return fail(
                "schedule.min_lr",
                format!(
                    "expected a number between 0 and optimizer.lr ({}), got {}",
                    opt.lr(),
                    schedule.min_lr
                ),
            );
        }
        if !(schedule.warmup_epochs >= 0.0 && schedule.warmup_epochs <= self.train.epochs as f64) {
            return fail(
                "schedule.warmup_epochs",
                format!(
                    "expected a number between 0 and train.epochs ({}), got {}",
                    self.train.epochs, schedule.warmup_epochs
                ),
            );
        }
        let train = &self.train;
        for (key, value) in [
            ("train.epochs", train.epochs),
            ("train.batch_size", train.batch_size),
            ("train.eval_batch_size", train.eval_batch_size),
        ] {
            if value == 0 {
                return fail(key, "expected at least 1".into());
            }
        }
        Ok(())
    }

    /// The `[sweep]` grid as `(dotted key, values)` in key order; nested tables
    /// (`optimizer.lr = [...]` written unquoted) are flattened into dotted keys.
    pub fn sweep_axes(&self) -> Result<Vec<SweepAxis>, (String, String)> {
        let mut axes = Vec::new();
        flatten_axes(&self.sweep, "", &mut axes)?;
        Ok(axes)
    }

    /// The config with every default filled in, as TOML: what a run saves.
    pub fn to_toml(&self) -> String {
        let mut resolved = self.clone();
        resolved.optimizer.lr = Some(self.optimizer.lr());
        toml::to_string_pretty(&resolved).expect("a Config always serializes to TOML")
    }
}

fn flatten_axes(
    table: &toml::Table,
    prefix: &str,
    axes: &mut Vec<SweepAxis>,
) -> Result<(), (String, String)> {
    for (key, value) in table {
        let dotted = format!("{prefix}{key}");
        let fail = |message: &str| Err((format!("sweep.{dotted}"), message.to_string()));
        match value {
            toml::Value::Table(inner) => flatten_axes(inner, &format!("{dotted}."), axes)?,
            toml::Value::Array(values) if values.is_empty() => {
                return fail("expected at least one value");
            }
            toml::Value::Array(values) => {
                if dotted == "name" || dotted.starts_with("sweep.") {
                    return fail("cannot be swept: each run is named after the values it varies");
                }
                axes.push((dotted, values.clone()));
            }
            _ => return fail("expected a list of values, e.g. [0.01, 0.1]"),
        }
    }
    Ok(())
}

/// The `*.toml` files directly in `dir`, sorted by name.
pub fn config_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ConfigError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|ext| ext == "toml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Names become directory names: keep them to a portable character set.
fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Sets `table[a][b]... = value` for the dotted key `a.b...`, creating tables on the way.
fn set_dotted(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().expect("split yields at least one part");
    let mut current = table;
    for (depth, part) in parts.iter().enumerate() {
        let entry = current
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{}` is a value, not a table", parts[..=depth].join(".")))?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// The 1-based line where the dotted `key` is written in `text`, if it is.
fn key_line(text: &str, key: &str) -> Option<usize> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        let (name, value) = table.get_key_value(part)?;
        if parts.peek().is_none() {
            let offset = name.span().start;
            return Some(text[..offset].matches('\n').count() + 1);
        }
        table = value.get_ref().as_table()?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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

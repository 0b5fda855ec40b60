//! Validation of a whole config: each section's own range checks, then the
//! rules that tie sections together.

use crate::config::Config;
use crate::util::invalid::{InvalidField, invalid};

impl Config {
    /// Range and consistency checks; the error names the dotted key.
    pub fn validate(&self) -> Result<(), InvalidField> {
        if let Err(message) = validate_name(&self.name) {
            return invalid("name", message);
        }
        self.sweep_axes()?;
        if let Some(search) = &self.search {
            search.validate(self.train.epochs, self.data.validation_size)?;
            if self.train.early_stopping > 0 {
                return invalid(
                    "train.early_stopping",
                    "expected 0 (off) with a [search]: the search decides when trials stop",
                );
            }
            if !self.sweep.is_empty() {
                return invalid("search", "a config searches or sweeps, not both");
            }
        }
        self.data.validate()?;
        self.model.validate()?;
        self.optimizer.validate()?;
        self.schedule
            .validate(self.optimizer.lr(), self.train.epochs)?;
        self.train.validate()?;
        self.device.validate()?;
        let kind = self.model.kind;
        if let Some(side) = kind.input_side()
            && side != self.data.input_side()
        {
            return invalid(
                "data.pad_to_32",
                format!(
                    "{kind} needs {side}x{side} inputs, and pad_to_32 = {} gives {}x{}",
                    self.data.pad_to_32,
                    self.data.input_side(),
                    self.data.input_side()
                ),
            );
        }
        if self.train.early_stopping > 0 && self.data.validation_size == 0 {
            return invalid(
                "train.early_stopping",
                "expected 0 (off) with data.validation_size = 0: early stopping watches the \
                 validation accuracy, and no images are held out to measure it",
            );
        }
        Ok(())
    }
}

/// Names become directory names (a run's, a sweep's record folder): keep them
/// to a portable character set, with no path separators and no leading dot.
pub fn validate_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    match valid {
        true => Ok(()),
        false => Err(format!(
            "expected letters, digits, '-', '_' or '.' (not starting with '.'), got {name:?}"
        )),
    }
}

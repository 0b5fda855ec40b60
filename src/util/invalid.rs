//! The error of a config value out of range, shared by every section's checks.

/// A config field whose value is not allowed: its dotted key and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct InvalidField {
    /// Dotted key, e.g. `optimizer.lr`.
    pub key: String,
    pub message: String,
}

/// `Err(InvalidField)` for `key`, for a section's `validate`.
pub fn invalid(key: &str, message: impl Into<String>) -> Result<(), InvalidField> {
    Err(InvalidField {
        key: key.to_string(),
        message: message.into(),
    })
}

/// Checks that `value` lies in `[low, high)`.
pub fn in_range(key: &str, value: f64, low: f64, high: f64) -> Result<(), InvalidField> {
    if value >= low && value < high {
        return Ok(());
    }
    invalid(
        key,
        format!("expected a number in [{low}, {high}), got {value}"),
    )
}

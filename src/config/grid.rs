//! A config's `[sweep]` table read as grid axes: dotted keys to lists of values.

use crate::config::Config;
use crate::util::invalid::{InvalidField, invalid};

/// One axis of a sweep grid: a dotted key and the values it takes.
pub type SweepAxis = (String, Vec<toml::Value>);

impl Config {
    /// The `[sweep]` grid as `(dotted key, values)` in key order; nested tables
    /// (`optimizer.lr = [...]` written unquoted) are flattened into dotted keys.
    pub fn sweep_axes(&self) -> Result<Vec<SweepAxis>, InvalidField> {
        let mut axes = Vec::new();
        flatten_axes(&self.sweep, "", &mut axes)?;
        Ok(axes)
    }
}

fn flatten_axes(
    table: &toml::Table,
    prefix: &str,
    axes: &mut Vec<SweepAxis>,
) -> Result<(), InvalidField> {
    for (key, value) in table {
        let dotted = format!("{prefix}{key}");
        let fail = |message: &str| invalid(&format!("sweep.{dotted}"), message);
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

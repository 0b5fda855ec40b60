//! `--set KEY=VALUE` overrides: parsing them and applying them to a parsed config
//! table, and finding the line a key is written on for error messages.

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

impl std::fmt::Display for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

/// Sets `table[a][b]... = value` for the dotted key `a.b...`, creating tables on the way.
pub(crate) fn set_dotted(
    table: &mut toml::Table,
    key: &str,
    value: toml::Value,
) -> Result<(), String> {
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
pub(crate) fn key_line(text: &str, key: &str) -> Option<usize> {
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

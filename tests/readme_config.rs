//! The README's config table states every key's default: this keeps it true.

use std::collections::BTreeMap;

use mnist_lab::config::Config;

/// The table's rows as (dotted key, default cell), a row naming several keys of
/// one section (`schedule.step_size`, `gamma`) giving one entry per key.
fn readme_rows() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md is readable");
    let table = readme
        .split("| key | default | meaning |")
        .nth(1)
        .expect("the README has the config table");
    let mut rows = Vec::new();
    for line in table.lines().skip(2).take_while(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let (keys, default) = (backticked(cells[1]), cells[2].to_string());
        let section = keys[0].rsplit_once('.').map(|(s, _)| s.to_string());
        let defaults = backticked(&default);
        for (i, key) in keys.iter().enumerate() {
            let dotted = match (&section, key.contains('.')) {
                (Some(section), false) => format!("{section}.{key}"),
                _ => key.clone(),
            };
            let cell = if defaults.len() == keys.len() {
                format!("`{}`", defaults[i])
            } else {
                default.clone()
            };
            rows.push((dotted, cell));
        }
    }
    rows
}

fn backticked(cell: &str) -> Vec<String> {
    cell.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

/// Every leaf of the default config as a dotted key and its value.
fn default_leaves() -> BTreeMap<String, toml::Value> {
    Config::default()
        .flattened()
        .into_iter()
        .map(|(key, value)| {
            (
                key,
                toml::Value::try_from(value).expect("a JSON leaf is TOML"),
            )
        })
        .collect()
}

#[test]
fn every_default_in_the_readme_table_is_the_code_default() {
    let leaves = default_leaves();
    let rows = readme_rows();
    assert!(rows.len() > 20, "the table was found: {rows:?}");
    for (key, cell) in &rows {
        let stated = backticked(cell);
        if stated.len() != 1 || key == "[sweep]" {
            continue; // a default in words ("file stem", "all"), checked by hand
        }
        let stated: toml::Value = toml::from_str::<toml::Table>(&format!("v = {}", stated[0]))
            .unwrap_or_else(|e| panic!("README default of {key} is not TOML: {e}"))["v"]
            .clone();
        let actual = leaves
            .get(key)
            .unwrap_or_else(|| panic!("README lists {key}, which the config does not have"));
        assert_eq!(&stated, actual, "README default of {key}");
    }
}

#[test]
fn every_config_key_is_in_the_readme_table() {
    let listed: Vec<String> = readme_rows().into_iter().map(|(key, _)| key).collect();
    for key in default_leaves().keys() {
        let key = if key.starts_with("sweep") {
            "[sweep]"
        } else {
            key
        };
        assert!(
            listed.iter().any(|l| l == key),
            "README's table lacks {key}"
        );
    }
}

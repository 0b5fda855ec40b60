//! Sweeps: many runs from config files, directories of them, `[sweep]` grids and
//! comma lists in `--set`, run one after another (or a shard of them per machine),
//! with a `sweep.json` record of what ran where.
//!
//! Planning is separate from running: every run of a sweep is expanded and its
//! config validated before the first one trains, so a typo in the last config
//! shows up at once, not hours later.

use std::path::{Path, PathBuf};

use crate::config::{self, Config, ConfigError, Override, SweepAxis};
use crate::util::fsio::{FileError, read_text};
use crate::util::table::Table;

mod continuation;
mod record;
mod values;

pub use continuation::SweepRequest;
pub use record::{
    RECORD_FILE, SweepEntry, SweepRecord, SweepTally, create_folder, create_record_dir, execute,
};
pub use values::{Shard, SweepSet};

/// Sources that cannot be read as a sweep.
#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{} holds no .toml configs", .0.display())]
    NoConfigs(PathBuf),
    #[error("{} is not a sweep record (sweep.json): {reason}", path.display())]
    NotARecord { path: PathBuf, reason: String },
    #[error(
        "{} records another sweep: {what} (give a new --resume folder, or `--rerun` with \
         its sweep.json to start afresh from it)",
        dir.display()
    )]
    OtherSweep { dir: PathBuf, what: String },
    #[error("{}: run {entry} records the directory {}, but {reason}", record.display(), dir.display())]
    WrongRunDir {
        record: PathBuf,
        entry: String,
        dir: PathBuf,
        reason: String,
    },
}

impl SweepError {
    /// A command line that asks for what cannot be (exit status 2).
    pub fn is_usage(&self) -> bool {
        matches!(self, SweepError::OtherSweep { .. } | SweepError::Config(_))
    }
}

/// Config text to expand: a file, or a run recorded in a `sweep.json`.
#[derive(Debug, Clone)]
pub struct Source {
    /// Named in errors and in the plan.
    pub origin: PathBuf,
    pub text: String,
    /// The run name when the config sets none (a file's stem).
    pub default_name: Option<String>,
}

/// Reads the sources named on the command line: config files, directories (every
/// `*.toml` in them, sorted), and `sweep.json` records (their runs' saved configs).
pub fn read_sources(paths: &[PathBuf]) -> Result<Vec<Source>, SweepError> {
    let mut sources = Vec::new();
    for path in paths {
        if path.is_dir() {
            let files = config::config_files(path)?;
            if files.is_empty() {
                return Err(SweepError::NoConfigs(path.clone()));
            }
            for file in files {
                sources.push(read_config_file(&file)?);
            }
        } else if path.extension().is_some_and(|ext| ext == "json") {
            let record = SweepRecord::read(path)?;
            for entry in record.runs {
                sources.push(Source {
                    origin: PathBuf::from(format!("{} (run {})", path.display(), entry.name)),
                    text: entry.config,
                    default_name: None,
                });
            }
        } else {
            sources.push(read_config_file(path)?);
        }
    }
    Ok(sources)
}

fn read_config_file(path: &Path) -> Result<Source, SweepError> {
    let text = read_text(path)?;
    Ok(Source {
        origin: path.to_path_buf(),
        text,
        default_name: path.file_stem().map(|s| s.to_string_lossy().into_owned()),
    })
}

/// One run of an expanded sweep.
#[derive(Debug, Clone)]
pub struct PlannedRun {
    /// Position in the whole expanded list (before sharding).
    pub index: usize,
    pub source: PathBuf,
    /// The grid values this run takes, `(dotted key, value)`.
    pub varied: Vec<(String, toml::Value)>,
    /// The resolved config, named after `varied`, without its `[sweep]` table.
    pub config: Config,
}

/// Expands every source by its `[sweep]` grid and the comma lists in `sets`;
/// single-valued `sets` apply to every run and fix that key where a grid varies it.
pub fn plan(sources: &[Source], sets: &[SweepSet]) -> Result<Vec<PlannedRun>, ConfigError> {
    // A key set twice takes its last value, as with `mnist-lab run`.
    let sets: Vec<&SweepSet> = sets
        .iter()
        .enumerate()
        .filter(|(i, s)| !sets[i + 1..].iter().any(|later| later.key == s.key))
        .map(|(_, s)| s)
        .collect();
    let fixed: Vec<Override> = sets
        .iter()
        .filter(|s| s.values.len() == 1)
        .map(|s| Override {
            key: s.key.clone(),
            value: s.values[0].clone(),
        })
        .collect();
    let command_line_axes: Vec<SweepAxis> = sets
        .iter()
        .filter(|s| s.values.len() > 1)
        .map(|s| (s.key.clone(), s.values.clone()))
        .collect();
    let mut runs = Vec::new();
    for source in sources {
        let base = load(source, &fixed)?;
        if base.search.is_some() {
            return Err(ConfigError::Invalid {
                path: source.origin.clone(),
                message: "it has a [search] table: run it with `mnist-lab search`".into(),
            });
        }
        let mut axes: Vec<SweepAxis> = base
            .sweep_axes()
            .expect("validated when loaded")
            .into_iter()
            .filter(|(key, _)| !sets.iter().any(|s| &s.key == key))
            .collect();
        let from_file = axes.len();
        axes.extend(command_line_axes.iter().cloned());
        for varied in combinations(&axes) {
            let mut overrides = fixed.clone();
            overrides.extend(varied.iter().map(|(key, value)| Override {
                key: key.clone(),
                value: value.clone(),
            }));
            let mut config = load(source, &overrides)
                .map_err(|e| blame_grid(e, source, &varied[..from_file.min(varied.len())]))?;
            config.sweep.clear();
            if !varied.is_empty() {
                config.name = run_name(&base.name, &varied);
            }
            runs.push(PlannedRun {
                index: runs.len(),
                source: source.origin.clone(),
                varied,
                config,
            });
        }
    }
    Ok(runs)
}

fn load(source: &Source, overrides: &[Override]) -> Result<Config, ConfigError> {
    Config::from_toml(
        &source.text,
        &source.origin,
        source.default_name.as_deref(),
        overrides,
    )
}

/// An error from a value the file's `[sweep]` table supplied names that table,
/// not a `--set` the user never typed.
fn blame_grid(error: ConfigError, source: &Source, grid: &[(String, toml::Value)]) -> ConfigError {
    match error {
        ConfigError::Override {
            assignment,
            message,
        } if grid.iter().any(|(k, v)| assignment == format!("{k}={v}")) => ConfigError::Invalid {
            path: source.origin.clone(),
            message: format!("[sweep] {assignment}: {message}"),
        },
        other => other,
    }
}

/// Every combination of the axes' values; the last axis varies fastest.
fn combinations(axes: &[SweepAxis]) -> Vec<Vec<(String, toml::Value)>> {
    axes.iter().fold(vec![Vec::new()], |done, (key, values)| {
        done.into_iter()
            .flat_map(|prefix| {
                values.iter().map(move |value| {
                    let mut combination = prefix.clone();
                    combination.push((key.clone(), value.clone()));
                    combination
                })
            })
            .collect()
    })
}

/// `lenet5-weight_decay_0.0005-batch_norm_true`: the base name, then each varied
/// key's last part (the whole key where two share one) and its value.
pub fn run_name(base: &str, varied: &[(String, toml::Value)]) -> String {
    let last = |key: &str| key.rsplit('.').next().unwrap_or(key).to_string();
    let mut name = base.to_string();
    for (key, value) in varied {
        let shared = varied
            .iter()
            .filter(|(other, _)| last(other) == last(key))
            .count()
            > 1;
        let label = if shared { key.clone() } else { last(key) };
        let value = match value {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        name += &format!("-{label}_{value}");
    }
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The plan as a table, for `--list`: which shard each run falls to.
pub fn plan_table(runs: &[PlannedRun], shards: usize) -> Table {
    let mut table = Table::new(&["#", "shard", "run", "source", "varied"]);
    for run in runs {
        let varied: Vec<String> = run.varied.iter().map(|(k, v)| format!("{k}={v}")).collect();
        table.push(vec![
            run.index.to_string(),
            format!("{}/{shards}", run.index % shards),
            run.config.name.clone(),
            run.source.display().to_string(),
            varied.join(" "),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &str) -> Source {
        Source {
            origin: PathBuf::from("grid.toml"),
            text: text.into(),
            default_name: Some("grid".into()),
        }
    }

    fn sets(items: &[&str]) -> Vec<SweepSet> {
        items.iter().map(|s| s.parse().unwrap()).collect()
    }

    const GRID: &str = "[sweep]\n\"optimizer.weight_decay\" = [0.0, 1e-4, 5e-4]\n\
                        \"model.batch_norm\" = [false, true]\n";

    #[test]
    fn grid_expands_to_every_combination_named_by_its_values() {
        let runs = plan(&[source(GRID)], &[]).unwrap();
        assert_eq!(runs.len(), 6);
        let names: Vec<&str> = runs.iter().map(|r| r.config.name.as_str()).collect();
        assert_eq!(names[0], "grid-batch_norm_false-weight_decay_0.0");
        assert_eq!(names[5], "grid-batch_norm_true-weight_decay_0.0005");
        let unique: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(unique.len(), 6);
        assert!(runs[5].config.model.batch_norm);
        assert_eq!(runs[5].config.optimizer.weight_decay, 5e-4);
        assert!(runs.iter().all(|r| r.config.sweep.is_empty()));
        assert!(!runs[0].config.to_toml().contains("sweep"));
        assert_eq!(
            runs.iter().map(|r| r.index).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4, 5]
        );
    }

    #[test]
    fn unquoted_dotted_keys_are_axes_too() {
        let runs = plan(&[source("[sweep]\noptimizer.lr = [0.1, 0.2]\n")], &[]).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[1].config.optimizer.lr, Some(0.2));
        assert_eq!(runs[1].config.name, "grid-lr_0.2");
    }

    #[test]
    fn comma_lists_on_the_command_line_multiply_the_grid() {
        let runs = plan(
            &[source(GRID)],
            &sets(&["optimizer.lr=0.01,0.05", "train.epochs=2"]),
        )
        .unwrap();
        assert_eq!(runs.len(), 12);
        assert!(runs.iter().all(|r| r.config.train.epochs == 2));
        assert!(
            runs[1].config.name.ends_with("-lr_0.05"),
            "{}",
            runs[1].config.name
        );
    }

    #[test]
    fn a_key_set_twice_takes_its_last_value() {
        let runs = plan(
            &[source(GRID)],
            &sets(&["optimizer.lr=0.01,0.05", "optimizer.lr=0.1"]),
        )
        .unwrap();
        assert_eq!(runs.len(), 6);
        assert!(runs.iter().all(|r| r.config.optimizer.lr == Some(0.1)));
    }

    #[test]
    fn a_single_value_fixes_a_grid_key() {
        let runs = plan(&[source(GRID)], &sets(&["model.batch_norm=true"])).unwrap();
        assert_eq!(runs.len(), 3);
        assert!(runs.iter().all(|r| r.config.model.batch_norm));
    }

    #[test]
    fn a_config_without_grid_is_one_run_with_its_own_name() {
        let runs = plan(&[source("name = \"plain\"\n")], &[]).unwrap();
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].config.name, "plain");
    }

    #[test]
    fn bad_grid_values_name_the_file_and_the_sweep_table() {
        let err = plan(&[source("[sweep]\n\"optimizer.lr\" = [0.1, -1.0]\n")], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("grid.toml"), "{err}");
        assert!(err.contains("[sweep] optimizer.lr=-1.0"), "{err}");
        let err = plan(&[source("[sweep]\n\"optimizer.lr\" = 0.1\n")], &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sweep.optimizer.lr") && err.contains("list"),
            "{err}"
        );
        let err = plan(&[source("[sweep]\n\"optimizer.lrr\" = [0.1]\n")], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("lrr"), "{err}");
    }

    #[test]
    fn names_fall_back_to_whole_keys_and_stay_portable() {
        let varied = vec![
            ("a.lr".to_string(), toml::Value::Float(0.1)),
            ("b.lr".to_string(), toml::Value::String("x/y".into())),
        ];
        assert_eq!(run_name("base", &varied), "base-a.lr_0.1-b.lr_x_y");
    }
}

//! `search`: trials sampled from a config's `[search]` space, scheduled at
//! random or by successive halving, continued where a stopped search left off.

use std::path::PathBuf;

use clap::Args;

use crate::cli::UsageError;
use crate::config::{Config, Override};
use crate::run::owner::{self, OwnerLock};
use crate::run::search::{self, SearchPlan, SearchRecord};
use crate::run::sweep::Shard;
use crate::util::fsio::{FileError, read_text};
use crate::util::{device, interrupt};

#[derive(Args)]
pub(super) struct SearchArgs {
    /// The config to search around, with a `[search]` table (or --space).
    #[arg(value_name = "CONFIG", required_unless_present = "resume")]
    config: Option<PathBuf>,
    /// A TOML file holding the `[search]` table (it replaces the config's).
    #[arg(long, value_name = "FILE")]
    space: Option<PathBuf>,
    /// Override a field of every trial: `--set train.epochs=9`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<Override>,
    /// Where the search's folder is created.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    runs_dir: PathBuf,
    /// Continue the search recorded in DIR; a DIR with no record yet starts
    /// the search there, so a requeued job gives the same DIR every time.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Run only the trials whose index is I modulo N, as a bracket of their own.
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
    /// Print the sampled trials and the rungs without training.
    #[arg(long)]
    list: bool,
    /// CPU threads (default: the config's device.threads).
    #[arg(long, value_name = "N", value_parser = device::parse_threads)]
    threads: Option<usize>,
}

impl SearchArgs {
    pub(super) fn execute(self) -> anyhow::Result<()> {
        let recorded = (self.resume.as_deref())
            .map(|dir| dir.join(search::RECORD_FILE))
            .filter(|path| path.is_file());
        let (text, origin) = match &recorded {
            Some(path) => (SearchRecord::read(path)?.config, path.clone()),
            None => (self.config_text()?, self.config.clone().unwrap_or_default()),
        };
        let config = Config::from_toml(&text, &origin, None, &[])?;
        let plan = search::plan(&config, &text, &origin)?;
        if self.list {
            print_plan(&plan, self.shard);
            return Ok(());
        }
        if recorded.is_some() && self.config.is_some() && self.config_text()? != text {
            return Err(UsageError(format!(
                "{} records another search: the config and --set given now resolve to \
                 other settings (give a new --resume folder)",
                origin.display()
            ))
            .into());
        }
        device::set_cpu_threads(self.threads.unwrap_or(config.device.threads));
        let (dir, _owner) = self.claim_folder(&config.name)?;
        // Read again under the lock: another process may have written it.
        let mut record = match SearchRecord::read(&dir.join(search::RECORD_FILE)) {
            Ok(record) => record,
            Err(_) => search::new_record(&plan, &text, self.shard),
        };
        if let Some(shard) = self.shard
            && record.shard.as_deref() != Some(&shard.to_string())
        {
            return Err(UsageError(format!(
                "{} records shard {}, not {shard}",
                dir.display(),
                record.shard.as_deref().unwrap_or("none")
            ))
            .into());
        }
        eprintln!(
            "search {}: {} trials, rungs at {:?} epochs; record {}",
            plan.name,
            record.trials.len(),
            plan.rungs,
            dir.join(search::RECORD_FILE).display()
        );
        let tally = search::execute(&plan, &mut record, &dir)?;
        print!("{}", record.table().to_text());
        search::write_readable(&record, &dir)?;
        if interrupt::stop_requested().is_some() {
            anyhow::bail!(
                "search interrupted; `mnist-lab search --resume {}` continues it",
                dir.display()
            );
        }
        print!("{}", record.overview());
        println!(
            "record: {}; table and figure: {}, {}",
            dir.join(search::RECORD_FILE).display(),
            dir.join(search::TABLE_FILE).display(),
            dir.join(search::figure::FIGURE_FILE).display()
        );
        if tally.failed > 0 {
            anyhow::bail!(
                "{} trials failed (errors in {})",
                tally.failed,
                dir.display()
            );
        }
        Ok(())
    }

    /// The config as resolved with --space and --set, `[search]` included: what
    /// the record keeps and the trials are drawn from.
    fn config_text(&self) -> anyhow::Result<String> {
        let path = self
            .config
            .as_deref()
            .ok_or_else(|| UsageError("no CONFIG given".into()))?;
        let mut table: toml::Table =
            toml::from_str(&read_text(path)?).map_err(|e| crate::config::ConfigError::Invalid {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        if let Some(space) = &self.space {
            let mut given: toml::Table = toml::from_str(&read_text(space)?).map_err(|e| {
                crate::config::ConfigError::Invalid {
                    path: space.clone(),
                    message: e.to_string(),
                }
            })?;
            let search = given.remove("search").unwrap_or(toml::Value::Table(given));
            table.insert("search".into(), search);
        }
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        let text = toml::to_string(&table).expect("a TOML table serialises");
        Ok(Config::from_toml(&text, path, stem.as_deref(), &self.set)?.to_toml())
    }

    /// The search's folder, locked: `--resume DIR` (created if need be), else
    /// a new folder under the runs directory.
    fn claim_folder(&self, name: &str) -> anyhow::Result<(PathBuf, OwnerLock)> {
        let dir = match &self.resume {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(FileError::on("create", dir))?;
                dir.clone()
            }
            None => search::create_dir(&self.runs_dir, name, self.shard)?,
        };
        let owner = owner::claim(&dir, false)?;
        Ok((dir, owner))
    }
}

/// The sampled trials (this shard's marked) and the rungs.
fn print_plan(plan: &SearchPlan, shard: Option<Shard>) {
    println!(
        "rungs at {:?} epochs; {} trials",
        plan.rungs,
        plan.trials.len()
    );
    for trial in &plan.trials {
        let values: Vec<String> = (trial.values.iter())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mine = shard.is_none_or(|s| s.owns(trial.index));
        println!(
            "{}{}  {}",
            trial.config.name,
            if mine { "" } else { " (other shard)" },
            values.join(" ")
        );
    }
}

//! `sweep`: many runs from config files, grids and comma lists, continued where
//! a stopped sweep left off.

use std::path::{Path, PathBuf};

use clap::Args;

use crate::cli::UsageError;
use crate::config;
use crate::run::owner::{self, OwnerLock};
use crate::run::sweep::{self, PlannedRun, Shard, SweepRecord, SweepRequest, SweepSet};
use crate::util::fsio::FileError;
use crate::util::{device, interrupt};

#[derive(Args)]
pub(super) struct SweepArgs {
    /// Config files, directories of them, or a sweep.json to continue (default: configs/).
    #[arg(value_name = "CONFIG|DIR")]
    paths: Vec<PathBuf>,
    /// Override for every run; a comma list sweeps: `--set optimizer.lr=0.01,0.05,0.1`.
    #[arg(long = "set", value_name = "KEY=VALUE[,VALUE...]")]
    set: Vec<SweepSet>,
    /// Where run directories and the sweep's record are created (default: runs/,
    /// or beside the record a sweep continues).
    #[arg(long, value_name = "DIR")]
    runs_dir: Option<PathBuf>,
    /// CPU threads for every run (default: the first run's device.threads).
    #[arg(long, value_name = "N", value_parser = device::parse_threads)]
    threads: Option<usize>,
    /// Run only the I-th of N disjoint slices of the runs (I from 0): one per machine.
    #[arg(long, value_name = "I/N")]
    shard: Option<Shard>,
    /// Print the expanded runs (and their shards) without running them.
    #[arg(long)]
    list: bool,
    /// Name of the sweep's record folder (default: the config's or folder's name).
    #[arg(long)]
    name: Option<String>,
    /// Continue the sweep recorded in DIR: skip completed runs, resume stopped
    /// ones, run pending ones. A DIR with no record yet starts the sweep there,
    /// so a requeued job can give the same DIR on every attempt.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// With a sweep.json: run its runs afresh into a new record, not continue it.
    #[arg(long)]
    rerun: bool,
}

impl SweepArgs {
    pub(super) fn execute(self) -> anyhow::Result<()> {
        if let Some(name) = &self.name {
            config::validate_name(name).map_err(|e| UsageError(format!("--name {e}")))?;
        }
        let continued = self.request().record_to_continue();
        if self.list {
            return match continued {
                Some(record_dir) => self.list_record(&record_dir),
                None => self.start_new(None),
            };
        }
        // One process per record folder: claimed before reading what it records,
        // so two processes continuing one sweep never train the same run.
        let folder = match (&self.resume, continued) {
            (Some(dir), _) => {
                std::fs::create_dir_all(dir).map_err(FileError::on("create", dir))?;
                dir.clone()
            }
            (None, Some(dir)) => dir,
            (None, None) => return self.start_new(None),
        };
        let owner = owner::claim(&folder, false)?;
        match folder.join(sweep::RECORD_FILE).is_file() {
            true => self.continue_record(&folder, owner),
            false => self.start_new(Some((folder, owner))),
        }
    }

    /// Plans the sweep the command line names and runs it into `record` (a
    /// claimed folder), or into a new folder under the runs directory.
    fn start_new(&self, record: Option<(PathBuf, OwnerLock)>) -> anyhow::Result<()> {
        let paths = if self.paths.is_empty() {
            vec![PathBuf::from("configs")]
        } else {
            self.paths.clone()
        };
        let planned = sweep::plan(&sweep::read_sources(&paths)?, &self.set)?;
        let total = planned.len();
        if self.list {
            let shards = self.shard.map_or(1, |s| s.count);
            print!("{}", sweep::plan_table(&planned, shards).to_text());
            return Ok(());
        }
        let mine: Vec<_> = planned
            .into_iter()
            .filter(|run| self.shard.is_none_or(|s| s.owns(run.index)))
            .collect();
        if mine.is_empty() {
            println!(
                "shard {} has no runs: the sweep expands to {total}",
                self.shard.unwrap_or(Shard { index: 0, count: 1 })
            );
            return Ok(());
        }
        let name = self.name.clone().unwrap_or_else(|| sweep_name(&paths));
        let runs_dir = self.runs_dir.clone().unwrap_or_else(|| "runs".into());
        let (record_dir, owner) = match record {
            Some(claimed) => claimed,
            None => {
                let dir = sweep::create_record_dir(&runs_dir, &name, self.shard)?;
                let owner = owner::claim(&dir, false)?;
                (dir, owner)
            }
        };
        let record = SweepRecord::new(&name, self.shard, total, &mine);
        self.run_sweep(&mine, record, &record_dir, &runs_dir, owner)
    }

    /// What this command line asks for, as the sweep's rules read it.
    fn request(&self) -> SweepRequest<'_> {
        SweepRequest {
            paths: &self.paths,
            sets: &self.set,
            shard: self.shard,
            resume: self.resume.as_deref(),
            rerun: self.rerun,
        }
    }

    /// The runs a recorded sweep holds, as `--list` shows them.
    fn list_record(&self, record_dir: &Path) -> anyhow::Result<()> {
        let (_, runs) = self.read_record(record_dir)?;
        print!("{}", sweep::plan_table(&runs, 1).to_text());
        Ok(())
    }

    /// A recorded sweep, checked against the command line, and its runs.
    fn read_record(&self, record_dir: &Path) -> anyhow::Result<(SweepRecord, Vec<PlannedRun>)> {
        let record_path = record_dir.join(sweep::RECORD_FILE);
        let record = SweepRecord::read(&record_path)?;
        self.request().check_same_sweep(&record, record_dir)?;
        let mut runs = sweep::plan(&sweep::read_sources(&[record_path])?, &[])?;
        for (run, entry) in runs.iter_mut().zip(&record.runs) {
            run.index = entry.index;
        }
        Ok((record, runs))
    }

    /// Runs what a recorded sweep has left, into the same record.
    fn continue_record(&self, record_dir: &Path, owner: OwnerLock) -> anyhow::Result<()> {
        let (record, runs) = self.read_record(record_dir)?;
        record.check_run_dirs(&record_dir.join(sweep::RECORD_FILE))?;
        let parent = record_dir.parent().unwrap_or(Path::new("."));
        let runs_dir = (self.runs_dir.clone())
            .or_else(|| record.runs_dir.clone())
            .unwrap_or_else(|| parent.to_path_buf());
        self.run_sweep(&runs, record, record_dir, &runs_dir, owner)
    }

    /// Runs `runs` with `record` kept in `record_dir`, prints the table, and
    /// fails if the sweep was interrupted or a run failed.
    fn run_sweep(
        &self,
        runs: &[PlannedRun],
        mut record: SweepRecord,
        record_dir: &Path,
        runs_dir: &Path,
        _owner: OwnerLock,
    ) -> anyhow::Result<()> {
        let first = &runs[0];
        device::set_cpu_threads(self.threads.unwrap_or(first.config.device.threads));
        let record_path = record_dir.join(sweep::RECORD_FILE);
        let left = record
            .runs
            .iter()
            .filter(|e| e.status != crate::run::rundir::Status::Completed)
            .count();
        eprintln!(
            "sweep {}: {left} of {} runs to do; record {}",
            record.name,
            record.total_runs,
            record_path.display()
        );
        let started = std::time::Instant::now();
        let tally = sweep::execute(runs, &mut record, &record_path, runs_dir)?;
        print!("{}", record.table().to_text());
        println!(
            "sweep wall time: {:.1} s; record: {}",
            started.elapsed().as_secs_f64(),
            record_path.display()
        );
        if interrupt::stop_requested().is_some() {
            anyhow::bail!(
                "sweep interrupted; `mnist-lab sweep --resume {}` continues it",
                record_dir.display()
            );
        }
        if tally.failed > 0 {
            anyhow::bail!(
                "{} of {} runs failed (errors in {})",
                tally.failed,
                runs.len(),
                record_path.display()
            );
        }
        if !tally.elsewhere.is_empty() {
            anyhow::bail!(
                "left to other processes, which train them now: {}; `mnist-lab sweep --resume {}` \
                 once they end settles the record",
                tally.elsewhere.join(", "),
                record_dir.display()
            );
        }
        Ok(())
    }
}

/// A single config's or folder's name (a record's own name for a sweep.json);
/// `sweep` for several.
fn sweep_name(paths: &[PathBuf]) -> String {
    match paths {
        [one] if one.file_name().is_some_and(|n| n == sweep::RECORD_FILE) => {
            SweepRecord::read(one).map_or_else(|_| "sweep".into(), |record| record.name)
        }
        [one] => one
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|s| !s.is_empty() && s != "sweep")
            .unwrap_or_else(|| "sweep".into()),
        _ => "sweep".into(),
    }
}

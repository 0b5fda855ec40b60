//! The rules of continuing a recorded sweep: which folder a command line
//! continues, and whether what it names still describes the recorded sweep.

use std::path::{Path, PathBuf};

use crate::run::sweep::{self, RECORD_FILE, Shard, SweepError, SweepRecord, SweepSet};

/// What a `sweep` command line says about the sweep it means.
#[derive(Debug, Clone, Copy)]
pub struct SweepRequest<'a> {
    /// Config files, folders or a sweep.json.
    pub paths: &'a [PathBuf],
    pub sets: &'a [SweepSet],
    pub shard: Option<Shard>,
    /// `--resume DIR`.
    pub resume: Option<&'a Path>,
    /// `--rerun`: a sweep.json's configs afresh, into a new record.
    pub rerun: bool,
}

impl SweepRequest<'_> {
    /// The record folder to continue: `--resume DIR` when DIR holds a record,
    /// or the folder of a single sweep.json given without `--rerun`.
    pub fn record_to_continue(&self) -> Option<PathBuf> {
        if let Some(dir) = self.resume {
            return dir.join(RECORD_FILE).is_file().then(|| dir.to_path_buf());
        }
        match self.paths {
            [one] if !self.rerun && one.file_name().is_some_and(|n| n == RECORD_FILE) => {
                Some(one.parent().unwrap_or(Path::new(".")).to_path_buf())
            }
            _ => None,
        }
    }

    /// A command line that names configs (as a requeued Slurm job repeats its
    /// own) must still describe the recorded sweep, shard included; one that
    /// names only the record cannot change it with `--set`.
    pub fn check_same_sweep(
        &self,
        record: &SweepRecord,
        record_dir: &Path,
    ) -> Result<(), SweepError> {
        let differs = |what: String| {
            Err(SweepError::OtherSweep {
                dir: record_dir.to_path_buf(),
                what,
            })
        };
        if let Some(shard) = self.shard
            && Some(shard.to_string()) != record.shard
        {
            let recorded = record.shard.as_deref().unwrap_or("none");
            return differs(format!("its shard is {recorded}, not {shard}"));
        }
        let names_configs = self.resume.is_some() && !self.paths.is_empty();
        if !names_configs {
            return match self.sets.is_empty() {
                true => Ok(()),
                false => differs("--set cannot change a recorded sweep".into()),
            };
        }
        let planned = sweep::plan(&sweep::read_sources(self.paths)?, self.sets)?;
        let mine: Vec<String> = (planned.iter())
            .filter(|run| self.shard.is_none_or(|s| s.owns(run.index)))
            .map(|run| run.config.to_toml())
            .collect();
        let recorded: Vec<&String> = record.runs.iter().map(|e| &e.config).collect();
        if mine.len() != recorded.len() || mine.iter().zip(&recorded).any(|(a, b)| a != *b) {
            return differs("the configs and --set given now expand to other runs".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(
        paths: &'a [PathBuf],
        resume: Option<&'a Path>,
        rerun: bool,
    ) -> SweepRequest<'a> {
        SweepRequest {
            paths,
            sets: &[],
            shard: None,
            resume,
            rerun,
        }
    }

    #[test]
    fn a_record_is_continued_from_its_folder_or_its_sweep_json() {
        let dir = tempfile::tempdir().unwrap();
        let record = SweepRecord::new("grid", None, 0, &[]);
        record.write(&dir.path().join(RECORD_FILE)).unwrap();
        let json = [dir.path().join(RECORD_FILE)];
        assert_eq!(
            request(&json, None, false).record_to_continue().as_deref(),
            Some(dir.path())
        );
        assert_eq!(
            request(&json, None, true).record_to_continue(),
            None,
            "--rerun"
        );
        assert_eq!(
            request(&[], Some(dir.path()), false)
                .record_to_continue()
                .as_deref(),
            Some(dir.path())
        );
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(
            request(&[], Some(empty.path()), false).record_to_continue(),
            None,
            "a --resume folder without a record starts the sweep there"
        );
    }

    #[test]
    fn another_shard_or_a_set_on_a_bare_record_is_another_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let record = SweepRecord::new("grid", Some(Shard { index: 0, count: 2 }), 0, &[]);
        let mut asked = request(&[], Some(dir.path()), false);
        asked.shard = Some(Shard { index: 1, count: 2 });
        let err = asked.check_same_sweep(&record, dir.path()).unwrap_err();
        assert!(
            err.is_usage() && err.to_string().contains("its shard is 0/2, not 1/2"),
            "{err}"
        );
        let sets: Vec<SweepSet> = vec!["optimizer.lr=0.1".parse().unwrap()];
        let asked = SweepRequest {
            sets: &sets,
            ..request(&[], Some(dir.path()), false)
        };
        let record = SweepRecord::new("grid", None, 0, &[]);
        assert!(asked.check_same_sweep(&record, dir.path()).is_err());
        assert!(
            request(&[], Some(dir.path()), false)
                .check_same_sweep(&record, dir.path())
                .is_ok()
        );
    }
}

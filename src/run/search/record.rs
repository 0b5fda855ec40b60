//! `search.json`, the record of a search: its settings, each trial's values,
//! run directory, rung, metric and status, each rung's decision, and the best
//! trial; rewritten after every trial so it can be read while the search goes on.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::search::SearchConfig;
use crate::run::rundir::{Status, Summary};
use crate::run::search::{SearchPlan, Trial};
use crate::run::sweep::Shard;
use crate::util::fsio::{FileError, read_text, write_atomic};
use crate::util::table::{Table, compact, percent};

pub const RECORD_FILE: &str = "search.json";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SearchRecord {
    pub name: String,
    pub started_at: String,
    /// `I/N` where this record holds one shard of the search.
    pub shard: Option<String>,
    pub search: SearchConfig,
    /// Epochs of each rung.
    pub rungs: Vec<usize>,
    /// The config searched, `[search]` table included: continuing the search
    /// plans from it.
    pub config: String,
    pub trials: Vec<TrialEntry>,
    /// Each rung decided so far: which trials it held and which went on.
    pub decisions: Vec<RungDecision>,
    /// The trial with the best metric at the last rung it reached among those
    /// that reached the furthest rung.
    pub best: Option<usize>,
    /// Epochs trained by all trials together: the search's cost.
    pub epochs_spent: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialEntry {
    pub index: usize,
    pub name: String,
    /// The sampled values, by dotted key.
    pub values: serde_json::Map<String, serde_json::Value>,
    pub status: TrialStatus,
    pub run_dir: Option<PathBuf>,
    /// The last rung it trained to (0 first).
    pub rung: usize,
    pub epochs: usize,
    /// The search's metric over its epochs so far.
    pub metric: Option<f64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrialStatus {
    Pending,
    Running,
    /// Stopped at a rung by the schedule; its run can still be resumed by hand.
    Pruned,
    /// Trained to the last rung.
    Completed,
    Interrupted,
    /// Failed or diverged: no metric, out of the search.
    Failed,
}

impl std::fmt::Display for TrialStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let json = serde_json::to_value(self).expect("a status serialises");
        f.write_str(json.as_str().unwrap_or("?"))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RungDecision {
    pub rung: usize,
    pub epochs: usize,
    /// Trial indices that reached the rung, and those promoted from it.
    pub trials: Vec<usize>,
    pub promoted: Vec<usize>,
}

impl TrialEntry {
    pub(super) fn pending(trial: &Trial) -> TrialEntry {
        TrialEntry {
            index: trial.index,
            name: trial.config.name.clone(),
            values: (trial.values.iter())
                .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or_default()))
                .collect(),
            status: TrialStatus::Pending,
            run_dir: None,
            rung: 0,
            epochs: 0,
            metric: None,
            error: None,
        }
    }

    /// The trial's run directory as found from the search's folder `dir`:
    /// trials train inside it, so the record's path (relative to where the
    /// search was started) is only the fallback.
    pub fn run_dir_in(&self, dir: &Path) -> Option<PathBuf> {
        let recorded = self.run_dir.as_deref()?;
        let inside = dir.join(recorded.file_name()?);
        Some(match inside.is_dir() {
            true => inside,
            false => recorded.to_path_buf(),
        })
    }

    /// Takes the epochs and outcome of the trial's run.
    pub(super) fn note(&mut self, summary: &Summary) {
        self.epochs = summary.epochs_completed;
        match summary.status {
            Status::Completed => {
                self.error = None;
                self.status = TrialStatus::Running;
            }
            Status::Interrupted => self.status = TrialStatus::Interrupted,
            _ => {
                self.status = TrialStatus::Failed;
                self.error = summary.error.clone();
            }
        }
    }
}

/// The folders at most `depth` levels below `root` (itself included) that
/// hold a search record, sorted by path.
pub fn find_records(root: &Path, depth: usize) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if root.join(RECORD_FILE).is_file() {
        found.push(root.to_path_buf());
    }
    if depth > 0
        && let Ok(entries) = std::fs::read_dir(root)
    {
        let mut folders: Vec<PathBuf> = (entries.flatten())
            .map(|e| e.path())
            .filter(|p| p.is_dir() && !p.join(crate::run::rundir::SUMMARY_FILE).is_file())
            .collect();
        folders.sort();
        for folder in folders {
            found.extend(find_records(&folder, depth - 1));
        }
    }
    found
}

/// A sampled value as tables show it: strings bare, fractions to six
/// significant digits.
pub fn value_label(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) if n.is_f64() => compact(n.as_f64().unwrap_or(f64::NAN)),
        other => other.to_string(),
    }
}

impl SearchRecord {
    pub(super) fn new(
        plan: &SearchPlan,
        config_text: &str,
        shard: Option<Shard>,
        trials: Vec<TrialEntry>,
    ) -> SearchRecord {
        SearchRecord {
            name: plan.name.clone(),
            started_at: crate::util::system::now_rfc3339(),
            shard: shard.map(|s| s.to_string()),
            search: plan.search.clone(),
            rungs: plan.rungs.clone(),
            config: config_text.to_string(),
            trials,
            decisions: Vec::new(),
            best: None,
            epochs_spent: 0,
        }
    }

    pub fn read(path: &Path) -> Result<SearchRecord, FileError> {
        let text = read_text(path)?;
        serde_json::from_str(&text).map_err(|e| {
            FileError::new(
                "read",
                path,
                std::io::Error::other(format!("not a search record: {e}")),
            )
        })
    }

    pub fn write(&self, path: &Path) -> Result<(), FileError> {
        let json = serde_json::to_vec_pretty(self).expect("a search record serialises");
        write_atomic(path, &json)
    }

    pub(super) fn note_rung(
        &mut self,
        rung: usize,
        epochs: usize,
        alive: &[usize],
        promoted: &[usize],
    ) {
        let index = |p: &usize| self.trials[*p].index;
        let decision = RungDecision {
            rung,
            epochs,
            trials: alive.iter().map(index).collect(),
            promoted: promoted.iter().map(index).collect(),
        };
        self.decisions.retain(|d| d.rung != rung);
        self.decisions.push(decision);
    }

    /// Settles the best trial and the epochs spent.
    pub(super) fn finish(&mut self) {
        self.epochs_spent = self.trials.iter().map(|t| t.epochs).sum();
        let metric = self.search.metric;
        self.best = (self.trials.iter())
            .filter(|t| t.status == TrialStatus::Completed && t.metric.is_some())
            .max_by(|a, b| metric.score(a.metric).total_cmp(&metric.score(b.metric)))
            .map(|t| t.index);
    }

    /// The run directories (found from the search's folder `dir`) of the
    /// trials that reached the furthest rung any trial reached, best first.
    pub fn leading_runs(&self, dir: &Path) -> Vec<PathBuf> {
        let furthest = (self.trials.iter())
            .filter(|t| t.metric.is_some())
            .map(|t| t.rung)
            .max();
        let mut leading: Vec<&TrialEntry> = (self.trials.iter())
            .filter(|t| t.metric.is_some() && Some(t.rung) == furthest)
            .collect();
        let score = |t: &TrialEntry| self.search.metric.score(t.metric);
        leading.sort_by(|a, b| score(b).total_cmp(&score(a)).then(a.index.cmp(&b.index)));
        leading.iter().filter_map(|t| t.run_dir_in(dir)).collect()
    }

    /// The best trial, if the search has one.
    pub fn best_trial(&self) -> Option<&TrialEntry> {
        (self.best).and_then(|b| self.trials.iter().find(|t| t.index == b))
    }

    /// What the search is and found, in a few lines: scheduler, trials,
    /// rungs, epochs spent, the best trial and its values.
    pub fn overview(&self) -> String {
        let done = (self.trials.iter())
            .filter(|t| t.status != TrialStatus::Pending)
            .count();
        let mut text = format!(
            "search {}{}: {} scheduler, {} trials ({done} trained), rungs at {:?} epochs, \
             {} epochs spent, metric {}\n",
            self.name,
            self.shard
                .as_deref()
                .map_or(String::new(), |s| format!(" (shard {s})")),
            format!("{:?}", self.search.scheduler).to_lowercase(),
            self.trials.len(),
            self.rungs,
            self.trials.iter().map(|t| t.epochs).sum::<usize>(),
            self.search.metric.name(),
        );
        match self.best_trial() {
            Some(best) => {
                let values: Vec<String> = (best.values.iter())
                    .map(|(k, v)| format!("{k}={}", value_label(v)))
                    .collect();
                text += &format!(
                    "best trial: {} ({} {}) with {}; run directory {}\n",
                    best.name,
                    self.search.metric.name(),
                    self.shown_metric(best.metric),
                    values.join(" "),
                    best.run_dir
                        .as_deref()
                        .map_or("-".into(), |d| d.display().to_string())
                );
            }
            None => text += "no best trial yet: no trial has reached the last rung\n",
        }
        text
    }

    /// [`Self::overview`] as markdown paragraphs.
    pub fn overview_markdown(&self) -> String {
        self.overview().replace('\n', "\n\n")
    }

    /// A metric as tables show it: accuracy in percent, loss to 4 decimals.
    fn shown_metric(&self, value: Option<f64>) -> String {
        match self.search.metric {
            crate::config::search::Metric::ValAcc => percent(value),
            crate::config::search::Metric::ValLoss => {
                value.map_or("-".into(), |m| format!("{m:.4}"))
            }
        }
    }

    /// Every trial, best first among those that went furthest: its values,
    /// rung, epochs, metric and status.
    pub fn table(&self) -> Table {
        self.table_top(usize::MAX)
    }

    /// The first `rows` rows of [`Self::table`].
    pub fn table_top(&self, rows: usize) -> Table {
        let keys: Vec<&String> = self.search.space.keys().collect();
        let metric = self.search.metric.name();
        let headers: Vec<&str> = ["trial"]
            .into_iter()
            .chain(keys.iter().map(|k| k.as_str()))
            .chain(["rung", "epochs", metric, "status"])
            .collect();
        let mut table = Table::new(&headers);
        let mut order: Vec<&TrialEntry> = self.trials.iter().collect();
        let score = |t: &TrialEntry| self.search.metric.score(t.metric);
        order.sort_by(|a, b| {
            (b.rung.cmp(&a.rung))
                .then(score(b).total_cmp(&score(a)))
                .then(a.index.cmp(&b.index))
        });
        for trial in order.into_iter().take(rows) {
            let mut row = vec![match self.best == Some(trial.index) {
                true => format!("{} (best)", trial.name),
                false => trial.name.clone(),
            }];
            for key in &keys {
                row.push(trial.values.get(*key).map_or("-".into(), value_label));
            }
            row.push(trial.rung.to_string());
            row.push(trial.epochs.to_string());
            row.push(self.shown_metric(trial.metric));
            row.push(trial.status.to_string());
            table.push(row);
        }
        table
    }
}

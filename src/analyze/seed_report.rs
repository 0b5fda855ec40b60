//! The report's part on configs run with several seeds: each seed's test
//! accuracy with mean and spread, the validation curves as mean and band, and
//! the ablation: the same experiment with one setting changed, over the same
//! seeds, found among the runs on disk (`scripts/ablation.sh` makes them).

use std::path::PathBuf;

use crate::analyze::Result;
use crate::analyze::inspect::RunInfo;
use crate::analyze::report::ASSIGNMENT;
use crate::analyze::seeds::{self, SeedGroup};
use crate::util::plots;
use crate::util::table::{Table, percent, thousands};

/// The section's markdown; empty where no config ran with several seeds.
/// `over_seeds` holds each such config's name and its latest run per seed;
/// `all` every completed run, where the ablation's runs are looked for.
pub fn section(
    over_seeds: &[(String, Vec<RunInfo>)],
    all: &[RunInfo],
    asset: &dyn Fn(&str) -> (PathBuf, String),
) -> Result<String> {
    if over_seeds.is_empty() {
        return Ok(String::new());
    }
    let groups: Vec<SeedGroup> = over_seeds
        .iter()
        .map(|(name, runs)| SeedGroup {
            label: name.clone(),
            changes: Vec::new(),
            runs: runs.iter().collect(),
        })
        .collect();
    let candidates = seeds::seed_groups(all);
    let twins: Vec<_> = (groups.iter())
        .map(|g| held_out_twin(g, &candidates))
        .collect();
    // A config trained on every image shows the curves of its held-out twin.
    let charted: Vec<SeedGroup> = (groups.iter().zip(&twins))
        .map(|(g, twin)| SeedGroup {
            label: match twin {
                Some(_) => format!("{} (held out)", g.label),
                None => g.label.clone(),
            },
            changes: Vec::new(),
            runs: twin.as_ref().map_or(&g.runs, |(t, _)| &t.runs).clone(),
        })
        .collect();
    let (path, href) = asset("over-seeds.png");
    plots::write_png(&path, &seeds::group_charts(&charted)?)?;
    let mut markdown = format!(
        "### Over seeds\n\n\
         The configs run with several seeds (`just seeds`): the latest run of each \
         seed, its test accuracy measured once at its best validation epoch (at its \
         last epoch where the config trains on all 60,000 images, \
         `data.validation_size = 0`); the spread is the sample standard deviation, \
         and a lead smaller than about twice it is noise.\n\n{}\n\
         Validation curves over the seeds, mean in a band of one standard deviation \
         (for a config trained on all 60,000 images, the same settings with images \
         held out: \"held out\"):\n\n\
         ![validation curves over seeds]({href})\n\n",
        seeds_table(over_seeds).to_markdown()
    );
    markdown += &ablation(&groups, &twins, &candidates)?;
    Ok(markdown)
}

/// For a config that trains on every image (`data.validation_size = 0`), the
/// runs of the same settings with images held out, over two seeds or more,
/// and that one change (`data.validation_size = 5000`): what shows its
/// validation curves and its train/validation gap.
fn held_out_twin<'a, 'r>(
    config: &SeedGroup,
    candidates: &'a [SeedGroup<'r>],
) -> Option<(&'a SeedGroup<'r>, String)> {
    let base = seeds::experiment(config.runs[0]);
    if base.get(VALIDATION_SIZE) != Some(&serde_json::Value::from(0)) {
        return None;
    }
    candidates
        .iter()
        .filter(|g| g.runs.len() >= 2)
        .find_map(
            |g| match &seeds::changes(&base, &seeds::experiment(g.runs[0]))[..] {
                [change] if change.starts_with(VALIDATION_SIZE) => Some((g, change.clone())),
                _ => None,
            },
        )
}

const VALIDATION_SIZE: &str = "data.validation_size";

fn seeds_table(over_seeds: &[(String, Vec<RunInfo>)]) -> Table {
    let mut table = Table::new(&[
        "config",
        "regularisation",
        "parameters",
        "validation split",
        "seeds",
        "test accuracy per seed",
        "mean ± std",
        "assignment report",
    ]);
    for (name, runs) in over_seeds {
        let accuracies = test_accuracies(runs.iter());
        let seeds: Vec<String> = runs.iter().map(|r| r.summary.seed.to_string()).collect();
        // A `_best` config improves on the assignment's config of the same model.
        let assignment = ASSIGNMENT
            .iter()
            .find(|(n, _)| *n == name.trim_end_matches("_best"))
            .map_or("-", |(_, acc)| acc);
        table.push(vec![
            format!("`{name}`"),
            runs[0].regularisation(),
            thousands(runs[0].summary.params),
            held_out(&runs[0]),
            seeds.join(", "),
            (accuracies.iter().map(|&a| percent(Some(a))))
                .collect::<Vec<_>>()
                .join(", "),
            format!("**{}**", seeds::percent_spread(&accuracies)),
            assignment.to_string(),
        ]);
    }
    table
}

/// How many training images a run held out for validation: `5,000`, or
/// `none` where it trained on all of them (`data.validation_size = 0`).
fn held_out(run: &RunInfo) -> String {
    match run.config.as_ref().map(|c| c.data.validation_size) {
        Some(0) => "none".into(),
        Some(n) => thousands(n),
        None => "?".into(),
    }
}

fn test_accuracies<'a>(runs: impl Iterator<Item = &'a RunInfo>) -> Vec<f64> {
    runs.filter_map(|r| r.summary.test_acc).collect()
}

/// One row per config and per setting changed from it, where runs over two
/// seeds or more exist with exactly that one change; empty where none do. A
/// config trained on every image is followed by its held-out twin, and the
/// changes below it are measured against that twin (the gap needs held-out
/// images).
fn ablation(
    configs: &[SeedGroup],
    twins: &[Option<(&SeedGroup, String)>],
    candidates: &[SeedGroup],
) -> Result<String> {
    let mut table = Table::new(&[
        "config",
        "change",
        "n",
        "test accuracy",
        "against the config",
        "train - validation (last epoch)",
    ]);
    let mut rows = 0;
    for (config, twin) in configs.iter().zip(twins) {
        let twin = twin
            .as_ref()
            .map(|(group, change)| (*group, change.as_str()));
        rows += push_config_rows(&mut table, config, twin, candidates)?;
    }
    if rows == 0 {
        return Ok(String::new());
    }
    Ok(format!(
        "Ablation (`scripts/ablation.sh`): each config again with one technique \
         turned off, over the same seeds. The last column is the gap between \
         training and validation accuracy at the last epoch, mean over the seeds: \
         what a technique does against overfitting (augmentation, smoothing and \
         BatchNorm's batch statistics lower training accuracy as measured \
         during the epoch, so a negative gap is not underfitting). A config that \
         trains on all 60,000 images has no gap of its own: the row after it is \
         the same settings with images held out, and the rows below that are \
         measured against it.\n\n{}\n",
        table.to_markdown()
    ))
}

/// `config`'s rows: as it is, its held-out twin if it has one (see
/// [`held_out_twin`]), then each group of `candidates` one change away from it
/// or from the twin. Returns how many rows besides "as it is" it pushed.
fn push_config_rows(
    table: &mut Table,
    config: &SeedGroup,
    twin: Option<(&SeedGroup, &str)>,
    candidates: &[SeedGroup],
) -> Result<usize> {
    let mean_test = |g: &SeedGroup| seeds::mean_std(&test_accuracies(g.runs.iter().copied())).0;
    let base = seeds::experiment(config.runs[0]);
    let config_mean = mean_test(config);
    table.push(row(
        &format!("`{}`", config.label),
        "as it is",
        config,
        None,
    )?);
    let mut rows = 0;
    // What a change is measured against: the twin where there is one.
    let mut reference = (base.clone(), config_mean);
    if let Some((twin, change)) = twin {
        table.push(row("", change, twin, Some(config_mean))?);
        reference = (seeds::experiment(twin.runs[0]), mean_test(twin));
        rows += 1;
    }
    for group in candidates.iter().filter(|g| g.runs.len() >= 2) {
        let variant = seeds::experiment(group.runs[0]);
        // Another architecture is another config, not this one with a
        // technique turned off (two best configs can differ in that alone).
        if variant.get("model.kind") != base.get("model.kind")
            || variant == base
            || twin.is_some_and(|(t, _)| std::ptr::eq(t, group))
        {
            continue;
        }
        let (from_config, from_reference) = (
            seeds::changes(&base, &variant),
            seeds::changes(&reference.0, &variant),
        );
        let (change, against) = match (&from_config[..], &from_reference[..]) {
            ([change], _) => (change, config_mean),
            (_, [change]) => (change, reference.1),
            _ => continue,
        };
        table.push(row("", change, group, Some(against))?);
        rows += 1;
    }
    Ok(rows)
}

fn row(
    config: &str,
    change: &str,
    group: &SeedGroup,
    base_mean: Option<f64>,
) -> Result<Vec<String>> {
    let accuracies = test_accuracies(group.runs.iter().copied());
    let mut gaps = Vec::new();
    for run in &group.runs {
        let metrics = run.metrics()?;
        if let Some((train, val)) = metrics.last().and_then(|m| Some((m.train_acc, m.val_acc?))) {
            gaps.push(train - val);
        }
    }
    let against = base_mean.map_or("-".to_string(), |base| {
        format!(
            "{:+.2} points",
            100.0 * (seeds::mean_std(&accuracies).0 - base)
        )
    });
    Ok(vec![
        config.to_string(),
        change.to_string(),
        group.runs.len().to_string(),
        seeds::percent_spread(&accuracies),
        against,
        // No gap to show for runs that held no images out.
        if gaps.is_empty() {
            "-".to_string()
        } else {
            format!("{:+.2} points", 100.0 * seeds::mean_std(&gaps).0)
        },
    ])
}

//! `mnist-lab eval`: a run's checkpoint, reloaded, on the test set: accuracy and
//! loss, per-class accuracy, the confusion matrix and the most confident mistakes.
//! [`TrainedModel`] is also what `predict` classifies with.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::Serialize;

use crate::analyze::inspect::RunInfo;
use crate::analyze::{AnalyzeError, Result};
use crate::config::{Config, Override};
use crate::data::{self, MNIST_SIDE, NUM_CLASSES, Split};
use crate::kernels;
use crate::model::checkpoint;
use crate::model::{self, Classifier};
use crate::run::rundir;
use crate::util::fsio::{FileError, write_atomic};
use crate::util::{device, plots};

pub const CONFUSION_FILE: &str = "confusion.csv";
pub const EVAL_FILE: &str = "eval.json";
pub const CONFUSION_PLOT: &str = "confusion.png";
pub const ERRORS_PLOT: &str = "errors.png";
/// Mistakes shown in `errors.png`.
const ERROR_TILES: usize = 24;

/// A run's model with its checkpoint loaded, ready to classify.
pub struct TrainedModel {
    pub run: RunInfo,
    pub config: Config,
    pub checkpoint: PathBuf,
    model: Box<dyn Classifier>,
    device: Device,
}

impl TrainedModel {
    /// Loads `run_dir`'s config (with `overrides`, e.g. `data.dir`) and its
    /// `checkpoint` file (`model.safetensors` or `last.safetensors`).
    pub fn load(run_dir: &Path, checkpoint: &str, overrides: &[Override]) -> Result<Self> {
        let run = RunInfo::read(run_dir)?;
        let checkpoint_file = checkpoint;
        let checkpoint = run_dir.join(checkpoint_file);
        if !checkpoint.is_file() {
            return Err(AnalyzeError::NoCheckpoint {
                run: run_dir.to_path_buf(),
                file: checkpoint_file.to_string(),
            });
        }
        let config = Config::load(&run_dir.join(rundir::CONFIG_FILE), overrides)?;
        let device = device::select(config.device.kind)?;
        let varmap = VarMap::new();
        let model = model::build(
            &config.model,
            config.data.input_side(),
            config.seed,
            &varmap,
            &device,
        )?;
        checkpoint::load(&varmap, &checkpoint)?;
        check_finite(&varmap, &checkpoint)?;
        Ok(TrainedModel {
            run,
            config,
            checkpoint,
            model,
            device,
        })
    }

    /// Log-probabilities of the ten classes for each 28x28 image of `split`,
    /// prepared (padded, normalised) as the run's training data was.
    pub fn log_probabilities(&self, split: &Split) -> Result<Vec<[f32; NUM_CLASSES]>> {
        let all: Vec<usize> = (0..split.len()).collect();
        let prepared = data::prepare::tensors(split, &all, &self.config.data, &self.device)?;
        let batch = self.config.train.eval_batch_size;
        let mut out = Vec::with_capacity(split.len());
        for start in (0..split.len()).step_by(batch) {
            let len = batch.min(split.len() - start);
            let images = prepared.slice(start, len)?.inputs()?;
            let logits: Tensor =
                kernels::install(&self.device, || self.model.logits(&images, false))?.detach();
            let rows = candle_nn::ops::log_softmax(&logits, 1)?.to_vec2::<f32>()?;
            out.extend(rows.into_iter().map(|row| {
                let mut classes = [0f32; NUM_CLASSES];
                classes.copy_from_slice(&row[..NUM_CLASSES]);
                classes
            }));
        }
        Ok(out)
    }
}

/// Refuses weights with a NaN or an infinity: every prediction from them is NaN.
fn check_finite(varmap: &VarMap, path: &Path) -> Result<()> {
    let vars = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut bad = Vec::new();
    let mut count = 0;
    for (name, var) in vars.iter() {
        let values = var
            .as_tensor()
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let here = values.iter().filter(|v| !v.is_finite()).count();
        if here > 0 {
            count += here;
            bad.push(name.clone());
        }
    }
    if bad.is_empty() {
        return Ok(());
    }
    bad.sort();
    Err(AnalyzeError::NonFiniteWeights {
        path: path.to_path_buf(),
        count,
        tensors: bad.join(", "),
    })
}

/// The index of the largest value (the first, on ties).
pub fn argmax(values: &[f32]) -> usize {
    values
        .iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 { (i, v) } else { best }
        })
        .0
}

/// A test image the model got wrong, and how sure it was.
#[derive(Debug, Clone, Serialize)]
pub struct Mistake {
    /// Position in the test set.
    pub index: usize,
    pub label: u8,
    pub predicted: u8,
    /// The probability the model gave its (wrong) prediction.
    pub confidence: f64,
}

/// The test-set figures of one checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub run_dir: PathBuf,
    /// The folder the test images were read from.
    pub data_dir: PathBuf,
    pub checkpoint: PathBuf,
    pub images: usize,
    pub loss: f64,
    pub accuracy: f64,
    /// Accuracy on the images of each true class, 0 to 9.
    pub per_class_accuracy: Vec<f64>,
    pub confusion: Confusion,
    /// Every mistake, most confident first.
    pub mistakes: Vec<Mistake>,
}

/// Test-set figures computed from log-probabilities and labels.
#[derive(Debug, Clone)]
pub struct Scores {
    pub loss: f64,
    pub accuracy: f64,
    /// Most confident first.
    pub mistakes: Vec<Mistake>,
    pub confusion: Confusion,
}

/// `confusion[true][predicted]`: image counts.
pub type Confusion = [[usize; NUM_CLASSES]; NUM_CLASSES];

/// Scores log-probabilities against labels.
pub fn score(log_probs: &[[f32; NUM_CLASSES]], labels: &[u8]) -> Scores {
    let mut confusion = [[0usize; NUM_CLASSES]; NUM_CLASSES];
    let mut mistakes = Vec::new();
    let mut loss = 0.0;
    for (index, (row, &label)) in log_probs.iter().zip(labels).enumerate() {
        let predicted = argmax(row);
        confusion[label as usize][predicted] += 1;
        loss -= row[label as usize] as f64;
        if predicted != label as usize {
            mistakes.push(Mistake {
                index,
                label,
                predicted: predicted as u8,
                confidence: (row[predicted] as f64).exp(),
            });
        }
    }
    mistakes.sort_by(|a, b| b.confidence.total_cmp(&a.confidence));
    let n = labels.len().max(1) as f64;
    let accuracy = (labels.len() - mistakes.len()) as f64 / n;
    Scores {
        loss: loss / n,
        accuracy,
        mistakes,
        confusion,
    }
}

/// Evaluates a loaded model on the run's test set (`data.test_size` applies, as in
/// training) and returns the figures with the raw test images.
pub fn evaluate(model: &TrainedModel) -> Result<(Evaluation, Split)> {
    // The folder the run read, unless the config (or an override) names one.
    let recorded = model.run.summary.data_dir.as_deref();
    let dir = model
        .config
        .data
        .dir
        .as_deref()
        .or(recorded.filter(|d| d.is_dir()));
    let dir = data::locate_or_download(dir, &data::download::TEST_FILES)?;
    let all = data::idx::read_test(&dir)?;
    let test = all.select(&model.config.data.test_indices(all.len()));
    let log_probs = model.log_probabilities(&test)?;
    let Scores {
        loss,
        accuracy,
        mistakes,
        confusion,
    } = score(&log_probs, &test.labels);
    let per_class_accuracy = confusion
        .iter()
        .enumerate()
        .map(|(class, row)| row[class] as f64 / row.iter().sum::<usize>().max(1) as f64)
        .collect();
    let evaluation = Evaluation {
        run_dir: model.run.dir.clone(),
        data_dir: std::path::absolute(&dir).unwrap_or(dir.clone()),
        checkpoint: model.checkpoint.clone(),
        images: test.len(),
        loss,
        accuracy,
        per_class_accuracy,
        confusion,
        mistakes,
    };
    Ok((evaluation, test))
}

/// Why `evaluation` is not of the run's own test set, if it is not: another
/// `data.test_size`, or test files read from another folder than the run's.
pub fn other_test_set(model: &TrainedModel, evaluation: &Evaluation) -> Option<String> {
    let run_config = model.run.config.as_ref();
    if run_config.is_some_and(|c| c.data.test_size != model.config.data.test_size) {
        return Some("data.test_size differs from the run's".into());
    }
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    };
    let recorded = model.run.summary.data_dir.as_deref();
    match recorded {
        Some(recorded) if !same(recorded, &evaluation.data_dir) => Some(format!(
            "the test images come from {}, the run's from {}",
            evaluation.data_dir.display(),
            recorded.display()
        )),
        _ => None,
    }
}

/// `confusion.csv`: a header of predicted classes, then one row per true class.
pub fn confusion_csv(confusion: &Confusion) -> String {
    let mut out = String::from("true\\predicted");
    for class in 0..NUM_CLASSES {
        out += &format!(",{class}");
    }
    out.push('\n');
    for (class, row) in confusion.iter().enumerate() {
        out += &class.to_string();
        for count in row {
            out += &format!(",{count}");
        }
        out.push('\n');
    }
    out
}

/// Writes `confusion.csv`, `eval.json`, `plots/confusion.png` and
/// `plots/errors.png` into the run directory; returns the paths written.
pub fn write_files(evaluation: &Evaluation, test: &Split, name: &str) -> Result<Vec<PathBuf>> {
    let dir = &evaluation.run_dir;
    let confusion_path = dir.join(CONFUSION_FILE);
    write_atomic(
        &confusion_path,
        confusion_csv(&evaluation.confusion).as_bytes(),
    )?;
    let eval_path = dir.join(EVAL_FILE);
    let json = serde_json::to_vec_pretty(evaluation).expect("an evaluation serialises");
    write_atomic(&eval_path, &json)?;
    let plots_dir = dir.join(rundir::PLOTS_DIR);
    std::fs::create_dir_all(&plots_dir).map_err(FileError::on("create", &plots_dir))?;
    let confusion_plot = plots_dir.join(CONFUSION_PLOT);
    write_confusion_plot(evaluation, name, &confusion_plot)?;
    let errors_plot = plots_dir.join(ERRORS_PLOT);
    write_errors_plot(evaluation, test, name, &errors_plot)?;
    Ok(vec![confusion_path, eval_path, confusion_plot, errors_plot])
}

pub fn write_confusion_plot(evaluation: &Evaluation, name: &str, path: &Path) -> Result<()> {
    let title = format!(
        "{name}: confusion matrix, test accuracy {:.2}%",
        100.0 * evaluation.accuracy
    );
    Ok(plots::write_confusion(path, &title, &evaluation.confusion)?)
}

pub fn write_errors_plot(
    evaluation: &Evaluation,
    test: &Split,
    name: &str,
    path: &Path,
) -> Result<()> {
    let pixels = MNIST_SIDE * MNIST_SIDE;
    let tiles: Vec<plots::Tile> = evaluation
        .mistakes
        .iter()
        .take(ERROR_TILES)
        .map(|m| plots::Tile {
            pixels: &test.images[m.index * pixels..(m.index + 1) * pixels],
            caption: format!(
                "true {}, pred {} ({:.0}%)",
                m.label,
                m.predicted,
                100.0 * m.confidence
            ),
        })
        .collect();
    let title = format!(
        "{name}: the {} most confident of {} mistakes",
        tiles.len(),
        evaluation.mistakes.len()
    );
    Ok(plots::write_image_grid(path, &title, &tiles, 6)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_a_small_example_by_hand() {
        let sure = |class: usize, p: f32| {
            let mut row = [((1.0 - p) / 9.0).ln(); NUM_CLASSES];
            row[class] = p.ln();
            row
        };
        let log_probs = [sure(3, 0.9), sure(5, 0.8), sure(1, 0.6)];
        let labels = [3u8, 3, 1];
        let Scores {
            loss,
            accuracy,
            mistakes,
            confusion,
        } = score(&log_probs, &labels);
        assert!((accuracy - 2.0 / 3.0).abs() < 1e-12);
        let expected_loss = -((0.9f64).ln() + (0.2f64 / 9.0).ln() + (0.6f64).ln()) / 3.0;
        assert!(
            (loss - expected_loss).abs() < 1e-5,
            "{loss} vs {expected_loss}"
        );
        assert_eq!(mistakes.len(), 1);
        assert_eq!(
            (mistakes[0].index, mistakes[0].label, mistakes[0].predicted),
            (1, 3, 5)
        );
        assert!((mistakes[0].confidence - 0.8).abs() < 1e-5);
        assert_eq!(confusion[3][3], 1);
        assert_eq!(confusion[3][5], 1);
        assert_eq!(confusion[1][1], 1);
        let csv = confusion_csv(&confusion);
        assert!(
            csv.starts_with("true\\predicted,0,1,2,3,4,5,6,7,8,9\n0,0,0"),
            "{csv}"
        );
        assert_eq!(csv.lines().count(), 11);
    }

    #[test]
    fn argmax_takes_the_first_of_equals() {
        assert_eq!(argmax(&[0.1, 0.5, 0.5, 0.2]), 1);
        assert_eq!(argmax(&[-3.0, -1.0]), 1);
    }
}

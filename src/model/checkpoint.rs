//! Safetensors checkpoints whose tensor names and contents match PyTorch's
//! `state_dict`, so a checkpoint loads with `model.load_state_dict(load_file(...))`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use super::layers::BatchNorm;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read checkpoint {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("checkpoint {path} does not fit the model: {reason}")]
    Mismatch { path: String, reason: String },
    #[error("cannot write checkpoint {path}: {reason}")]
    Write { path: String, reason: String },
    #[error(transparent)]
    File(#[from] crate::util::fsio::FileError),
}

/// Serialises every variable of `varmap`, plus PyTorch's `num_batches_tracked`
/// counter for each BatchNorm (PyTorch refuses a BatchNorm state without it).
pub fn to_bytes(varmap: &VarMap, batches_trained: u64) -> candle_core::Result<Vec<u8>> {
    let vars = varmap.data().lock().expect("varmap lock");
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, var) in vars.iter() {
        tensors.insert(
            name.clone(),
            var.as_detached_tensor().to_device(&Device::Cpu)?,
        );
        let counted = format!(".{}", BatchNorm::COUNTED_BUFFER);
        if let Some(layer) = name.strip_suffix(counted.as_str()) {
            let counter = Tensor::new(batches_trained as i64, &Device::Cpu)?;
            tensors.insert(format!("{layer}.num_batches_tracked"), counter);
        }
    }
    let views: Vec<(&String, &Tensor)> = tensors.iter().collect();
    safetensors::tensor::serialize(views, None)
        .map_err(|e| candle_core::Error::Msg(format!("safetensors: {e}")))
}

/// Writes a checkpoint atomically.
pub fn save(varmap: &VarMap, batches_trained: u64, path: &Path) -> Result<(), CheckpointError> {
    let write_error = |reason: String| CheckpointError::Write {
        path: path.display().to_string(),
        reason,
    };
    let bytes = to_bytes(varmap, batches_trained).map_err(|e| write_error(e.to_string()))?;
    Ok(crate::util::fsio::write_atomic(path, &bytes)?)
}

/// Loads a checkpoint into the variables of `varmap`: every variable must be in
/// the file with the same shape (extra counters such as `num_batches_tracked` are ignored).
pub fn load(varmap: &VarMap, path: &Path) -> Result<(), CheckpointError> {
    let shown = path.display().to_string();
    let tensors =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| CheckpointError::Read {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    assign(varmap, &tensors, &shown)
}

/// Sets every variable of `varmap` from `tensors` (read from `origin`, named in
/// errors): each must be there with the variable's shape.
pub fn assign(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    origin: &str,
) -> Result<(), CheckpointError> {
    let mismatch = |reason: String| CheckpointError::Mismatch {
        path: origin.to_string(),
        reason,
    };
    let vars = varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let tensor = tensors
            .get(name)
            .ok_or_else(|| mismatch(format!("no tensor named {name}")))?;
        if tensor.dims() != var.dims() {
            return Err(mismatch(format!(
                "{name} has shape {:?}, the model expects {:?}",
                tensor.dims(),
                var.dims()
            )));
        }
        tensor
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(var.device()))
            .and_then(|t| var.set(&t))
            .map_err(|e| mismatch(format!("{name}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ModelConfig, ModelKind};

    #[test]
    fn save_then_load_restores_every_tensor() {
        for &kind in ModelKind::ALL {
            save_then_load(kind);
        }
    }

    fn save_then_load(kind: ModelKind) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let config = ModelConfig {
            kind,
            batch_norm: true,
            dropout: 0.0,
        };
        let source = VarMap::new();
        let model = crate::model::build(&config, 32, 1, &source, &Device::Cpu).unwrap();
        // Training-mode passes move the BatchNorm statistics off their start
        // (mean 0, variance 1), so a loader that skipped them would be caught.
        let images =
            (Tensor::rand(0f32, 1.0, (8, 1, 32, 32), &Device::Cpu).unwrap() * 3.0).unwrap();
        for _ in 0..3 {
            crate::kernels::install(&Device::Cpu, || model.logits(&images, true)).unwrap();
        }
        save(&source, 17, &path).unwrap();

        let raw = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
        assert_eq!(
            raw["bn1.num_batches_tracked"].to_scalar::<i64>().unwrap(),
            17,
            "{kind}"
        );

        let target = VarMap::new();
        crate::model::build(&config, 32, 2, &target, &Device::Cpu).unwrap();
        load(&target, &path).unwrap();
        let (source, target) = (source.data().lock().unwrap(), target.data().lock().unwrap());
        assert_eq!(source.len(), target.len());
        let values = |t: &candle_core::Var| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (name, var) in source.iter() {
            assert_eq!(values(var), values(&target[name]), "{kind} {name}");
        }
        let moved = values(&source["bn1.running_mean"]);
        assert!(
            moved.iter().all(|&m| m != 0.0),
            "{kind}: statistics moved: {moved:?}"
        );
    }

    #[test]
    fn loading_into_another_model_names_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let lenet = VarMap::new();
        crate::model::build(&ModelConfig::default(), 32, 1, &lenet, &Device::Cpu).unwrap();
        save(&lenet, 0, &path).unwrap();
        let mlp = VarMap::new();
        let config = ModelConfig {
            kind: ModelKind::CustomMlp,
            ..Default::default()
        };
        crate::model::build(&config, 32, 1, &mlp, &Device::Cpu).unwrap();
        let err = load(&mlp, &path).unwrap_err().to_string();
        assert!(err.contains("m.safetensors") && err.contains("fc"), "{err}");
        let err = load(&mlp, &dir.path().join("none.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("none.safetensors"), "{err}");
    }
}

//! An exponential moving average of the weights: after every step each variable's
//! shadow moves `1 - decay` of the way towards it (BatchNorm's running
//! statistics too, as timm's `ModelEmaV2` does). The averaged weights are what a
//! run validates, keeps as its best checkpoint and tests; training goes on with
//! the raw weights.

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;

pub struct Ema {
    decay: f64,
    /// Every variable by name, with its shadow.
    shadows: Vec<(String, Var, Tensor)>,
}

impl Ema {
    /// Starts every shadow at its variable's value.
    pub fn new(varmap: &VarMap, decay: f64) -> Result<Ema> {
        let vars = varmap.data().lock().expect("varmap lock");
        let mut named: Vec<(&String, &Var)> = vars.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let shadows = named
            .into_iter()
            .map(|(name, var)| Ok((name.clone(), var.clone(), var.as_detached_tensor().copy()?)))
            .collect::<Result<_>>()?;
        Ok(Ema { decay, shadows })
    }

    /// `shadow = decay * shadow + (1 - decay) * variable`, after a step.
    pub fn update(&mut self) -> Result<()> {
        for (_, var, shadow) in &mut self.shadows {
            *shadow =
                ((&*shadow * self.decay)? + (var.as_detached_tensor() * (1.0 - self.decay))?)?;
        }
        Ok(())
    }

    /// Runs `work` with the averaged weights in the variables, then puts the raw
    /// ones back.
    pub fn with_averaged<R>(&self, work: impl FnOnce() -> Result<R>) -> Result<R> {
        let mut raw = Vec::with_capacity(self.shadows.len());
        for (_, var, shadow) in &self.shadows {
            raw.push(var.as_detached_tensor().copy()?);
            var.set(shadow)?;
        }
        let result = work();
        for ((_, var, _), raw) in self.shadows.iter().zip(&raw) {
            var.set(raw)?;
        }
        result
    }

    /// The shadows by variable name.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        (self.shadows.iter())
            .map(|(name, _, shadow)| (name.clone(), shadow.clone()))
            .collect()
    }

    /// Puts back shadows saved by [`Ema::tensors`]; every variable must have one.
    pub fn restore(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, var, shadow) in &mut self.shadows {
            let Some(saved) = tensors.get(name.as_str()) else {
                candle_core::bail!("the training state has no moving average of {name}");
            };
            *shadow = saved.to_device(var.device())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn the_average_moves_a_tenth_of_the_way_and_swaps_in_for_evaluation() {
        let varmap = VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let w = vb
            .get_with_hints(1, "w", candle_nn::Init::Const(1.0))
            .unwrap();
        let mut ema = Ema::new(&varmap, 0.9).unwrap();
        let var = varmap.data().lock().unwrap()["w"].clone();
        var.set(&Tensor::new(&[2f32], &Device::Cpu).unwrap())
            .unwrap();
        ema.update().unwrap();
        let read = |t: &Tensor| t.to_vec1::<f32>().unwrap()[0];
        assert!((read(&ema.tensors()[0].1) - 1.1).abs() < 1e-6);
        let inside = ema.with_averaged(|| Ok(read(&w))).unwrap();
        assert!(
            (inside - 1.1).abs() < 1e-6,
            "the average is in the variable"
        );
        assert_eq!(read(&w), 2.0, "the raw weight is back");
    }
}

//! AdamW fused into one parallel pass over a flat parameter.
//!
//! candle-nn's `AdamW` builds about a dozen full-size temporary tensors per step, one
//! single-threaded op each; for the large, single weight of a feature-level adapter that is most
//! of a training step. This is PyTorch's `AdamW` update (decoupled weight decay, bias-corrected
//! moments), element by element, in f32 like PyTorch.

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use rayon::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// PyTorch's defaults.
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW state for one parameter held by a [`Var`].
pub struct FusedAdamW {
    pub params: AdamWParams,
    theta: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl FusedAdamW {
    pub fn new(var: &Var, params: AdamWParams) -> Result<Self> {
        let theta: Vec<f32> = var
            .as_tensor()
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let n = theta.len();
        Ok(Self {
            params,
            theta,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        })
    }

    pub fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// One update of `var` with gradient `grad` (same shape).
    pub fn step(&mut self, var: &Var, grad: &Tensor) -> Result<()> {
        let g: Vec<f32> = grad.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        ensure!(
            g.len() == self.theta.len(),
            "gradient has {} values for {} parameters",
            g.len(),
            self.theta.len()
        );
        self.t += 1;
        let p = self.params;
        let decay = (1.0 - p.lr * p.weight_decay) as f32;
        let (b1, b2) = (p.beta1 as f32, p.beta2 as f32);
        let bc1 = 1.0 - p.beta1.powi(self.t);
        let bc2_sqrt = (1.0 - p.beta2.powi(self.t)).sqrt() as f32;
        let step_size = (p.lr / bc1) as f32;
        let eps = p.eps as f32;
        self.theta
            .par_chunks_mut(4096)
            .zip(self.m.par_chunks_mut(4096))
            .zip(self.v.par_chunks_mut(4096))
            .zip(g.par_chunks(4096))
            .for_each(|(((th, m), v), g)| {
                for i in 0..th.len() {
                    th[i] *= decay;
                    m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                    v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                    th[i] -= step_size * m[i] / (v[i].sqrt() / bc2_sqrt + eps);
                }
            });
        let shape = var.as_tensor().shape().clone();
        let device: Device = var.as_tensor().device().clone();
        var.set(
            &Tensor::from_slice(&self.theta, shape, &device)?.to_dtype(var.as_tensor().dtype())?,
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Optimizer;

    #[test]
    fn matches_candle_adamw() {
        let dev = Device::Cpu;
        let init = Tensor::randn(0f32, 1.0, (37, 11), &dev).unwrap();
        let (a, b) = (
            Var::from_tensor(&init).unwrap(),
            Var::from_tensor(&init.copy().unwrap()).unwrap(),
        );
        let params = AdamWParams {
            lr: 3e-2,
            eps: 1e-4,
            ..Default::default()
        };
        let mut fused = FusedAdamW::new(&a, params).unwrap();
        let mut reference = candle_nn::AdamW::new(
            vec![b.clone()],
            candle_nn::ParamsAdamW {
                lr: 3e-2,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-4,
                weight_decay: 0.01,
            },
        )
        .unwrap();
        for step in 0..5 {
            let g = Tensor::randn(0f32, 1.0, (37, 11), &dev).unwrap();
            fused.step(&a, &g).unwrap();
            let mut grads = candle_core::backprop::GradStore::default();
            grads.insert(b.as_tensor(), g);
            reference.step(&grads).unwrap();
            let diff = crate::testutil::max_abs_diff(a.as_tensor(), b.as_tensor());
            assert!(diff < 1e-5, "step {step}: {diff}");
        }
    }
}

//! Optimiser updates fused into parallel passes over the parameters.
//!
//! Composed from candle ops, an update builds a full-size temporary tensor per arithmetic step,
//! several of them single-threaded: candle-nn's `AdamW` about a dozen per step, which for the
//! large, single weight of a feature-level adapter is most of a training step. [`FusedAdamW`]
//! is PyTorch's `AdamW` update (decoupled weight decay, bias-corrected moments), element by
//! element, in f32 like PyTorch. [`nesterov_sgd_in_place`] is the Nesterov SGD step of FD-Align's
//! full fine-tuning, written into the parameter and momentum buffers in place.

use anyhow::{ensure, Result};
use candle_core::{CpuStorage, DType, Device, InplaceOp3, Layout, Tensor, Var};
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

/// Elements per parallel task of the SGD passes.
const SGD_CHUNK: usize = 1 << 14;

/// PyTorch's `SGD(momentum, nesterov=True, weight_decay)` step for one parameter, in place:
/// `g' = g + λθ`, `b ← μb + g'`, `θ ← θ − lr·(g' + μb)`, in the order and rounding of the
/// composed tensor ops (so both give the same numbers). A zero `buffer` gives the first step's
/// `b = g'`. Two parallel passes with no temporaries; `None` where it does not apply (not f32
/// on the CPU, shapes that differ, or a strided parameter or buffer), for the caller's composed
/// ops.
pub fn nesterov_sgd_in_place(
    param: &Tensor,
    buffer: &Tensor,
    grad: &Tensor,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
) -> Option<Result<()>> {
    let applies = crate::model::kernels::cpu_f32(&[param, buffer, grad])
        && buffer.shape() == param.shape()
        && grad.shape() == param.shape()
        && param.is_contiguous()
        && buffer.is_contiguous();
    applies.then(|| {
        let grad = grad.contiguous()?;
        let (lr, mu, wd) = (lr as f32, momentum as f32, weight_decay as f32);
        // The buffer first: its pass reads the parameter before the second pass changes it.
        // The closures take the constants by value (`move`): by reference they might alias
        // the destination for all the compiler knows, and the loops stayed scalar (0.05 →
        // 0.10 s per ViT-B/32 step).
        buffer.inplace_op3(
            param,
            &grad,
            &InPlace {
                name: "sgd-momentum",
                f: move |b, p, g| b * mu + (g + p * wd),
            },
        )?;
        param.inplace_op3(
            &grad,
            buffer,
            &InPlace {
                name: "sgd-param",
                f: move |p, g, b| p - ((g + p * wd) + b * mu) * lr,
            },
        )?;
        Ok(())
    })
}

/// `d ← f(d, a, b)` elementwise over a contiguous f32 destination `d` and operands `a`, `b`,
/// in parallel chunks.
struct InPlace<F> {
    name: &'static str,
    f: F,
}

impl<F: Fn(f32, f32, f32) -> f32 + Sync> InplaceOp3 for InPlace<F> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn cpu_fwd(
        &self,
        d: &mut CpuStorage,
        ld: &Layout,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> candle_core::Result<()> {
        use crate::model::kernels::f32_slice;
        let (Some(d), Some(a), Some(b)) = (
            ld.contiguous_offsets().and_then(|(s, e)| match d {
                CpuStorage::F32(v) => Some(&mut v[s..e]),
                _ => None,
            }),
            f32_slice(a, la),
            f32_slice(b, lb),
        ) else {
            candle_core::bail!("{}: contiguous f32 operands expected", self.name)
        };
        d.par_chunks_mut(SGD_CHUNK)
            .zip(a.par_chunks(SGD_CHUNK).zip(b.par_chunks(SGD_CHUNK)))
            .for_each(|(d, (a, b))| {
                for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
                    *d = (self.f)(*d, a, b);
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Optimizer;

    #[test]
    fn in_place_nesterov_sgd_equals_the_composed_ops() {
        let dev = Device::Cpu;
        // Three parallel chunks, the last one partial.
        let shape = (37, 1000);
        let param = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap();
        let buffer = Tensor::zeros(shape, DType::F32, &dev).unwrap();
        let (lr, mu, wd) = (0.05, 0.9, 5e-4);
        let mut p_ref = param.as_tensor().copy().unwrap();
        let mut b_ref: Option<Tensor> = None;
        for step in 0..4 {
            let g = Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
            nesterov_sgd_in_place(param.as_tensor(), &buffer, &g, lr, mu, wd)
                .expect("applies to f32 on the CPU")
                .unwrap();
            // The composed update, with the first step's buffer `g'` rather than zeros.
            let g = (&g + (&p_ref * wd).unwrap()).unwrap();
            let b = match b_ref.take() {
                None => g.clone(),
                Some(b) => ((b * mu).unwrap() + &g).unwrap(),
            };
            let update = (g + (&b * mu).unwrap()).unwrap();
            p_ref = (&p_ref - (update * lr).unwrap()).unwrap();
            let same =
                |a: &Tensor, b: &Tensor| a.to_vec2::<f32>().unwrap() == b.to_vec2::<f32>().unwrap();
            assert!(same(param.as_tensor(), &p_ref), "parameter, step {step}");
            assert!(same(&buffer, &b), "momentum, step {step}");
            b_ref = Some(b);
        }
        // Elsewhere the caller composes the update itself.
        let p64 = Tensor::zeros(3, DType::F64, &dev).unwrap();
        assert!(nesterov_sgd_in_place(&p64, &p64.copy().unwrap(), &p64, lr, mu, wd).is_none());
    }

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

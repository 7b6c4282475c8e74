//! A CLIP vision tower whose every parameter is a trainable [`Var`], for full fine-tuning
//! (FD-Align).
//!
//! The model code is the same as for inference ([`ClipVisionTransformer`]); what differs is
//! where the parameters live. They are created in a [`VarMap`] and then filled from the
//! checkpoint, tensor by tensor, so nothing is left at its initial value (candle's
//! `VarBuilder::from_varmap` + `VarMap::load` route leaves tensors that the stock CLIP only
//! creates conditionally, such as `class_embedding`, random). Gradients reach every parameter
//! because [`super::clip::LayerNorm`], [`super::clip::softmax`] and [`super::clip::Linear`] use
//! differentiable ops whenever the graph is tracked. On the CPU in f32 the encoder layers train
//! as single autograd nodes instead ([`super::fused_layer`]), so [`TrainableVision::backward`],
//! not `loss.backward()`, collects the gradients.
//!
//! Mixed precision works as `torch.autocast` does: the variables (and so the gradients and the
//! optimiser's state) stay in their own dtype, f32, and [`TrainableVision::in_dtype`] gives a
//! tower that computes in f16 or bf16 from casts of them. A 16-bit variable would lose the
//! update itself: at FD-Align's learning rates `lr·g` is far below half a bf16 step of a
//! weight, so pure bf16 weights would not move.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use super::clip::{BuildOptions, ClipVisionTransformer};
use super::fused_layer::GradSink;
use super::hub::ModelFiles;
use super::load::weights_var_builder;
use super::ClipConfig;

pub struct TrainableVision {
    pub varmap: VarMap,
    pub tower: ClipVisionTransformer,
    /// The gradients of the encoder layers that train as single autograd nodes (f32 on the CPU;
    /// [`super::fused_layer`]), collected by [`Self::backward`].
    grad_sink: Arc<GradSink>,
    config: ClipConfig,
    dtype: DType,
    device: Device,
}

impl TrainableVision {
    /// The vision tower and visual projection of a checkpoint, as trainable variables of
    /// `dtype` (f32 for training; f64 for gradient checks).
    pub fn from_files(
        files: &ModelFiles,
        config: &ClipConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let mut tower = build(
            VarBuilder::from_varmap(&varmap, dtype, device),
            config,
            // Trained weights stay the checkpoint's own.
            BuildOptions::default(),
        )?;
        let src = weights_var_builder(&files.weights, dtype, device)?;
        for (name, var) in varmap.data().lock().expect("varmap lock").iter() {
            let value = src.get(var.shape(), name).with_context(|| {
                format!("{}: tensor `{name}`", files.weights.paths()[0].display())
            })?;
            var.set(&value)?;
        }
        let grad_sink = Arc::new(GradSink::default());
        tower.set_grad_sink(Some(grad_sink.clone()));
        Ok(Self {
            varmap,
            tower,
            grad_sink,
            config: config.clone(),
            dtype,
            device: device.clone(),
        })
    }

    /// Trains every encoder layer through candle's graph of its ops, not as one node: the
    /// reference the fused layers are tested against.
    pub fn without_fused_layers(mut self) -> Self {
        self.tower.set_grad_sink(None);
        self
    }

    /// The gradients of `loss` (computed from this tower's [`Self::in_dtype`] forward pass)
    /// with respect to every variable: candle's backward pass plus what the fused layers sent
    /// to the sink. Use this, not `loss.backward()`, which would miss the fused layers'.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        self.grad_sink.clear();
        let mut grads = loss.backward()?;
        self.grad_sink.drain_into(&mut grads)?;
        Ok(grads)
    }

    /// The tower computing in `dtype`: the tower itself when that is the variables' dtype,
    /// otherwise one whose weights are casts of the variables (differentiable, so the gradients
    /// reach the variables, in their dtype). Build it once per step: the casts are taken when
    /// it is built.
    pub fn in_dtype(&self, dtype: DType) -> Result<Cow<'_, ClipVisionTransformer>> {
        if dtype == self.dtype {
            return Ok(Cow::Borrowed(&self.tower));
        }
        let casts = self.tensors(|v| v.as_tensor().to_dtype(dtype))?;
        Ok(Cow::Owned(self.tower_of(
            casts,
            dtype,
            BuildOptions::default(),
        )?))
    }

    /// The current weights as a frozen tower computing in `dtype`, for evaluation: nothing in
    /// it is tracked, so the inference paths (fused kernels, no graph) run. In the variables'
    /// own dtype it shares their storage (no copy), so use it before the next update.
    pub fn frozen(&self, dtype: DType) -> Result<ClipVisionTransformer> {
        let weights = self.tensors(|v| v.as_tensor().detach().to_dtype(dtype))?;
        self.tower_of(weights, dtype, BuildOptions::for_inference(&self.device))
    }

    /// Every trainable variable, sorted by its checkpoint name.
    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = self
            .varmap
            .data()
            .lock()
            .expect("varmap lock")
            .iter()
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn tensors(
        &self,
        f: impl Fn(&Var) -> candle_core::Result<Tensor>,
    ) -> Result<HashMap<String, Tensor>> {
        let data = self.varmap.data().lock().expect("varmap lock");
        Ok(data
            .iter()
            .map(|(n, v)| Ok((n.clone(), f(v)?)))
            .collect::<candle_core::Result<_>>()?)
    }

    fn tower_of(
        &self,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        opts: BuildOptions,
    ) -> Result<ClipVisionTransformer> {
        build(
            VarBuilder::from_tensors(tensors, dtype, &self.device),
            &self.config,
            opts,
        )
    }
}

fn build(vb: VarBuilder, config: &ClipConfig, opts: BuildOptions) -> Result<ClipVisionTransformer> {
    Ok(ClipVisionTransformer::new(
        vb,
        &config.vision_config,
        config.projection_dim,
        opts,
    )?)
}

//! A CLIP vision tower whose every parameter is a trainable [`Var`], for full fine-tuning
//! (FD-Align).
//!
//! The model code is the same as for inference ([`ClipVisionTransformer`]); what differs is
//! where the parameters live. They are created in a [`VarMap`] and then filled from the
//! checkpoint, tensor by tensor, so nothing is left at its initial value (candle's
//! `VarBuilder::from_varmap` + `VarMap::load` route leaves tensors that the stock CLIP only
//! creates conditionally, such as `class_embedding`, random). Gradients reach every parameter
//! because [`super::clip::LayerNorm`], [`super::clip::softmax`] and [`super::clip::Linear`] use
//! differentiable ops whenever the graph is tracked.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Var};
use candle_nn::{VarBuilder, VarMap};

use super::clip::{BuildOptions, ClipVisionTransformer};
use super::hub::ModelFiles;
use super::load::weights_var_builder;
use super::ClipConfig;

pub struct TrainableVision {
    pub varmap: VarMap,
    pub tower: ClipVisionTransformer,
}

impl TrainableVision {
    /// The vision tower and visual projection of a checkpoint, as trainable variables.
    pub fn from_files(
        files: &ModelFiles,
        config: &ClipConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let varmap = VarMap::new();
        let tower = ClipVisionTransformer::new(
            VarBuilder::from_varmap(&varmap, dtype, device),
            &config.vision_config,
            config.projection_dim,
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
        Ok(Self { varmap, tower })
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
}

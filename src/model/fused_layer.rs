//! A vision encoder layer as one autograd node, for full fine-tuning on the CPU in f32.
//!
//! Composed of clipft's kernels, a layer is about twenty nodes of candle's autograd graph, and
//! candle's backward pass adds every gradient onto a zeroed tensor of its input's size
//! (`GradStore::or_insert`): for a ViT-B/32 layer at batch 32 about 140 MB zero-filled and added
//! per step, some 8% of an FD-Align step (perf: `binary_map_vec_par` and `memset`). Here the
//! layer is one node whose only input is the residual stream. Its forward pass runs the
//! inference kernels on detached weights and keeps what the backward pass needs (the layer-norm
//! outputs, the QKV projection, the attention output, the residual after attention and the MLP's
//! pre-activation: what the graph kept). The backward pass makes each gradient once; the
//! parameters' go into a [`GradSink`], which [`super::trainable::TrainableVision::backward`]
//! moves into the gradient store. The arithmetic is the same kernels' as the composed layer's.

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::attention_cpu::{attention, attention_grad};
use super::kernels::{
    dense_bias, dense_bias_add, dense_bias_grads, layer_norm, layer_norm_grads,
    quick_gelu_dense_bias_add,
};

/// Parameter gradients that fused layers computed in a backward pass, keyed by the parameter
/// (a variable's tensor), waiting to join that pass's [`GradStore`].
#[derive(Debug, Default)]
pub struct GradSink(Mutex<Vec<(Tensor, Tensor)>>);

impl GradSink {
    fn push(&self, grads: impl IntoIterator<Item = (Tensor, Tensor)>) {
        self.0.lock().expect("grad sink lock").extend(grads);
    }

    /// Drops gradients left by a backward pass that did not go through [`Self::drain_into`].
    pub fn clear(&self) {
        self.0.lock().expect("grad sink lock").clear();
    }

    /// Moves the gradients into `grads`, adding to any there for the same parameter.
    pub fn drain_into(&self, grads: &mut GradStore) -> Result<()> {
        for (param, g) in std::mem::take(&mut *self.0.lock().expect("grad sink lock")) {
            let g = match grads.get(&param) {
                Some(old) => (old + g)?,
                None => g,
            };
            grads.insert(&param, g);
        }
        Ok(())
    }
}

/// A dense layer's weight `[N, K]` and bias `[N]`.
pub(crate) type Dense = (Tensor, Tensor);

/// The parameters of one pre-norm encoder layer with QuickGELU, as the checkpoint holds them
/// (the variables' own tensors: the gradients are keyed by them).
pub(crate) struct LayerWeights {
    pub ln1: Dense,
    pub eps1: f64,
    pub q: Dense,
    pub k: Dense,
    pub v: Dense,
    /// The attention scale, applied to the query projection.
    pub scale: f64,
    pub out: Dense,
    pub ln2: Dense,
    pub eps2: f64,
    pub fc1: Dense,
    pub fc2: Dense,
    pub heads: usize,
}

/// The layer's output for `x` `[B·T, H]` (`grid` = `(B, T)`, every sequence whole, no mask), as
/// one tracked node whose backward pass sends the parameters' gradients to `sink`. The caller
/// checks that everything is f32 on the CPU and that the attention kernel runs here.
pub(crate) fn forward(
    x: &Tensor,
    grid: (usize, usize),
    w: LayerWeights,
    sink: Arc<GradSink>,
) -> Result<Tensor> {
    let (b, t) = grid;
    let (n, h) = x.dims2()?;
    let d = |p: &Dense| (p.0.detach(), p.1.detach());
    let xd = x.detach();
    let (ln1w, ln1b) = d(&w.ln1);
    let ln1 = norm(&xd, &ln1w, &ln1b, w.eps1)?;
    // The fused QKV layer, the scale folded into the query rows, as inference runs it.
    let stack = |q: &Tensor, k: &Tensor, v: &Tensor| {
        Tensor::cat(&[&(q.detach() * w.scale)?, &k.detach(), &v.detach()], 0)
    };
    let wqkv = stack(&w.q.0, &w.k.0, &w.v.0)?;
    let bqkv = stack(&w.q.1, &w.k.1, &w.v.1)?;
    let qkv = dense_bias(&ln1, &wqkv, &bqkv)?.reshape((b, t, 3 * h))?;
    let att = attention(&qkv, w.heads, None)
        .unwrap_or_else(|| candle_core::bail!("fused layer: the CPU attention kernel is missing"))?
        .reshape((n, h))?;
    let (ow, ob) = d(&w.out);
    let x1 = dense_bias_add(&att, &ow, &ob, &xd)?;
    let (ln2w, ln2b) = d(&w.ln2);
    let ln2 = norm(&x1, &ln2w, &ln2b, w.eps2)?;
    let (f1w, f1b) = d(&w.fc1);
    let pre = dense_bias(&ln2, &f1w, &f1b)?;
    let (f2w, f2b) = d(&w.fc2);
    let y = quick_gelu_dense_bias_add(&pre, &f2w, &f2b, &x1)?;
    x.apply_op1(FusedLayer {
        y: Mutex::new(Some(y)),
        saved: Saved {
            x: xd,
            ln1,
            qkv,
            wqkv,
            att,
            x1,
            ln2,
            pre,
        },
        w,
        sink,
    })
}

fn norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    layer_norm(x, w, b, eps)
        .unwrap_or_else(|| candle_core::bail!("fused layer: f32 CPU operands expected"))
}

/// The activations the backward pass reads.
struct Saved {
    x: Tensor,
    ln1: Tensor,
    /// `[B, T, 3H]`.
    qkv: Tensor,
    wqkv: Tensor,
    att: Tensor,
    x1: Tensor,
    ln2: Tensor,
    pre: Tensor,
}

struct FusedLayer {
    /// The output, computed before the node was made; handed over once by `cpu_fwd`.
    y: Mutex<Option<Tensor>>,
    saved: Saved,
    w: LayerWeights,
    sink: Arc<GradSink>,
}

impl CustomOp1 for FusedLayer {
    fn name(&self) -> &'static str {
        "fused-encoder-layer"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(y) = self.y.lock().expect("fused layer lock").take() else {
            candle_core::bail!("fused layer: run once")
        };
        let (storage, layout) = y.storage_and_layout();
        match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(CpuStorage::F32(v)), Some((start, end))) => Ok((
                CpuStorage::F32(v[start..end].to_vec()),
                layout.shape().clone(),
            )),
            _ => candle_core::bail!("fused layer: a contiguous f32 CPU output expected"),
        }
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let (s, w) = (&self.saved, &self.w);
        let (b, t, h3) = s.qkv.dims3()?;
        let h = h3 / 3;
        let dy = dy.detach().contiguous()?;
        let dense = |x: &Tensor, w: &Tensor, g: &Tensor, gelu_input: bool| {
            let (dx, dw, db) = dense_bias_grads(x, &w.detach(), g, gelu_input, true)?;
            Ok::<_, candle_core::Error>((dx.expect("asked for"), dw, db))
        };
        let (dpre, dw_fc2, db_fc2) = dense(&s.pre, &w.fc2.0, &dy, true)?;
        let (dln2, dw_fc1, db_fc1) = dense(&s.ln2, &w.fc1.0, &dpre, false)?;
        let (dx1, dw_ln2, db_ln2) = norm_grads(&s.x1, &w.ln2.0, &dln2, w.eps2)?;
        let dx1 = (dx1 + &dy)?;
        let (datt, dw_out, db_out) = dense(&s.att, &w.out.0, &dx1, false)?;
        let dqkv =
            attention_grad(&s.qkv, w.heads, &datt.reshape((b, t, h))?)?.reshape((b * t, h3))?;
        let (dln1, dwqkv, dbqkv) = dense(&s.ln1, &s.wqkv, &dqkv, false)?;
        let (dx, dw_ln1, db_ln1) = norm_grads(&s.x, &w.ln1.0, &dln1, w.eps1)?;
        let dx = (dx + dx1)?;
        // The query rows were scaled in the forward pass.
        let part = |g: &Tensor, i: usize| g.narrow(0, i * h, h)?.contiguous();
        let (dwq, dbq) = ((part(&dwqkv, 0)? * w.scale)?, (part(&dbqkv, 0)? * w.scale)?);
        self.sink.push([
            (w.ln1.0.clone(), dw_ln1),
            (w.ln1.1.clone(), db_ln1),
            (w.q.0.clone(), dwq),
            (w.q.1.clone(), dbq),
            (w.k.0.clone(), part(&dwqkv, 1)?),
            (w.k.1.clone(), part(&dbqkv, 1)?),
            (w.v.0.clone(), part(&dwqkv, 2)?),
            (w.v.1.clone(), part(&dbqkv, 2)?),
            (w.out.0.clone(), dw_out),
            (w.out.1.clone(), db_out),
            (w.ln2.0.clone(), dw_ln2),
            (w.ln2.1.clone(), db_ln2),
            (w.fc1.0.clone(), dw_fc1),
            (w.fc1.1.clone(), db_fc1),
            (w.fc2.0.clone(), dw_fc2),
            (w.fc2.1.clone(), db_fc2),
        ]);
        Ok(Some(dx))
    }
}

fn norm_grads(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    layer_norm_grads(x, &w.detach(), g, eps as f32)
        .unwrap_or_else(|| candle_core::bail!("fused layer: f32 CPU operands expected"))
}

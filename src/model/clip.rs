//! The CLIP dual encoder (`transformers`' `CLIPModel`) in candle.
//!
//! One file per model, as in candle-transformers, but owned here because clipft needs what the
//! stock model does not give: `hidden_act` from the config for both towers, `transformers`' exact
//! EOS pooling, and a vision tower that stays differentiable end to end for fine-tuning
//! (candle's fused layer-norm and softmax kernels have no backward pass, so [`LayerNorm`] and
//! [`softmax`] switch to composed ops whenever the graph is being tracked).

use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};

use super::config::{Activation, ClipConfig, ClipTextConfig, ClipVisionConfig};
use super::fused_layer::GradSink;
use super::gemm_bf16::{PackedView, PackedWeight};

/// How the model's graph is built; the function it computes is the same either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BuildOptions {
    /// QuickGELU's 1.702 folded into the weights of the MLP around it: `fc2(QuickGELU(fc1·x))
    /// = (fc2 / 1.702)(SiLU((1.702·fc1)·x))`, scaled in f32 and rounded to the model's dtype
    /// once. The activation is then candle's one SiLU kernel instead of a scale, a sigmoid and
    /// a product (16% of a bf16 encoder layer on an H100). Only for frozen weights: a tower
    /// built to be trained leaves it off, so its variables stay the checkpoint's. Off on the
    /// CPU too, where clipft's kernels take QuickGELU in one pass or inside the GEMM already.
    pub fold_quick_gelu: bool,
}

impl BuildOptions {
    /// What inference on `device` uses.
    pub fn for_inference(device: &Device) -> Self {
        Self {
            fold_quick_gelu: !device.is_cpu(),
        }
    }
}

/// `QuickGELU(x) = x · σ(QUICK_GELU_ALPHA · x)`.
const QUICK_GELU_ALPHA: f64 = 1.702;

/// Layer normalisation that keeps gradients flowing.
///
/// candle-nn's `LayerNorm::forward` takes a fused kernel on contiguous input that records no
/// backward op, which silently stops gradients. On the CPU in f32 clipft's own fused op runs,
/// with a backward pass ([`super::kernels::layer_norm`]); elsewhere candle-nn's kernel when
/// nothing in the computation is tracked (inference), else clipft's CUDA op with its backward
/// pass where it applies ([`super::cuda::layer_norm`]), else the formula built from
/// differentiable ops.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        // Tracked or not: vectorised two-pass statistics, where candle-nn's kernel sums E[x]
        // and E[x²] in one scalar loop.
        if let Some(y) = super::kernels::layer_norm(xs, &self.weight, &self.bias, self.eps) {
            return y;
        }
        if xs.track_op() || self.weight.track_op() || self.bias.track_op() {
            if let Some(y) = super::cuda::layer_norm(xs, &self.weight, &self.bias, self.eps) {
                return y;
            }
            let dtype = xs.dtype();
            // Statistics in at least f32 (f64 stays f64, for gradient checks).
            let x = at_least_f32(xs)?;
            let mean = x.mean_keepdim(D::Minus1)?;
            let x = x.broadcast_sub(&mean)?;
            let var = x.sqr()?.mean_keepdim(D::Minus1)?;
            let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
            x.to_dtype(dtype)?
                .broadcast_mul(&self.weight)?
                .broadcast_add(&self.bias)
        } else {
            candle_nn::ops::layer_norm(&xs.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

/// A dense layer `x·Wᵀ + b` over the last dimension.
///
/// candle-nn's `Linear` multiplies a `[B, T, H]` input batch by batch (B small GEMMs of T rows);
/// flattening to `[B·T, H]` makes it one large GEMM, which the CPU backend runs several times
/// faster, with the bias fused into it ([`super::kernels::dense_bias`]). Differentiable, so it
/// trains as well. With [`Linear::pack_bf16`] (inference on the CPU) the products are taken in
/// bf16 instead ([`super::gemm_bf16`]).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    packed: Option<PackedView>,
}

impl Linear {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
            bias: if bias {
                Some(vb.get(out_dim, "bias")?)
            } else {
                None
            },
            packed: None,
        })
    }

    /// The layer with weight `w_scale · W` and bias `b_scale · b`, read in f32 and rounded to
    /// the model's dtype once.
    fn new_scaled(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        w_scale: f64,
        b_scale: f64,
    ) -> Result<Self> {
        let dtype = vb.dtype();
        let vb = vb.to_dtype(DType::F32);
        Ok(Self {
            weight: (vb.get((out_dim, in_dim), "weight")? * w_scale)?.to_dtype(dtype)?,
            bias: Some((vb.get(out_dim, "bias")? * b_scale)?.to_dtype(dtype)?),
            packed: None,
        })
    }

    /// Keeps a bf16 copy of the weights in the CPU kernel's layout; untracked inputs are then
    /// multiplied in bf16 (products summed in f32), tracked ones still in f32.
    fn pack_bf16(&mut self) -> Result<()> {
        let (n, k) = self.weight.dims2()?;
        let w = self
            .weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let b = match &self.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        self.packed = Some(PackedView::new(PackedWeight::new(&w, n, k, b.as_deref())));
        Ok(())
    }

    /// Output features `[from, from + n)` as a layer of their own.
    fn narrow_out(&self, from: usize, n: usize) -> Result<Linear> {
        Ok(Linear {
            weight: self.weight.narrow(0, from, n)?,
            bias: self
                .bias
                .as_ref()
                .map(|b| b.narrow(0, from, n))
                .transpose()?,
            packed: self.packed.as_ref().and_then(|p| p.narrow(from, n)),
        })
    }
}

/// `x·Wᵀ (+ b)` for a 2-D `x`.
fn dense(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    match b {
        Some(b) => super::kernels::dense_bias(x, w, b),
        None => x.matmul(&w.t()?),
    }
}

impl Linear {
    /// `act(x·Wᵀ + b) (+ residual)` through clipft's CUDA epilogue, where it applies
    /// ([`super::cuda`]).
    fn forward_cuda(
        &self,
        xs: &Tensor,
        residual: Option<&Tensor>,
        act: super::cuda::Act,
    ) -> Option<Result<Tensor>> {
        let b = self.bias.as_ref()?;
        if !super::cuda::applies([xs, &self.weight, b].into_iter().chain(residual)) {
            return None;
        }
        Some(self.apply(xs, |x| {
            let rows = |r: &Tensor| r.reshape((x.dim(0)?, self.weight.dim(0)?));
            let r = residual.map(rows).transpose()?;
            super::cuda::dense(x, &self.weight, b, r.as_ref(), act)
        }))
    }

    /// `act(x·Wᵀ + b)`, with QuickGELU inside the bf16 GEMM when the layer is packed.
    fn forward_act(&self, xs: &Tensor, act: Activation) -> Result<Tensor> {
        if let Some(y) = self.forward_cuda(xs, None, act.into()) {
            return y;
        }
        match self.packed_for(xs, None) {
            Some(p) if act == Activation::QuickGelu => {
                self.apply(xs, |x| super::kernels::dense_bf16(x, p, true))
            }
            _ => activate(act, &self.forward(xs)?),
        }
    }

    /// `residual + x·Wᵀ + b`, the residual added inside the GEMM's output (bf16 when the layer
    /// is packed; f32 on the CPU when nothing is tracked).
    fn forward_residual(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_cuda(xs, Some(residual), super::cuda::Act::None) {
            return y;
        }
        let rows = |x: &Tensor| residual.reshape((x.dim(0)?, self.weight.dim(0)?));
        match (self.packed_for(xs, Some(residual)), &self.bias) {
            (Some(p), _) => self.apply(xs, |x| super::kernels::dense_bf16_add(x, p, &rows(x)?)),
            (None, Some(b)) => self.apply(xs, |x| {
                super::kernels::dense_bias_add(x, &self.weight, b, &rows(x)?)
            }),
            (None, None) => residual + self.forward(xs)?,
        }
    }

    /// `QuickGELU(pre)·Wᵀ + b`: for training, the activation taken inside this layer's op keeps
    /// only `pre` alive for the backward pass ([`super::kernels::quick_gelu_dense_bias`]).
    fn forward_after_quick_gelu(&self, pre: &Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => self.apply(pre, |x| {
                super::kernels::quick_gelu_dense_bias(x, &self.weight, b)
            }),
            None => self.forward(&super::kernels::quick_gelu(pre)?),
        }
    }

    /// The packed weights, when nothing here needs a gradient.
    fn packed_for(&self, xs: &Tensor, residual: Option<&Tensor>) -> Option<&PackedView> {
        let tracked = xs.track_op() || residual.is_some_and(Tensor::track_op);
        self.packed.as_ref().filter(|_| !tracked)
    }

    /// `f` on `xs` flattened to `[rows, in]`, its `[rows, out]` result shaped like `xs`.
    fn apply(&self, xs: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let mut dims = xs.dims().to_vec();
        let in_dim = *dims.last().expect("non-scalar input");
        let y = f(&xs.reshape((xs.elem_count() / in_dim, in_dim))?)?;
        *dims.last_mut().expect("non-scalar input") = self.weight.dim(0)?;
        y.reshape(dims)
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_cuda(xs, None, super::cuda::Act::None) {
            return y;
        }
        self.apply(xs, |x| match self.packed_for(xs, None) {
            Some(p) => super::kernels::dense_bf16(x, p, false),
            None => dense(x, &self.weight, self.bias.as_ref()),
        })
    }
}

/// Softmax over the last dimension; candle's fused kernel for inference, a differentiable one
/// when tracked ([`super::kernels::softmax_last_dim`] on CPU f32, composed ops elsewhere, in
/// f32 for 16-bit input as under `torch.autocast`: a 16-bit sum over the keys would round).
pub fn softmax(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        if let Some(y) = super::kernels::softmax_last_dim(xs) {
            return y;
        }
        let dtype = xs.dtype();
        let x = at_least_f32(xs)?;
        let max = x.max_keepdim(D::Minus1)?.detach();
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.to_dtype(dtype)
    } else {
        candle_nn::ops::softmax_last_dim(&xs.contiguous()?)
    }
}

/// `xs` in f32 when it is 16-bit, as it is otherwise: where a reduction must not round to 16 bits.
fn at_least_f32(xs: &Tensor) -> Result<Tensor> {
    match xs.dtype() {
        DType::F16 | DType::BF16 => xs.to_dtype(DType::F32),
        _ => Ok(xs.clone()),
    }
}

fn activate(act: Activation, xs: &Tensor) -> Result<Tensor> {
    match act {
        Activation::QuickGelu => super::kernels::quick_gelu(xs),
        Activation::Gelu => xs.gelu_erf(),
        Activation::GeluNew => xs.gelu(),
    }
}

/// The query, key and value projections. Both run as one `[3H, H]` layer with the attention
/// scale folded into the query rows: one GEMM that reads the input once instead of three, and
/// one `[B, T, 3H]` output the attention core reads directly.
#[derive(Debug, Clone)]
enum Qkv {
    /// Three layers, as in the checkpoint: used when the weights are trained (the optimiser
    /// updates the checkpoint's own variables); concatenated at each forward pass, a
    /// differentiable op, so their gradients flow back to them.
    Separate {
        q: Linear,
        k: Linear,
        v: Linear,
        scale: f64,
    },
    /// Concatenated once, for inference.
    Fused(Linear),
}

impl Qkv {
    fn fuse(q: &Linear, k: &Linear, v: &Linear, scale: f64) -> Result<Linear> {
        let bias = |l: &Linear| l.bias.clone().expect("q/k/v projections have biases");
        Ok(Linear {
            weight: Tensor::cat(&[&(&q.weight * scale)?, &k.weight, &v.weight], 0)?,
            bias: Some(Tensor::cat(&[&(bias(q) * scale)?, &bias(k), &bias(v)], 0)?),
            packed: None,
        })
    }

    /// The `[3H, H]` layer.
    fn linear(&self) -> Result<std::borrow::Cow<'_, Linear>> {
        Ok(match self {
            Qkv::Separate { q, k, v, scale } => {
                std::borrow::Cow::Owned(Self::fuse(q, k, v, *scale)?)
            }
            Qkv::Fused(l) => std::borrow::Cow::Borrowed(l),
        })
    }
}

/// Where the rows of a `[N, H]` activation sit in the `[B, T]` grid of sequences.
///
/// The vision tower's sequences all have one length, so its rows are the whole grid. Text
/// sequences differ, and under the causal mask nothing after a sequence's pooled (EOS) token
/// reaches it, so the text tower keeps only the tokens up to each EOS, packed into rows: the
/// dense layers (nearly all the work) skip the padding, and only the attention scores see the
/// padded grid.
#[derive(Debug, Clone)]
enum Rows {
    Grid {
        b: usize,
        t: usize,
    },
    Packed {
        b: usize,
        t: usize,
        /// First row of each sequence.
        starts: Vec<usize>,
        /// `[N]` u32: the grid cell (`i·T + p`) of each row.
        cells: Tensor,
        /// `[B·T]` u32: the row of each grid cell, `N` (a zero row) for padding.
        rows: Tensor,
    },
}

impl Rows {
    /// Sequences of these lengths: the full grid when they are all equal, packed otherwise.
    fn new(lens: &[usize], device: &Device) -> Result<Self> {
        let b = lens.len();
        let t = lens.iter().copied().max().unwrap_or(0);
        if lens.iter().all(|&l| l == t) {
            return Ok(Rows::Grid { b, t });
        }
        let mut starts = Vec::with_capacity(b);
        let mut cells = Vec::new();
        let n: usize = lens.iter().sum();
        let mut rows = vec![n as u32; b * t];
        for (i, &len) in lens.iter().enumerate() {
            starts.push(cells.len());
            for p in 0..len {
                rows[i * t + p] = cells.len() as u32;
                cells.push((i * t + p) as u32);
            }
        }
        Ok(Rows::Packed {
            b,
            t,
            starts,
            cells: Tensor::from_vec(cells, n, device)?,
            rows: Tensor::from_vec(rows, b * t, device)?,
        })
    }

    fn grid(&self) -> (usize, usize) {
        match self {
            Rows::Grid { b, t } | Rows::Packed { b, t, .. } => (*b, *t),
        }
    }

    /// `[N, C]` rows to the `[B, T, C]` grid, padding cells zero.
    fn grid_of(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t) = self.grid();
        let c = x.dim(1)?;
        match self {
            Rows::Grid { .. } => x.reshape((b, t, c)),
            Rows::Packed { rows, .. } => {
                let zero = Tensor::zeros((1, c), x.dtype(), x.device())?;
                Tensor::cat(&[x, &zero], 0)?
                    .index_select(rows, 0)?
                    .reshape((b, t, c))
            }
        }
    }

    /// `[B, T, C]` grid to `[N, C]` rows.
    fn rows_of(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        match self {
            Rows::Grid { .. } => x.reshape((b * t, c)),
            Rows::Packed { cells, .. } => x.reshape((b * t, c))?.index_select(cells, 0),
        }
    }

    /// The tables of clipft's CUDA attention kernel for `n` rows: every row a query
    /// (`full`), and row `pos[i]` of each sequence the only query (`pooled`, output row `i`).
    fn cuda_seqs(&self, n: usize, pos: &[usize], device: &Device) -> Result<CudaSeqs> {
        let (b, t) = self.grid();
        let (mut full, mut pooled) = (Vec::with_capacity(b), Vec::with_capacity(b));
        for (i, &p) in pos.iter().enumerate().take(b) {
            let (start, len) = match self {
                Rows::Grid { .. } => (i * t, t),
                Rows::Packed { starts, .. } => {
                    let end = starts.get(i + 1).copied().unwrap_or(n);
                    (starts[i], end - starts[i])
                }
            };
            let seq = |item_start: usize, items: usize, pos0: usize| super::cuda::Seq {
                kv_start: start as u32,
                kv_len: len as u32,
                item_start: item_start as u32,
                items: items as u32,
                pos0: pos0 as u32,
            };
            full.push(seq(start, len, 0));
            pooled.push(seq(i, 1, p));
        }
        Ok(CudaSeqs {
            full: super::cuda::SeqTable::new(&full, device)?,
            pooled: super::cuda::SeqTable::new(&pooled, device)?,
        })
    }

    /// Row `pos[i]` of each sequence `i`, `[B, C]`.
    fn select(&self, x: &Tensor, pos: &[usize]) -> Result<Tensor> {
        let (b, t) = self.grid();
        let c = x.dim(1)?;
        if matches!(self, Rows::Grid { .. }) && pos.iter().all(|&p| p == 0) {
            return x.reshape((b, t, c))?.narrow(1, 0, 1)?.reshape((b, c));
        }
        let idx: Vec<u32> = pos
            .iter()
            .enumerate()
            .map(|(i, &p)| match self {
                Rows::Grid { .. } => (i * t + p) as u32,
                Rows::Packed { starts, .. } => (starts[i] + p) as u32,
            })
            .collect();
        x.index_select(&Tensor::from_vec(idx, b, x.device())?, 0)
    }
}

/// A batch's sequences for clipft's CUDA attention kernel ([`Rows::cuda_seqs`]).
struct CudaSeqs {
    full: super::cuda::SeqTable,
    pooled: super::cuda::SeqTable,
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Qkv,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(vb: VarBuilder, hidden: usize, num_heads: usize) -> Result<Self> {
        let lin = |name| Linear::new(vb.pp(name), hidden, hidden, true);
        let head_dim = hidden / num_heads;
        let (q, k, v) = (lin("q_proj")?, lin("k_proj")?, lin("v_proj")?);
        let scale = (head_dim as f64).powf(-0.5);
        let qkv = if q.weight.track_op() || k.weight.track_op() || v.weight.track_op() {
            Qkv::Separate { q, k, v, scale }
        } else {
            Qkv::Fused(Qkv::fuse(&q, &k, &v, scale)?)
        };
        Ok(Self {
            qkv,
            out_proj: lin("out_proj")?,
            num_heads,
            head_dim,
        })
    }

    /// `residual` + self-attention over `xs` `[N, H]` (placed by `rows`), `[N, H]`.
    fn forward(
        &self,
        xs: &Tensor,
        rows: &Rows,
        mask: Option<&Tensor>,
        seqs: Option<&CudaSeqs>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let qkv = self.qkv.linear()?.forward(xs)?;
        self.forward_qkv(&qkv, rows, mask, seqs, residual)
    }

    /// [`Self::forward`] from the QKV layer's output `[N, 3H]`.
    fn forward_qkv(
        &self,
        qkv: &Tensor,
        rows: &Rows,
        mask: Option<&Tensor>,
        seqs: Option<&CudaSeqs>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let (b, t) = rows.grid();
        let (nh, hd) = (self.num_heads, self.head_dim);
        let h = nh * hd;
        // The only mask there is is the text tower's causal one.
        let cuda = seqs.and_then(|s| {
            super::cuda::attention(qkv, qkv, h, 2 * h, &s.full, nh, hd, mask.is_some())
        });
        if let Some(out) = cuda {
            return self.out_proj.forward_residual(&out?, residual);
        }
        let y = rows.grid_of(qkv)?;
        let out = match super::attention_cpu::attention(&y, nh, mask) {
            Some(out) => out?,
            None => {
                // [B, T, 3H] -> [3, B, heads, T, head_dim] in one copy.
                let y = y
                    .reshape((b, t, 3, nh, hd))?
                    .permute((2, 0, 3, 1, 4))?
                    .contiguous()?;
                self.attend(&y.get(0)?, &y.get(1)?, &y.get(2)?, mask)?
            }
        };
        self.out_proj
            .forward_residual(&rows.rows_of(&out)?, residual)
    }

    fn pack_bf16(&mut self) -> Result<()> {
        // Trained projections (`Separate`) run in f32 whatever is packed.
        if let Qkv::Fused(qkv) = &mut self.qkv {
            qkv.pack_bf16()?;
        }
        self.out_proj.pack_bf16()
    }

    /// `[B, T, H]` -> `[B, heads, T, head_dim]`, contiguous.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Scaled queries, keys and values (`[B, heads, T, head_dim]`) to the attention output
    /// before its projection, `[B, Tq, H]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, _, tq, _) = q.dims4()?;
        let mut attn = q.matmul(&k.t()?)?;
        if let Some(mask) = mask {
            attn = attn.broadcast_add(mask)?;
        }
        let attn = softmax(&attn)?;
        attn.matmul(v)?
            .transpose(1, 2)?
            .reshape((b, tq, self.num_heads * self.head_dim))
    }

    /// `residual` + attention output for one query row per sequence, `[B, H]`: keys and values
    /// from every row of `xs` `[N, H]`, queries from `q_xs` `[B, H]`, `mask` `[B, 1, 1, T]`.
    fn forward_pooled(
        &self,
        xs: &Tensor,
        rows: &Rows,
        q_xs: &Tensor,
        mask: Option<&Tensor>,
        seqs: Option<&CudaSeqs>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let (b, t) = rows.grid();
        let h = xs.dim(1)?;
        let (nh, hd) = (self.num_heads, self.head_dim);
        // Rows [0, H) of the fused layer are the (pre-scaled) queries, [H, 3H) keys and values.
        let qkv = self.qkv.linear()?;
        let kv = qkv.narrow_out(h, 2 * h)?.forward(xs)?;
        let q = qkv.narrow_out(0, h)?.forward(q_xs)?;
        let cuda = seqs
            .and_then(|s| super::cuda::attention(&q, &kv, 0, h, &s.pooled, nh, hd, mask.is_some()));
        if let Some(out) = cuda {
            return self.out_proj.forward_residual(&out?, residual);
        }
        let kv = rows
            .grid_of(&kv)?
            .reshape((b, t, 2, nh, hd))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let q = self.split_heads(&q.reshape((b, 1, h))?)?;
        let (k, v) = (kv.get(0)?, kv.get(1)?);
        let out = self.attend(&q, &k, &v, mask)?.reshape((b, h))?;
        self.out_proj.forward_residual(&out, residual)
    }
}

#[derive(Debug, Clone)]
struct EncoderLayer {
    self_attn: Attention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    act: Activation,
    /// `fc1` and `fc2` hold QuickGELU's constant; the activation is SiLU
    /// ([`BuildOptions::fold_quick_gelu`]).
    silu_folded: bool,
    /// Where the layer, trained on the CPU in f32, runs as one autograd node
    /// ([`super::fused_layer`]) and sends its parameters' gradients.
    grad_sink: Option<Arc<GradSink>>,
}

impl EncoderLayer {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        hidden: usize,
        inter: usize,
        heads: usize,
        eps: f64,
        act: Activation,
        opts: BuildOptions,
    ) -> Result<Self> {
        let silu_folded = opts.fold_quick_gelu && act == Activation::QuickGelu;
        let (fc1, fc2) = if silu_folded {
            let a = QUICK_GELU_ALPHA;
            (
                Linear::new_scaled(vb.pp("mlp.fc1"), hidden, inter, a, a)?,
                Linear::new_scaled(vb.pp("mlp.fc2"), inter, hidden, 1.0 / a, 1.0)?,
            )
        } else {
            (
                Linear::new(vb.pp("mlp.fc1"), hidden, inter, true)?,
                Linear::new(vb.pp("mlp.fc2"), inter, hidden, true)?,
            )
        };
        Ok(Self {
            self_attn: Attention::new(vb.pp("self_attn"), hidden, heads)?,
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), hidden, eps)?,
            fc1,
            fc2,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), hidden, eps)?,
            act,
            silu_folded,
            grad_sink: None,
        })
    }

    /// `xs` `[N, H]` (placed by `rows`) through the layer.
    fn forward(
        &self,
        xs: &Tensor,
        rows: &Rows,
        mask: Option<&Tensor>,
        seqs: Option<&CudaSeqs>,
    ) -> Result<Tensor> {
        if let Some(y) = self.forward_fused(xs, rows, mask) {
            return y;
        }
        let xs = match self.qkv_bf16(xs) {
            Some(qkv) => self.self_attn.forward_qkv(&qkv?, rows, mask, seqs, xs)?,
            None => {
                let normed = self.layer_norm1.forward(xs)?;
                self.self_attn.forward(&normed, rows, mask, seqs, xs)?
            }
        };
        self.mlp_block(&xs)
    }

    /// The layer as one autograd node ([`super::fused_layer`]) when it is being trained (a
    /// gradient sink is set and `xs` is tracked) on the CPU in f32 with QuickGELU, whole
    /// sequences and no mask (the vision tower); `None` otherwise.
    fn forward_fused(
        &self,
        xs: &Tensor,
        rows: &Rows,
        mask: Option<&Tensor>,
    ) -> Option<Result<Tensor>> {
        let sink = self.grad_sink.as_ref()?;
        let Qkv::Separate { q, k, v, scale } = &self.self_attn.qkv else {
            return None;
        };
        let shape_fits = mask.is_none()
            && matches!(rows, Rows::Grid { .. })
            && self.act == Activation::QuickGelu
            && !self.silu_folded
            && xs.track_op()
            && super::vmath::isa().is_some();
        if !shape_fits {
            return None;
        }
        let dense = |l: &Linear| Some((l.weight.clone(), l.bias.clone()?));
        let norm = |l: &LayerNorm| (l.weight.clone(), l.bias.clone());
        let w = super::fused_layer::LayerWeights {
            ln1: norm(&self.layer_norm1),
            eps1: self.layer_norm1.eps,
            q: dense(q)?,
            k: dense(k)?,
            v: dense(v)?,
            scale: *scale,
            out: dense(&self.self_attn.out_proj)?,
            ln2: norm(&self.layer_norm2),
            eps2: self.layer_norm2.eps,
            fc1: dense(&self.fc1)?,
            fc2: dense(&self.fc2)?,
            heads: self.self_attn.num_heads,
        };
        let params = [&w.ln1, &w.q, &w.k, &w.v, &w.out, &w.ln2, &w.fc1, &w.fc2];
        let tensors: Vec<&Tensor> = params.iter().flat_map(|(a, b)| [a, b]).collect();
        super::kernels::cpu_f32(&[&tensors[..], &[xs]].concat())
            .then(|| super::fused_layer::forward(xs, rows.grid(), w, sink.clone()))
    }

    /// The fused QKV layer's output for `LN1(xs)` as one op, when the layer is packed and nothing
    /// is tracked ([`super::kernels::ln_dense_bf16`]).
    fn qkv_bf16(&self, xs: &Tensor) -> Option<Result<Tensor>> {
        let ln = &self.layer_norm1;
        let Qkv::Fused(qkv) = &self.self_attn.qkv else {
            return None;
        };
        if ln.weight.track_op() || ln.bias.track_op() {
            return None;
        }
        let packed = qkv.packed_for(xs, None)?;
        Some(qkv.apply(xs, |x| {
            super::kernels::ln_dense_bf16(x, (&ln.weight, &ln.bias, ln.eps), packed)
        }))
    }

    fn pack_bf16(&mut self) -> Result<()> {
        self.self_attn.pack_bf16()?;
        self.fc1.pack_bf16()?;
        self.fc2.pack_bf16()
    }

    /// `x + MLP(LN2(x))`, the second half of the layer.
    fn mlp_block(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.mlp_block_bf16(xs) {
            return y;
        }
        let x = self.layer_norm2.forward(xs)?;
        if self.silu_folded {
            let h = match self.fc1.forward_cuda(&x, None, super::cuda::Act::Silu) {
                Some(h) => h?,
                None => self.fc1.forward(&x)?.silu()?,
            };
            return self.fc2.forward_residual(&h, xs);
        }
        if self.act == Activation::QuickGelu && x.track_op() {
            return xs + self.fc2.forward_after_quick_gelu(&self.fc1.forward(&x)?)?;
        }
        let h = self.fc1.forward_act(&x, self.act)?;
        self.fc2.forward_residual(&h, xs)
    }

    /// [`Self::mlp_block`] as one op when both layers are packed and nothing is tracked
    /// ([`super::kernels::mlp_bf16`]).
    fn mlp_block_bf16(&self, xs: &Tensor) -> Option<Result<Tensor>> {
        let ln = &self.layer_norm2;
        // (A folded layer's activation is SiLU on rescaled weights.)
        if self.act != Activation::QuickGelu
            || self.silu_folded
            || ln.weight.track_op()
            || ln.bias.track_op()
        {
            return None;
        }
        let (fc1, fc2) = (
            self.fc1.packed_for(xs, None)?,
            self.fc2.packed_for(xs, None)?,
        );
        let ln = (&ln.weight, &ln.bias, ln.eps);
        Some(
            self.fc2
                .apply(xs, |x| super::kernels::mlp_bf16(x, ln, fc1, fc2)),
        )
    }

    /// The layer's output at row `pos[i]` of each sequence only, `[B, H]`: the same values as
    /// `forward` gives there (attention still reads every row), without the other rows' MLP.
    fn forward_pooled(
        &self,
        xs: &Tensor,
        rows: &Rows,
        mask: Option<&Tensor>,
        seqs: Option<&CudaSeqs>,
        pos: &[usize],
    ) -> Result<Tensor> {
        let normed = self.layer_norm1.forward(xs)?;
        let xs = self.self_attn.forward_pooled(
            &normed,
            rows,
            &rows.select(&normed, pos)?,
            mask,
            seqs,
            &rows.select(xs, pos)?,
        )?;
        self.mlp_block(&xs)
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    layers: Vec<EncoderLayer>,
}

impl Encoder {
    #[allow(clippy::too_many_arguments)]
    fn new(
        vb: VarBuilder,
        n: usize,
        hidden: usize,
        inter: usize,
        heads: usize,
        eps: f64,
        act: Activation,
        opts: BuildOptions,
    ) -> Result<Self> {
        let layers = (0..n)
            .map(|i| {
                let vb = vb.pp(format!("layers.{i}"));
                EncoderLayer::new(vb, hidden, inter, heads, eps, act, opts)
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    fn pack_bf16(&mut self) -> Result<()> {
        self.layers.iter_mut().try_for_each(EncoderLayer::pack_bf16)
    }

    fn set_grad_sink(&mut self, sink: Option<Arc<GradSink>>) {
        for l in &mut self.layers {
            l.grad_sink = sink.clone();
        }
    }

    /// The last layer's output at row `pos[i]` of each sequence, `[B, H]`, for input rows `xs`
    /// `[N, H]` placed by `rows`: CLIP pools one token, so the last layer computes its attention
    /// and MLP for that row alone (about 7% of a ViT-B/32 forward). `mask`, if any, is the
    /// `[T, T]` additive attention mask.
    fn forward_pooled(
        &self,
        xs: &Tensor,
        rows: &Rows,
        mask: Option<&Tensor>,
        pos: &[usize],
    ) -> Result<Tensor> {
        let Some((last, rest)) = self.layers.split_last() else {
            return rows.select(xs, pos);
        };
        // Everything uploaded before the layers run: an upload waits for the GPU's queue.
        let seqs = if super::cuda::applies([xs]) {
            Some(rows.cuda_seqs(xs.dim(0)?, pos, xs.device())?)
        } else {
            None
        };
        let mask_rows = match mask {
            Some(m) => {
                let (t, _) = m.dims2()?;
                let idx = Tensor::from_vec(
                    pos.iter().map(|&p| p as u32).collect::<Vec<_>>(),
                    pos.len(),
                    m.device(),
                )?;
                Some(m.index_select(&idx, 0)?.reshape((pos.len(), 1, 1, t))?)
            }
            None => None,
        };
        let xs = rest.iter().try_fold(xs.clone(), |xs, l| {
            l.forward(&xs, rows, mask, seqs.as_ref())
        })?;
        last.forward_pooled(&xs, rows, mask_rows.as_ref(), seqs.as_ref(), pos)
    }
}

/// `CLIPTextTransformer` plus `text_projection`.
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: Encoder,
    final_layer_norm: LayerNorm,
    projection: Linear,
    cfg: ClipTextConfig,
}

impl ClipTextTransformer {
    pub fn new(
        vb: VarBuilder,
        cfg: &ClipTextConfig,
        projection_dim: usize,
        opts: BuildOptions,
    ) -> Result<Self> {
        let tm = vb.pp("text_model");
        let emb = tm.pp("embeddings");
        Ok(Self {
            token_embedding: candle_nn::embedding(
                cfg.vocab_size,
                cfg.hidden_size,
                emb.pp("token_embedding"),
            )?,
            position_embedding: emb.get(
                (cfg.max_position_embeddings, cfg.hidden_size),
                "position_embedding.weight",
            )?,
            encoder: Encoder::new(
                tm.pp("encoder"),
                cfg.num_hidden_layers,
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_attention_heads,
                cfg.layer_norm_eps,
                cfg.hidden_act,
                opts,
            )?,
            final_layer_norm: LayerNorm::new(
                tm.pp("final_layer_norm"),
                cfg.hidden_size,
                cfg.layer_norm_eps,
            )?,
            projection: Linear::new(
                vb.pp("text_projection"),
                cfg.hidden_size,
                projection_dim,
                false,
            )?,
            cfg: cfg.clone(),
        })
    }

    /// Position of the pooled token in each row, exactly as `transformers` chooses it: the legacy
    /// configs (`eos_token_id == 2`) take the argmax of the ids (the EOS id is the largest in the
    /// CLIP vocabulary), newer ones the first occurrence of `eos_token_id`.
    pub fn pooled_positions(&self, ids: &[Vec<u32>]) -> Vec<usize> {
        ids.iter()
            .map(|row| {
                if self.cfg.eos_token_id == 2 {
                    // First index of the maximum, as torch.argmax returns.
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&x| x == max).unwrap_or(0)
                } else {
                    row.iter()
                        .position(|&x| x == self.cfg.eos_token_id)
                        .unwrap_or(0)
                }
            })
            .collect()
    }

    /// Text features (`get_text_features`): `[B, T]` u32 token ids (already truncated to the
    /// context length) to `[B, projection_dim]`, unnormalised.
    pub fn forward_ids(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        let b = ids.len();
        let t = ids.iter().map(Vec::len).max().unwrap_or(0);
        if b == 0 || t == 0 {
            candle_core::bail!("text encoder needs at least one non-empty token sequence")
        }
        if t > self.cfg.max_position_embeddings {
            candle_core::bail!(
                "token sequence of length {t} exceeds the model's context length {}",
                self.cfg.max_position_embeddings
            )
        }
        // Under the causal mask no token after the pooled one reaches it: each sequence is cut
        // there and the rest packed without padding.
        let pos = self.pooled_positions(ids);
        let lens: Vec<usize> = pos.iter().map(|&p| p + 1).collect();
        let rows = Rows::new(&lens, device)?;
        let (tokens, positions): (Vec<u32>, Vec<u32>) = ids
            .iter()
            .zip(&lens)
            .flat_map(|(r, &len)| r[..len].iter().copied().zip(0..len as u32))
            .unzip();
        let n = tokens.len();
        let xs = self
            .token_embedding
            .forward(&Tensor::from_vec(tokens, n, device)?)?
            .add(
                &self
                    .position_embedding
                    .index_select(&Tensor::from_vec(positions, n, device)?, 0)?,
            )?;
        let mask = causal_mask(rows.grid().1, xs.dtype(), device)?;
        let pooled = self.encoder.forward_pooled(&xs, &rows, Some(&mask), &pos)?;
        self.projection
            .forward(&self.final_layer_norm.forward(&pooled)?)
    }
}

impl ClipTextTransformer {
    fn pack_bf16(&mut self) -> Result<()> {
        self.encoder.pack_bf16()?;
        self.projection.pack_bf16()
    }
}

/// The additive `[T, T]` causal mask: −∞ above the diagonal.
pub(crate) fn causal_mask(t: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)
}

/// `CLIPVisionTransformer` plus `visual_projection`.
#[derive(Debug, Clone)]
pub struct ClipVisionTransformer {
    class_embedding: Tensor,
    /// Patch-embedding convolution as a dense layer `[C*P*P] -> [hidden]`: the convolution has
    /// stride = kernel, so it is a plain matmul over non-overlapping patches (no im2col).
    patch: Linear,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    encoder: Encoder,
    post_layernorm: LayerNorm,
    projection: Linear,
    cfg: ClipVisionConfig,
}

impl ClipVisionTransformer {
    /// Trains the encoder layers (but the last, which pools one token) as single autograd
    /// nodes on the CPU in f32, their parameters' gradients sent to `sink`
    /// ([`super::fused_layer`]); `None` returns them to candle's graph of their ops.
    pub fn set_grad_sink(&mut self, sink: Option<Arc<GradSink>>) {
        self.encoder.set_grad_sink(sink);
    }

    pub fn new(
        vb: VarBuilder,
        cfg: &ClipVisionConfig,
        projection_dim: usize,
        opts: BuildOptions,
    ) -> Result<Self> {
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let (h, c, p) = (cfg.hidden_size, cfg.num_channels, cfg.patch_size);
        let patch = Linear {
            weight: emb
                .get((h, c, p, p), "patch_embedding.weight")?
                .reshape((h, c * p * p))?,
            bias: None,
            packed: None,
        };
        Ok(Self {
            class_embedding: emb.get(h, "class_embedding")?,
            patch,
            position_embedding: emb.get((cfg.num_patches() + 1, h), "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::new(vm.pp("pre_layrnorm"), h, cfg.layer_norm_eps)?,
            encoder: Encoder::new(
                vm.pp("encoder"),
                cfg.num_hidden_layers,
                h,
                cfg.intermediate_size,
                cfg.num_attention_heads,
                cfg.layer_norm_eps,
                cfg.hidden_act,
                opts,
            )?,
            post_layernorm: LayerNorm::new(vm.pp("post_layernorm"), h, cfg.layer_norm_eps)?,
            projection: Linear::new(vb.pp("visual_projection"), h, projection_dim, false)?,
            cfg: cfg.clone(),
        })
    }

    /// Image features (`get_image_features`): `[B, C, S, S]` normalised pixels to
    /// `[B, projection_dim]`, unnormalised.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, hh, ww) = pixels.dims4()?;
        let (p, s) = (self.cfg.patch_size, self.cfg.image_size);
        if c != self.cfg.num_channels || hh != s || ww != s {
            candle_core::bail!(
                "vision tower expects [B, {}, {s}, {s}] pixels, got {:?}",
                self.cfg.num_channels,
                pixels.dims()
            )
        }
        let g = s / p;
        let hidden = self.cfg.hidden_size;
        let mut pixels = pixels.to_dtype(self.patch.weight.dtype())?;
        if g * p < s {
            // The strided convolution leaves out the last `s mod p` rows and columns.
            pixels = pixels
                .narrow(2, 0, g * p)?
                .narrow(3, 0, g * p)?
                .contiguous()?;
        }
        // [B, C, g, P, g, P] -> [B, g, g, C, P, P] -> [B*g*g, C*P*P]
        let patches = pixels
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, c * p * p))?;
        let patches = self.patch.forward(&patches)?.reshape((b, g * g, hidden))?;
        let cls = self
            .class_embedding
            .reshape((1, 1, hidden))?
            .broadcast_as((b, 1, hidden))?;
        let xs = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let t = g * g + 1;
        let xs = self.pre_layrnorm.forward(&xs.reshape((b * t, hidden))?)?;
        let rows = Rows::Grid { b, t };
        let cls = self.encoder.forward_pooled(&xs, &rows, None, &vec![0; b])?;
        let pooled = self.post_layernorm.forward(&cls)?;
        self.projection.forward(&pooled)
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    fn pack_bf16(&mut self) -> Result<()> {
        self.patch.pack_bf16()?;
        self.encoder.pack_bf16()?;
        self.projection.pack_bf16()
    }
}

/// Both towers of a CLIP checkpoint.
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub text: ClipTextTransformer,
    pub vision: ClipVisionTransformer,
    pub config: ClipConfig,
}

impl ClipModel {
    /// The model for inference on `vb`'s device ([`BuildOptions::for_inference`]).
    pub fn new(vb: VarBuilder, config: &ClipConfig) -> Result<Self> {
        let opts = BuildOptions::for_inference(vb.device());
        Self::with_options(vb, config, opts)
    }

    pub fn with_options(vb: VarBuilder, config: &ClipConfig, opts: BuildOptions) -> Result<Self> {
        let d = config.projection_dim;
        Ok(Self {
            text: ClipTextTransformer::new(vb.clone(), &config.text_config, d, opts)?,
            vision: ClipVisionTransformer::new(vb, &config.vision_config, d, opts)?,
            config: config.clone(),
        })
    }

    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        self.vision.forward(pixels)
    }

    pub fn text_features(&self, ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
        self.text.forward_ids(ids, device)
    }

    /// Inference on the CPU with bf16 products in every dense layer (f32 activations, sums in
    /// f32) on CPUs with AVX512-BF16 ([`super::gemm_bf16`]: about twice the f32 rate on AMD,
    /// about the f32 rate on Intel's cores without AMX, several times it with AMX). Keeps
    /// the f32 weights as well, for anything that tracks gradients.
    pub fn pack_bf16(&mut self) -> Result<()> {
        self.text.pack_bf16()?;
        self.vision.pack_bf16()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_paths_agree_and_slow_one_has_gradients() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 5, 8), &dev).unwrap();
        let w = candle_core::Var::from_tensor(&Tensor::randn(1f32, 0.1, 8, &dev).unwrap()).unwrap();
        let b = Tensor::randn(0f32, 0.1, 8, &dev).unwrap();
        let fused = LayerNorm {
            weight: w.as_tensor().detach(),
            bias: b.clone(),
            eps: 1e-5,
        };
        let tracked = LayerNorm {
            weight: w.as_tensor().clone(),
            bias: b,
            eps: 1e-5,
        };
        let a = fused.forward(&x).unwrap();
        let y = tracked.forward(&x).unwrap();
        let diff = crate::testutil::max_abs_diff(&a, &y);
        assert!(diff < 1e-5, "{diff}");
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(w.as_tensor()).is_some(),
            "layer norm weight received no gradient"
        );
    }

    /// An image size that is not a multiple of the patch (valid in `transformers`): the
    /// patch convolution's stride leaves out the last rows and columns, so the features are
    /// those of the image cropped to whole patches.
    #[test]
    fn leftover_pixels_past_the_last_patch_are_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::model::synth::tiny_config();
        crate::model::synth::write_checkpoint(dir.path(), &config, 5).unwrap();
        let files = [dir.path().join("model.safetensors")];
        let model = |config: &ClipConfig| {
            // SAFETY: the file was just written and is not modified while mapped.
            let vb = unsafe {
                VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu).unwrap()
            };
            ClipModel::new(vb, config).unwrap()
        };
        let (s, p) = (
            config.vision_config.image_size,
            config.vision_config.patch_size,
        );
        let mut wider = config.clone();
        wider.vision_config.image_size = s + p - 1;
        assert!(wider.validate().is_ok());
        let x = Tensor::randn(0f32, 1.0, (2, 3, s + p - 1, s + p - 1), &Device::Cpu).unwrap();
        let cropped = x.narrow(2, 0, s).unwrap().narrow(3, 0, s).unwrap();
        let got = model(&wider).image_features(&x).unwrap();
        let want = model(&config).image_features(&cropped).unwrap();
        assert_eq!(crate::testutil::max_abs_diff(&got, &want), 0.0);
    }

    /// The GPU's folded MLP (SiLU between rescaled layers) computes the same features as the
    /// checkpoint's QuickGELU MLP; built on the CPU here, where the fold is otherwise off.
    #[test]
    fn folded_quick_gelu_gives_the_same_features() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::model::synth::tiny_config();
        crate::model::synth::write_checkpoint(dir.path(), &config, 5).unwrap();
        let files = [dir.path().join("model.safetensors")];
        let model = |fold_quick_gelu| {
            // SAFETY: the file was just written and is not modified while mapped.
            let vb = unsafe {
                VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu).unwrap()
            };
            ClipModel::with_options(vb, &config, BuildOptions { fold_quick_gelu }).unwrap()
        };
        let (plain, folded) = (model(false), model(true));
        assert!(folded.vision.encoder.layers.iter().all(|l| l.silu_folded));
        assert!(folded.text.encoder.layers.iter().all(|l| l.silu_folded));
        assert!(!plain.vision.encoder.layers.iter().any(|l| l.silu_folded));
        let close = |a: Tensor, b: Tensor, what: &str| {
            let diff = crate::testutil::max_abs_diff(&a, &b);
            let scale = a.abs().unwrap().max_all().unwrap();
            let scale = scale.to_scalar::<f32>().unwrap();
            assert!(
                diff < 1e-5 * scale,
                "{what}: {diff} (features up to {scale})"
            );
        };
        let s = config.vision_config.image_size;
        let x = Tensor::randn(0f32, 1.0, (2, 3, s, s), &Device::Cpu).unwrap();
        let image = |m: &ClipModel| m.image_features(&x).unwrap();
        close(image(&plain), image(&folded), "images");
        let ids = vec![vec![3u32, 7, 9, 2], vec![5, 4]];
        let text = |m: &ClipModel| m.text_features(&ids, &Device::Cpu).unwrap();
        close(text(&plain), text(&folded), "text");
    }

    /// The CUDA attention kernel's sequence tables: where each sequence's keys and queries sit
    /// and which position its first query has, for the grid (vision) and packed (text) rows.
    #[test]
    fn cuda_sequence_tables_place_every_row() {
        let dev = Device::Cpu;
        let table = |t: &super::super::cuda::SeqTable| t.table().to_vec2::<u32>().unwrap();
        // Text: sequences of 3, 1 and 2 tokens packed into 6 rows, pooled at their last token.
        let rows = Rows::new(&[3, 1, 2], &dev).unwrap();
        let seqs = rows.cuda_seqs(6, &[2, 0, 1], &dev).unwrap();
        let full = [[0, 3, 0, 3, 0], [3, 1, 3, 1, 0], [4, 2, 4, 2, 0]];
        assert_eq!(table(&seqs.full), full);
        let pooled = [[0, 3, 0, 1, 2], [3, 1, 1, 1, 0], [4, 2, 2, 1, 1]];
        assert_eq!(table(&seqs.pooled), pooled);
        // Vision: 2 images of 4 tokens, pooled at the class token.
        let seqs = Rows::Grid { b: 2, t: 4 }
            .cuda_seqs(8, &[0, 0], &dev)
            .unwrap();
        assert_eq!(table(&seqs.full), [[0, 4, 0, 4, 0], [4, 4, 4, 4, 0]]);
        assert_eq!(table(&seqs.pooled), [[0, 4, 0, 1, 0], [4, 4, 1, 1, 0]]);
    }

    #[test]
    fn softmax_paths_agree() {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 3.0, (4, 7), &dev).unwrap())
            .unwrap();
        let a = softmax(&x.as_tensor().detach()).unwrap();
        let b = softmax(x.as_tensor()).unwrap();
        let diff = crate::testutil::max_abs_diff(&a, &b);
        assert!(diff < 1e-6, "{diff}");
        let grads = (b.narrow(1, 0, 1).unwrap().sum_all().unwrap())
            .backward()
            .unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
    }
}

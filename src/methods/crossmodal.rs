//! Cross-modal linear probing ("Multimodality helps unimodality", Lin et al., CVPR 2023; official
//! code linzhiqiu/cross_modal_adaptation): class-name text features are extra training samples of
//! their class, next to the few-shot image features.
//!
//! The math is pure functions over flat `f32` feature rows (head forward, zero-shot init, the
//! half-text/half-image batch sampler, the training loop with a hand-derived gradient, the
//! hyperparameter sweep, WiSE-FT); [`crate::methods::crossmodal_cli`] orchestrates on a model.
//!
//! Head (`linear`): `logits = exp(4.60517) · normalize(x) · Wᵀ` (bias-free, fixed scale 100).
//! The gradient of the mean cross-entropy with respect to `W` is
//! `s/B · (softmax(logits) − onehot)ᵀ · normalize(x)`, checked against candle autograd and finite
//! differences in the tests.
//!
//! Head (`adapter`, the official CLIP-Adapter head): `z = ρ·relu(W₂·relu(W₁·x̂)) + (1−ρ)·x̂` on
//! `x̂ = normalize(x)`, then `logits = s · z · Wᵀ`; `z` is not normalised again (the official
//! `LogitHead` normalises only its input). The backward runs through both ReLUs and the residual
//! blend by hand (checked the same way, and against PyTorch's autograd in the reference).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// `exp(4.60517)`: the fixed logit scale of the official head (×100).
pub const LOGIT_SCALE: f32 = 100.000_25;
/// The official log logit scale.
pub const LOG_LOGIT_SCALE: f64 = 4.60517;
/// Linear warm-up: iterations and start learning rate.
pub const WARMUP_ITERS: usize = 50;
pub const WARMUP_LR: f64 = 1e-5;
/// Validation interval (iterations).
pub const EVAL_FREQ: usize = 100;

/// CLIP-Adapter defaults of the official head (engine/model/head.py: `Adapter(c_in, reduction=4,
/// residual_ratio=0.2)`; `make_classifier_head` passes ratio 0.2 and keeps reduction 4).
pub const ADAPTER_REDUCTION: usize = 4;
pub const ADAPTER_RATIO: f32 = 0.2;

/// Row-major `[rows, cols]` f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Mat {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Mat {
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(rows * cols, data.len());
        Self { rows, cols, data }
    }
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self::new(rows, cols, vec![0.0; rows * cols])
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let (r, c) = t.dims2()?;
        let data = t
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .flatten_all()?
            .to_vec1()?;
        Ok(Self::new(r, c, data))
    }
    pub fn to_tensor(&self) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.data.clone(),
            (self.rows, self.cols),
            &Device::Cpu,
        )?)
    }
    pub fn from_rows(rows: &[Vec<f32>]) -> Self {
        let cols = rows.first().map_or(0, |r| r.len());
        Self::new(rows.len(), cols, rows.iter().flatten().copied().collect())
    }
    pub fn to_rows(&self) -> Vec<Vec<f32>> {
        (0..self.rows).map(|i| self.row(i).to_vec()).collect()
    }
    /// Each row divided by its L2 norm (norm clamped at 1e-12).
    pub fn l2_normalized(&self) -> Self {
        let mut out = self.clone();
        for r in out.data.chunks_mut(self.cols.max(1)) {
            let n = dot(r, r).sqrt().max(1e-12);
            r.iter_mut().for_each(|x| *x /= n);
        }
        out
    }
}

/// Dot product with 8 independent accumulators (vectorises without fast-math).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Which rows train the head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    /// Text features of every (class, template) pair and the image features (the method).
    Cross,
    /// Image features only (the uni-modal linear-probe baseline).
    Image,
}

/// Which head is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// Normalise, bias-free linear layer, ×100.
    Linear,
    /// The CLIP-Adapter MLP (reduction 4, ReLU, residual ratio 0.2) in front of the linear layer.
    Adapter,
}

/// How the head weight starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// Per class mean of the raw template text features, L2-normalised.
    Zeroshot,
    /// PyTorch's `nn.Linear` default: uniform(±1/√D), seeded.
    Random,
}

/// The zero-shot init `[C, D]`: rows of `text_raw` are `(class, template)` pairs, class-major
/// (`row = c·T + t`). As the official `get_zero_shot_weights` (engine/model/head.py): the
/// per-class mean of the raw (unnormalised) text features, then L2-normalised. (The version it
/// replaced, still there commented out, normalised each feature first; with one template both
/// agree.)
pub fn zeroshot_init(text_raw: &Mat, classes: usize) -> Result<Mat> {
    ensure!(
        classes > 0 && text_raw.rows.is_multiple_of(classes) && text_raw.rows > 0,
        "{} text rows for {classes} classes",
        text_raw.rows
    );
    let t = text_raw.rows / classes;
    let d = text_raw.cols;
    let mut w = Mat::zeros(classes, d);
    for c in 0..classes {
        let out = &mut w.data[c * d..(c + 1) * d];
        for k in 0..t {
            for (o, x) in out.iter_mut().zip(text_raw.row(c * t + k)) {
                *o += x;
            }
        }
        out.iter_mut().for_each(|x| *x /= t as f32);
    }
    Ok(w.l2_normalized())
}

/// `nn.Linear`-style random init, uniform in `±1/√D`, seeded.
pub fn random_init(classes: usize, dim: usize, seed: u64) -> Mat {
    use rand::Rng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_1417);
    let b = 1.0 / (dim as f32).sqrt();
    Mat::new(
        classes,
        dim,
        (0..classes * dim)
            .map(|_| rng.random_range(-b..b))
            .collect(),
    )
}

/// Head forward: `LOGIT_SCALE · normalize(x) · Wᵀ`, `[N, C]`.
pub fn head_logits(x: &Mat, w: &Mat) -> Mat {
    let xn = x.l2_normalized();
    logits_normalized(&xn, w)
}

/// Head forward on already L2-normalised rows.
pub fn logits_normalized(xn: &Mat, w: &Mat) -> Mat {
    assert_eq!(xn.cols, w.cols);
    let mut out = Mat::zeros(xn.rows, w.rows);
    out.data
        .chunks_mut(w.rows.max(1))
        .enumerate()
        .for_each(|(i, o)| {
            let r = xn.row(i);
            for (c, v) in o.iter_mut().enumerate() {
                *v = LOGIT_SCALE * dot(r, w.row(c));
            }
        });
    out
}

/// `y += a·x`.
#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += a * xv;
    }
}

/// The CLIP-Adapter MLP of the official `--classifier_head adapter` (engine/model/head.py
/// `Adapter`): `z = ρ·relu(fc2·relu(fc1·x)) + (1−ρ)·x`, both layers bias-free.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// First layer `[D/r, D]` (PyTorch's out × in layout).
    pub fc1: Mat,
    /// Second layer `[D, D/r]`.
    pub fc2: Mat,
    /// Residual ratio ρ (weight of the MLP branch).
    pub ratio: f32,
}

/// Activations of an adapter forward, kept for the backward.
struct AdapterActs {
    /// `relu(fc1·x)`, `[N, D/r]`.
    a1: Mat,
    /// `relu(fc2·a1)`, `[N, D]`.
    a2: Mat,
    /// The blend, `[N, D]`.
    z: Mat,
}

impl Adapter {
    /// `nn.Linear`'s default init (kaiming-uniform with a = √5, i.e. uniform ±1/√fan_in) for both
    /// layers, seeded; the hidden width is `⌊D/r⌋` as the official `c_in // reduction`.
    pub fn random(dim: usize, reduction: usize, ratio: f32, seed: u64) -> Result<Self> {
        use rand::Rng;
        ensure!(
            reduction > 0 && dim / reduction > 0,
            "adapter reduction {reduction} leaves no hidden units for dimension {dim}"
        );
        let hidden = dim / reduction;
        // Its own stream, so the adapter does not shift the linear layer's random init.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xADA9_7E12);
        let mut uniform = |rows: usize, cols: usize| {
            let b = 1.0 / (cols as f32).sqrt();
            Mat::new(
                rows,
                cols,
                (0..rows * cols).map(|_| rng.random_range(-b..b)).collect(),
            )
        };
        let fc1 = uniform(hidden, dim);
        let fc2 = uniform(dim, hidden);
        Ok(Self { fc1, fc2, ratio })
    }

    /// The ratio as the f64 of its shortest decimal (0.2, not 0.20000000298), for metadata; it
    /// reads back as the same f32.
    pub fn ratio_for_meta(&self) -> f64 {
        self.ratio.to_string().parse().unwrap_or(self.ratio as f64)
    }

    /// Checks that the layers chain `D → h → D`.
    pub fn validate(&self, dim: usize) -> Result<()> {
        let h = self.fc1.rows;
        ensure!(
            h > 0 && self.fc1.cols == dim && self.fc2.rows == dim && self.fc2.cols == h,
            "adapter layers [{}, {}] and [{}, {}] do not chain {dim} → h → {dim}",
            self.fc1.rows,
            self.fc1.cols,
            self.fc2.rows,
            self.fc2.cols
        );
        Ok(())
    }

    fn forward_acts(&self, x: &Mat) -> AdapterActs {
        let (n, d, h) = (x.rows, self.fc2.rows, self.fc1.rows);
        assert_eq!(x.cols, self.fc1.cols);
        let mut a1 = Mat::zeros(n, h);
        let mut a2 = Mat::zeros(n, d);
        let mut z = Mat::zeros(n, d);
        let rho = self.ratio;
        for i in 0..n {
            let xi = x.row(i);
            let h1 = &mut a1.data[i * h..(i + 1) * h];
            for (j, v) in h1.iter_mut().enumerate() {
                *v = dot(self.fc1.row(j), xi).max(0.0);
            }
            let h2 = &mut a2.data[i * d..(i + 1) * d];
            let zi = &mut z.data[i * d..(i + 1) * d];
            for k in 0..d {
                h2[k] = dot(self.fc2.row(k), h1).max(0.0);
                zi[k] = rho * h2[k] + (1.0 - rho) * xi[k];
            }
        }
        AdapterActs { a1, a2, z }
    }

    /// The adapter output of (normalised) rows, `[N, D]`.
    pub fn forward(&self, x: &Mat) -> Mat {
        self.forward_acts(x).z
    }
}

/// A head: the optional CLIP-Adapter, then the bias-free linear layer, ×[`LOGIT_SCALE`].
#[derive(Debug, Clone, PartialEq)]
pub struct Head {
    /// The CLIP-Adapter in front of the linear layer (`--head adapter`).
    pub adapter: Option<Adapter>,
    /// The linear layer `[C, D]`.
    pub weight: Mat,
}

impl Head {
    pub fn linear(weight: Mat) -> Self {
        Self {
            adapter: None,
            weight,
        }
    }

    pub fn kind(&self) -> HeadKind {
        match self.adapter {
            Some(_) => HeadKind::Adapter,
            None => HeadKind::Linear,
        }
    }

    /// Logits of already L2-normalised rows: `s · adapter(xn) · Wᵀ` (`s · xn · Wᵀ` without one).
    pub fn logits(&self, xn: &Mat) -> Mat {
        match &self.adapter {
            Some(a) => logits_normalized(&a.forward(xn), &self.weight),
            None => logits_normalized(xn, &self.weight),
        }
    }

    /// The same head with another linear layer (WiSE-FT keeps the adapter).
    pub fn with_weight(&self, weight: Mat) -> Self {
        Self {
            adapter: self.adapter.clone(),
            weight,
        }
    }

    /// Parameter tensors, linear layer first.
    fn params_mut(&mut self) -> Vec<&mut [f32]> {
        let mut p = vec![self.weight.data.as_mut_slice()];
        if let Some(a) = &mut self.adapter {
            p.push(a.fc1.data.as_mut_slice());
            p.push(a.fc2.data.as_mut_slice());
        }
        p
    }

    /// Whether every weight is finite (not a diverged head).
    pub fn is_finite(&self) -> bool {
        self.params()
            .iter()
            .all(|p| p.iter().all(|x| x.is_finite()))
    }

    fn params(&self) -> Vec<&[f32]> {
        let mut p = vec![self.weight.data.as_slice()];
        if let Some(a) = &self.adapter {
            p.push(a.fc1.data.as_slice());
            p.push(a.fc2.data.as_slice());
        }
        p
    }
}

/// Top-1 accuracy (percent) of logits; ties go to the lower class index.
pub fn accuracy(logits: &Mat, labels: &[usize]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    let hits = (0..logits.rows)
        .filter(|&i| {
            let r = logits.row(i);
            let mut best = 0;
            for (j, &v) in r.iter().enumerate() {
                if v > r[best] {
                    best = j;
                }
            }
            best == labels[i]
        })
        .count();
    100.0 * hits as f64 / labels.len() as f64
}

/// Turns logits `[B, C]` into `softmax − onehot` in place; returns the mean cross-entropy.
fn softmax_minus_onehot(p: &mut Mat, labels: &[usize]) -> f32 {
    let (b, c) = (p.rows, p.cols);
    let mut loss = 0f64;
    for i in 0..b {
        let r = &mut p.data[i * c..(i + 1) * c];
        let m = r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let shifted = r[labels[i]] - m;
        let mut z = 0f32;
        for v in r.iter_mut() {
            *v = (*v - m).exp();
            z += *v;
        }
        loss -= (shifted - z.ln()) as f64;
        for v in r.iter_mut() {
            *v /= z;
        }
        r[labels[i]] -= 1.0;
    }
    (loss / b as f64) as f32
}

/// `grad = scale · deltaᵀ · x` (`[C, D]`, overwritten).
fn linear_weight_grad(delta: &Mat, x: &Mat, scale: f32, grad: &mut Mat) {
    let (b, c, d) = (x.rows, delta.cols, x.cols);
    grad.data.fill(0.0);
    for (ci, g) in grad.data.chunks_mut(d).enumerate() {
        for i in 0..b {
            let coef = scale * delta.data[i * c + ci];
            if coef != 0.0 {
                axpy(coef, x.row(i), g);
            }
        }
    }
}

/// Mean cross-entropy of the head on normalised rows `xn` and its gradient w.r.t. `W`
/// (`s/B · (softmax − onehot)ᵀ · xn`), written into `grad` (`[C, D]`, overwritten).
pub fn loss_and_grad(xn: &Mat, labels: &[usize], w: &Mat, grad: &mut Mat) -> f32 {
    let mut p = logits_normalized(xn, w);
    let loss = softmax_minus_onehot(&mut p, labels);
    linear_weight_grad(&p, xn, LOGIT_SCALE / xn.rows as f32, grad);
    loss
}

/// Mean cross-entropy of any head on normalised rows `xn` and its gradient with respect to every
/// parameter, written into `grad` (same shapes as `head`, overwritten).
///
/// Adapter backward, per row with `Δ = s/B · (softmax − onehot)`: `dW = Δᵀz`; `dz = ΔW`;
/// `dg = ρ·dz ⊙ [a₂ > 0]`; `dfc2 = dgᵀa₁`; `da₁ = dg·fc2 ⊙ [a₁ > 0]`; `dfc1 = da₁ᵀx̂` (the residual
/// branch `(1−ρ)·x̂` has no parameters, and `x̂` is fixed).
pub fn head_loss_and_grad(xn: &Mat, labels: &[usize], head: &Head, grad: &mut Head) -> f32 {
    let Some(a) = &head.adapter else {
        return loss_and_grad(xn, labels, &head.weight, &mut grad.weight);
    };
    let g = grad
        .adapter
        .as_mut()
        .expect("gradient of an adapter head needs adapter buffers");
    let (b, c, d, h) = (xn.rows, head.weight.rows, a.fc2.rows, a.fc1.rows);
    let acts = a.forward_acts(xn);
    let mut delta = logits_normalized(&acts.z, &head.weight);
    let loss = softmax_minus_onehot(&mut delta, labels);
    let scale = LOGIT_SCALE / b as f32;
    linear_weight_grad(&delta, &acts.z, scale, &mut grad.weight);
    g.fc1.data.fill(0.0);
    g.fc2.data.fill(0.0);
    let mut dg = vec![0f32; d];
    let mut da1 = vec![0f32; h];
    for i in 0..b {
        dg.fill(0.0);
        for ci in 0..c {
            let coef = scale * delta.data[i * c + ci];
            if coef != 0.0 {
                axpy(coef, head.weight.row(ci), &mut dg);
            }
        }
        let a1 = acts.a1.row(i);
        let a2 = acts.a2.row(i);
        da1.fill(0.0);
        for k in 0..d {
            // ReLU passes the gradient where its output is positive (PyTorch: 0 at 0).
            if a2[k] > 0.0 {
                let v = a.ratio * dg[k];
                axpy(v, a1, &mut g.fc2.data[k * h..(k + 1) * h]);
                axpy(v, a.fc2.row(k), &mut da1);
            }
        }
        let x = xn.row(i);
        for j in 0..h {
            if a1[j] > 0.0 {
                axpy(da1[j], x, &mut g.fc1.data[j * d..(j + 1) * d]);
            }
        }
    }
    loss
}

/// Learning rate of iteration `t` (0-based), as the official `LinearWarmupScheduler` (50
/// iterations) around `CosineAnnealingLR(T_max = iters)`: 1e-5 at `t = 0`, `lr·t/50` for
/// `0 < t < 50`, then the cosine schedule at step `t − 50` (the warm-up does not advance it).
pub fn lr_at(lr: f64, t: usize, iters: usize) -> f64 {
    if t == 0 {
        WARMUP_LR
    } else if t < WARMUP_ITERS {
        lr * t as f64 / WARMUP_ITERS as f64
    } else {
        super::tip::cosine_lr(lr, t - WARMUP_ITERS, iters)
    }
}

/// One shuffled stream of row indices: a new permutation each pass, incomplete tails dropped
/// (`drop_last`), like the official per-modality `DataLoader`s.
pub struct Stream {
    n: usize,
    half: usize,
    order: Vec<usize>,
    pos: usize,
    rng: rand_chacha::ChaCha8Rng,
}

impl Stream {
    pub fn new(n: usize, half: usize, seed: u64) -> Self {
        let mut s = Self {
            n,
            half,
            order: Vec::new(),
            pos: 0,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
        };
        s.reshuffle();
        s
    }
    fn reshuffle(&mut self) {
        self.order = (0..self.n).collect();
        self.order.shuffle(&mut self.rng);
        self.pos = 0;
    }
    /// The next `half` indices.
    pub fn next_batch(&mut self) -> &[usize] {
        if self.pos + self.half > self.n {
            self.reshuffle();
        }
        let s = self.pos;
        self.pos += self.half;
        &self.order[s..s + self.half]
    }
}

/// Text and image batch sizes of a total batch: text ⌊B/2⌋, image the rest; image only: the whole
/// batch. `None` unless each non-empty half is strictly smaller than its set (the official code
/// skips that setting).
pub fn batch_split(
    batch: usize,
    modality: Modality,
    n_text: usize,
    n_image: usize,
) -> Option<(usize, usize)> {
    let (t, i) = match modality {
        Modality::Cross => (batch / 2, batch - batch / 2),
        Modality::Image => (0, batch),
    };
    // As the official `get_valid_batch_sizes`: each non-empty half strictly smaller than its set.
    ((t == 0 || t < n_text) && i > 0 && i < n_image).then_some((t, i))
}

/// Sampler of mixed batches: `text_half` rows from the text stream then `image_half` from the
/// image stream, each separately shuffled with its own seed.
pub struct Sampler {
    text: Option<Stream>,
    image: Stream,
}

impl Sampler {
    pub fn new(
        text_half: usize,
        image_half: usize,
        n_text: usize,
        n_image: usize,
        seed: u64,
    ) -> Self {
        Self {
            text: (text_half > 0).then(|| Stream::new(n_text, text_half, seed.wrapping_mul(2) + 1)),
            image: Stream::new(n_image, image_half, seed.wrapping_mul(2) + 2),
        }
    }
    /// Indices of the next batch: `(text rows, image rows)`.
    pub fn next_batch(&mut self) -> (Vec<usize>, Vec<usize>) {
        let t = self
            .text
            .as_mut()
            .map_or(Vec::new(), |s| s.next_batch().to_vec());
        let i = self.image.next_batch().to_vec();
        (t, i)
    }
}

/// Training rows: L2-normalised features with labels.
#[derive(Debug, Clone)]
pub struct Rows {
    pub x: Mat,
    pub labels: Vec<usize>,
}

impl Rows {
    pub fn new(x: &Mat, labels: Vec<usize>) -> Self {
        assert_eq!(x.rows, labels.len());
        Self {
            x: x.l2_normalized(),
            labels,
        }
    }
}

/// One point of the sweep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Hyper {
    pub lr: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
}

/// The official sweep: lr {1e-3, 1e-4} × wd {0, 1e-2, 1e-4} × batch {8, 32}.
pub fn default_grid() -> Vec<Hyper> {
    let mut g = Vec::new();
    for lr in [1e-3, 1e-4] {
        for weight_decay in [0.0, 1e-2, 1e-4] {
            for batch_size in [8, 32] {
                g.push(Hyper {
                    lr,
                    weight_decay,
                    batch_size,
                });
            }
        }
    }
    g
}

/// The official adapter sweep, `HYPER_DICT['adapter']` (engine/optimizer/default.py, used by
/// adapter.sh with `--classifier_head adapter`): lr {1e-4, 1e-5, 1e-6, 1e-7} × wd {0, 1e-3,
/// 1e-5} × batch {8}.
pub fn adapter_grid() -> Vec<Hyper> {
    let mut g = Vec::new();
    for lr in [1e-4, 1e-5, 1e-6, 1e-7] {
        for weight_decay in [0.0, 1e-3, 1e-5] {
            g.push(Hyper {
                lr,
                weight_decay,
                batch_size: 8,
            });
        }
    }
    g
}

/// The default sweep of a head.
pub fn grid_for(head: HeadKind) -> Vec<Hyper> {
    match head {
        HeadKind::Linear => default_grid(),
        HeadKind::Adapter => adapter_grid(),
    }
}

/// Settings of one training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainSettings {
    pub iters: usize,
    pub modality: Modality,
    pub init: Init,
    pub seed: u64,
}

/// Result of one run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub hyper: Hyper,
    /// Best state (by val, first best).
    pub head: Head,
    pub val_acc: f64,
    pub best_iter: usize,
}

/// PyTorch's AdamW (β 0.9/0.999, ε 1e-8, decoupled decay), in place.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    fn new(n: usize) -> Self {
        Self {
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }
    fn step(&mut self, w: &mut [f32], g: &[f32], lr: f64, wd: f64) {
        self.t += 1;
        let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
        let bc1 = 1.0 - 0.9f64.powi(self.t);
        let bc2 = 1.0 - 0.999f64.powi(self.t);
        let step = (lr / bc1) as f32;
        let bc2s = bc2.sqrt() as f32;
        let decay = (1.0 - lr * wd) as f32;
        for (((p, &gi), m), v) in w.iter_mut().zip(g).zip(&mut self.m).zip(&mut self.v) {
            *p *= decay;
            *m = b1 * *m + (1.0 - b1) * gi;
            *v = b2 * *v + (1.0 - b2) * gi * gi;
            *p -= step * *m / (v.sqrt() / bc2s + eps);
        }
    }
}

/// A head under training: one AdamW state per parameter tensor, all with the same lr and
/// decoupled decay, as the official single `AdamW` over `logit_head.parameters()` (train.py).
pub struct Trainer {
    head: Head,
    grad: Head,
    adam: Vec<Adam>,
}

impl Trainer {
    pub fn new(init: &Head) -> Self {
        let mut head = init.clone();
        let adam = head
            .params_mut()
            .iter()
            .map(|p| Adam::new(p.len()))
            .collect();
        Self {
            grad: head.clone(),
            head,
            adam,
        }
    }

    /// One optimiser step on a batch of normalised rows; returns the batch loss before the step.
    pub fn step(&mut self, xn: &Mat, labels: &[usize], lr: f64, weight_decay: f64) -> f32 {
        let loss = head_loss_and_grad(xn, labels, &self.head, &mut self.grad);
        for ((p, g), adam) in self
            .head
            .params_mut()
            .into_iter()
            .zip(self.grad.params())
            .zip(&mut self.adam)
        {
            adam.step(p, g, lr, weight_decay);
        }
        loss
    }

    pub fn head(&self) -> &Head {
        &self.head
    }
}

/// Trains a head from `init` for one hyperparameter setting; validates every [`EVAL_FREQ`]
/// iterations and keeps the best state (`best_iter` is the 0-based iteration after whose step it
/// was taken). `None` when the batch does not fit the sets.
pub fn train_one(
    text: &Rows,
    image: &Rows,
    val: &Rows,
    init: &Head,
    hyper: Hyper,
    settings: &TrainSettings,
) -> Option<RunOutcome> {
    let (th, ih) = batch_split(
        hyper.batch_size,
        settings.modality,
        text.labels.len(),
        image.labels.len(),
    )?;
    let mut sampler = Sampler::new(th, ih, text.labels.len(), image.labels.len(), settings.seed);
    let d = init.weight.cols;
    let mut trainer = Trainer::new(init);
    let mut batch = Mat::zeros(th + ih, d);
    let mut labels = vec![0usize; th + ih];
    let val_acc = |h: &Head| accuracy(&h.logits(&val.x), &val.labels);
    // As the official loop: validate after the step of every iteration `it` with
    // `it % EVAL_FREQ == 0` (after 1, 101, 201, ... steps) and keep the first best state.
    let mut best: Option<(f64, usize, Head)> = None;
    for it in 0..settings.iters {
        let (ti, ii) = sampler.next_batch();
        for (k, &r) in ti.iter().enumerate() {
            batch.data[k * d..(k + 1) * d].copy_from_slice(text.x.row(r));
            labels[k] = text.labels[r];
        }
        for (k, &r) in ii.iter().enumerate() {
            let k = k + th;
            batch.data[k * d..(k + 1) * d].copy_from_slice(image.x.row(r));
            labels[k] = image.labels[r];
        }
        trainer.step(
            &batch,
            &labels,
            lr_at(hyper.lr, it, settings.iters),
            hyper.weight_decay,
        );
        if it % EVAL_FREQ == 0 {
            // A diverged (non-finite) head is never kept: its val accuracy is an artefact of
            // comparing NaNs.
            if !trainer.head().is_finite() {
                break;
            }
            let acc = val_acc(trainer.head());
            if best.as_ref().is_none_or(|b| acc > b.0) {
                best = Some((acc, it, trainer.head().clone()));
            }
        }
    }
    let (val_acc, best_iter, head) = best?;
    Some(RunOutcome {
        hyper,
        head,
        val_acc,
        best_iter,
    })
}

/// Result of a sweep.
#[derive(Debug, Clone)]
pub struct SweepOutcome {
    pub best: RunOutcome,
    /// `(setting, val accuracy)`, `None` for skipped settings.
    pub results: Vec<(Hyper, Option<f64>)>,
    /// Notes about skipped settings.
    pub notes: Vec<String>,
}

/// Runs every setting of `grid` (in parallel) and keeps the best val accuracy (first in grid
/// order on ties).
pub fn sweep(
    text: &Rows,
    image: &Rows,
    val: &Rows,
    init: &Head,
    grid: &[Hyper],
    settings: &TrainSettings,
) -> Result<SweepOutcome> {
    let runs: Vec<Option<RunOutcome>> = grid
        .par_iter()
        .map(|&h| train_one(text, image, val, init, h, settings))
        .collect();
    let mut notes = Vec::new();
    let mut results = Vec::new();
    let mut best: Option<RunOutcome> = None;
    for (h, r) in grid.iter().zip(runs) {
        match r {
            None => {
                let fits = batch_split(
                    h.batch_size,
                    settings.modality,
                    text.labels.len(),
                    image.labels.len(),
                )
                .is_some();
                notes.push(if fits {
                    format!(
                        "lr {} wd {} batch {} diverged (non-finite weights at the first \
                         validation): not used",
                        num(h.lr),
                        num(h.weight_decay),
                        h.batch_size
                    )
                } else {
                    format!(
                        "skipped lr {} wd {} batch {}: a half batch is not smaller than the {} \
                         text / {} image rows",
                        num(h.lr),
                        num(h.weight_decay),
                        h.batch_size,
                        text.labels.len(),
                        image.labels.len()
                    )
                });
                results.push((*h, None));
            }
            Some(r) => {
                results.push((*h, Some(r.val_acc)));
                if best.as_ref().is_none_or(|b| r.val_acc > b.val_acc) {
                    best = Some(r);
                }
            }
        }
    }
    let Some(best) = best else {
        bail!(
            "no setting trained a head: {} (with --no-sweep: lower --batch for a skipped \
             setting, --lr for a diverged one)",
            notes.join("; ")
        );
    };
    Ok(SweepOutcome {
        best,
        results,
        notes,
    })
}

/// WiSE-FT: `(1−r)·W_learned + r·normalize(W_zeroshot)`, `r` the zero-shot head's weight (the
/// official `get_wiseft`'s `wiseft_ratio`).
pub fn wise_ft(learned: &Mat, zeroshot: &Mat, ratio: f32) -> Mat {
    let z = zeroshot.l2_normalized();
    Mat::new(
        learned.rows,
        learned.cols,
        learned
            .data
            .iter()
            .zip(&z.data)
            .map(|(a, b)| (1.0 - ratio) * a + ratio * b)
            .collect(),
    )
}

/// WiSE-FT of a head: the formula on the final linear layer only, the adapter kept as learned (the
/// official `get_wiseft`, train.py, does the same for its `Sequential(adapter, linear)` head).
pub fn wise_ft_head(learned: &Head, zeroshot: &Mat, ratio: f32) -> Head {
    learned.with_weight(wise_ft(&learned.weight, zeroshot, ratio))
}

/// Text training rows: every `(class, template)` pair, class-major, with its class label.
pub fn text_labels(classes: usize, templates: usize) -> Vec<usize> {
    (0..classes * templates).map(|r| r / templates).collect()
}

// ---------------------------------------------------------------------------------------------
// Artifact
// ---------------------------------------------------------------------------------------------

/// Metadata of a cross-modal head artifact (JSON under `clipft`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CrossMeta {
    /// Always `crossmodal`.
    pub kind: String,
    pub version: u32,
    pub model: String,
    pub revision: Option<String>,
    /// [`crate::model::Clip::weights_digest`] of the model (absent before 2026-11-28).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_digest: Option<String>,
    /// The model's image preprocessing (absent before 2026-11-29): evaluation refuses a model
    /// whose `preprocessor_config.json` changed since.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preprocess: Option<crate::preprocess::PreprocessConfig>,
    pub projection_dim: usize,
    pub class_folders: Vec<String>,
    pub class_names: Vec<String>,
    pub templates: Vec<String>,
    pub shots: Option<usize>,
    pub seed: u64,
    pub head: HeadKind,
    /// CLIP-Adapter reduction and residual ratio (`head: adapter` only; absent in linear heads,
    /// so linear artifacts read and write as before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_reduction: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter_ratio: Option<f64>,
    pub modality: Modality,
    pub init: Init,
    pub image_views: Vec<String>,
    pub iters: usize,
    pub swept: bool,
    pub hyper: Hyper,
    pub best_iter: usize,
    pub val_acc: f64,
    pub val_acc_zeroshot: f64,
    pub val_n: usize,
    pub sweep: Vec<(Hyper, Option<f64>)>,
    /// The WiSE-FT head's zero-shot weight `r` ([`wise_ft`]).
    #[serde(default)]
    pub wise_ft_ratio: Option<f64>,
    pub val_acc_wiseft: Option<f64>,
    /// Head used by `eval --adapter` unless `--head-variant` says otherwise: `head` or
    /// `head_wiseft`.
    pub default_head: String,
    /// Whether some of its images were decoded reduced (`--fast-decode`): not the reference
    /// pixels. Absent (false) otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fast_decode: bool,
}

/// A trained head: `head` `[C, D]`, the optional WiSE-FT head (same shape) and, for `--head
/// adapter`, the adapter both use (`adapter.fc1` `[D/r, D]`, `adapter.fc2` `[D, D/r]`).
#[derive(Debug, Clone)]
pub struct CrossArtifact {
    pub meta: CrossMeta,
    pub head: Mat,
    pub head_wiseft: Option<Mat>,
    pub adapter: Option<Adapter>,
}

impl CrossArtifact {
    pub fn save(&self, path: &Path) -> Result<()> {
        let h = self.head.to_tensor()?;
        let w = self
            .head_wiseft
            .as_ref()
            .map(|m| m.to_tensor())
            .transpose()?;
        let a = self
            .adapter
            .as_ref()
            .map(|a| Ok::<_, anyhow::Error>((a.fc1.to_tensor()?, a.fc2.to_tensor()?)))
            .transpose()?;
        let mut t: Vec<(&str, &Tensor)> = vec![("head", &h)];
        if let Some(w) = &w {
            t.push(("head_wiseft", w));
        }
        if let Some((fc1, fc2)) = &a {
            t.push(("adapter.fc1", fc1));
            t.push(("adapter.fc2", fc2));
        }
        crate::io::save(path, &t, &serde_json::to_value(&self.meta)?)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let (mut t, meta) = crate::io::load(path)?;
        let kind = meta.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        ensure!(
            kind == "crossmodal",
            "{}: not a cross-modal head (kind `{kind}`; make one with `clipft crossmodal train`)",
            path.display()
        );
        let mut meta = meta;
        // Artifacts before 2026-11-28 stored the learned head's weight `1 − r` as
        // `wise_ft_alpha`.
        if let Some(a) = meta.get("wise_ft_alpha").and_then(|a| a.as_f64()) {
            if meta.get("wise_ft_ratio").is_none() {
                meta["wise_ft_ratio"] = serde_json::json!(1.0 - a);
            }
        }
        let meta: CrossMeta = serde_json::from_value(meta)
            .with_context(|| format!("{}: malformed cross-modal metadata", path.display()))?;
        ensure!(
            meta.version == 1,
            "{}: version {} (this clipft reads version 1: the file is from a newer clipft)",
            path.display(),
            meta.version
        );
        let has_wiseft = t.contains_key("head_wiseft");
        let mut mat = |name: &str| Mat::from_tensor(&crate::io::take_matrix(&mut t, name, path)?);
        let head = mat("head")?;
        let head_wiseft = if has_wiseft {
            Some(mat("head_wiseft")?)
        } else {
            None
        };
        let adapter = match meta.head {
            HeadKind::Linear => {
                ensure!(
                    !t.contains_key("adapter.fc1") && !t.contains_key("adapter.fc2"),
                    "{}: a linear head with adapter tensors",
                    path.display()
                );
                None
            }
            HeadKind::Adapter => {
                let ratio = meta.adapter_ratio.with_context(|| {
                    format!("{}: adapter head without `adapter_ratio`", path.display())
                })?;
                // CLIP-Adapter's residual blend: a share of the adapted features.
                ensure!(
                    (0.0..=1.0).contains(&ratio),
                    "{}: `adapter_ratio` {ratio} is not between 0 and 1",
                    path.display()
                );
                let a = Adapter {
                    fc1: mat("adapter.fc1")?,
                    fc2: mat("adapter.fc2")?,
                    ratio: ratio as f32,
                };
                a.validate(meta.projection_dim)
                    .with_context(|| format!("{}: inconsistent adapter", path.display()))?;
                if let Some(r) = meta.adapter_reduction {
                    ensure!(
                        r > 0 && a.fc1.rows == meta.projection_dim / r,
                        "{}: adapter hidden width {} is not {} / reduction {r}",
                        path.display(),
                        a.fc1.rows,
                        meta.projection_dim
                    );
                }
                Some(a)
            }
        };
        ensure!(
            matches!(meta.default_head.as_str(), "head" | "head_wiseft")
                && (meta.default_head == "head" || head_wiseft.is_some()),
            "{}: `default_head` `{}` is not a head the file holds",
            path.display(),
            meta.default_head
        );
        let c = meta.class_names.len();
        ensure!(
            head.rows == c
                && head.cols == meta.projection_dim
                && meta.class_folders.len() == c
                && head_wiseft
                    .as_ref()
                    .is_none_or(|w| w.rows == c && w.cols == head.cols),
            "{}: inconsistent tensor shapes (head [{}, {}]{}; {} classes, projection_dim {})",
            path.display(),
            head.rows,
            head.cols,
            head_wiseft.as_ref().map_or(String::new(), |w| format!(
                ", head_wiseft [{}, {}]",
                w.rows, w.cols
            )),
            c,
            meta.projection_dim
        );
        Ok(Self {
            meta,
            head,
            head_wiseft,
            adapter,
        })
    }

    /// The head of a variant (`default`, `learned` or `wiseft`) and its method name.
    pub fn pick(&self, variant: &str) -> Result<(Head, &'static str)> {
        let v = if variant == "default" {
            if self.meta.default_head == "head_wiseft" {
                "wiseft"
            } else {
                "learned"
            }
        } else {
            variant
        };
        let adapter = self.adapter.is_some();
        let (weight, method) = match v {
            "learned" => (
                &self.head,
                if adapter {
                    "crossmodal-adapter"
                } else {
                    "crossmodal"
                },
            ),
            "wiseft" => match &self.head_wiseft {
                Some(w) => (
                    w,
                    if adapter {
                        "crossmodal-adapter-wiseft"
                    } else {
                        "crossmodal-wiseft"
                    },
                ),
                None => bail!(
                    "--head-variant wiseft: this head has no WiSE-FT variant; train it with \
                     --wise-ft"
                ),
            },
            other => bail!("--head-variant {other}: unknown (default, learned or wiseft)"),
        };
        Ok((
            Head {
                adapter: self.adapter.clone(),
                weight: weight.clone(),
            },
            method,
        ))
    }

    /// The model and classes this artifact was built for ([`super::check_compatible`]).
    pub fn identity(&self) -> super::ArtifactIdentity<'_> {
        super::ArtifactIdentity {
            model: &self.meta.model,
            model_digest: self.meta.model_digest.as_deref(),
            preprocess: self.meta.preprocess.as_ref(),
            projection_dim: self.meta.projection_dim,
            class_folders: &self.meta.class_folders,
            class_names: &self.meta.class_names,
        }
    }
}

/// A setting as Python's `repr` prints it: `0.001`, but `1e-30` rather than thirty zeros.
pub(crate) fn num(x: f64) -> String {
    if x != 0.0 && x.is_finite() && !(1e-4..1e16).contains(&x.abs()) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_print_as_python_does() {
        assert_eq!(num(0.001), "0.001");
        assert_eq!(num(1e-30), "1e-30");
        assert_eq!(num(0.0), "0");
        assert_eq!(num(5e-5), "5e-5");
    }

    #[test]
    fn schedule_warms_up_then_cosine() {
        assert!((lr_at(1e-3, 0, 1000) - 1e-5).abs() < 1e-15);
        assert!((lr_at(1e-3, 25, 1000) - 5e-4).abs() < 1e-12);
        assert!((lr_at(1e-3, 50, 1000) - 1e-3).abs() < 1e-12);
        assert!((lr_at(1e-3, 550, 1000) - 5e-4).abs() < 1e-12);
    }

    #[test]
    fn grid_has_twelve_settings() {
        assert_eq!(default_grid().len(), 12);
        assert_eq!(adapter_grid().len(), 12);
        assert!(adapter_grid().iter().all(|h| h.batch_size == 8));
    }

    #[test]
    fn adapter_init_is_seeded_linear_default() {
        let a = Adapter::random(32, 4, 0.2, 3).unwrap();
        assert_eq!(
            (a.fc1.rows, a.fc1.cols, a.fc2.rows, a.fc2.cols),
            (8, 32, 32, 8)
        );
        a.validate(32).unwrap();
        // nn.Linear's default bound 1/√fan_in per layer, and not all near zero.
        let max1 = a.fc1.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let max2 = a.fc2.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max1 <= 1.0 / 32f32.sqrt() && max1 > 0.8 / 32f32.sqrt());
        assert!(max2 <= 1.0 / 8f32.sqrt() && max2 > 0.8 / 8f32.sqrt());
        assert_eq!(a, Adapter::random(32, 4, 0.2, 3).unwrap());
        assert_ne!(a.fc1, Adapter::random(32, 4, 0.2, 4).unwrap().fc1);
        assert!(Adapter::random(3, 4, 0.2, 3).is_err());
        assert!(a.validate(16).is_err());
    }

    #[test]
    fn batch_split_skips_oversized_halves() {
        assert_eq!(batch_split(32, Modality::Cross, 10, 40), None);
        assert_eq!(batch_split(32, Modality::Cross, 16, 17), None);
        assert_eq!(batch_split(32, Modality::Cross, 17, 17), Some((16, 16)));
        assert_eq!(batch_split(8, Modality::Image, 0, 9), Some((0, 8)));
        assert_eq!(batch_split(8, Modality::Image, 0, 8), None);
        assert_eq!(batch_split(32, Modality::Image, 100, 20), None);
    }
}

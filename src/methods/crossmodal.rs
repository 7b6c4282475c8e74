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

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::model::Clip;

/// `exp(4.60517)`: the fixed logit scale of the official head (×100).
pub const LOGIT_SCALE: f32 = 100.000_25;
/// The official log logit scale.
pub const LOG_LOGIT_SCALE: f64 = 4.60517;
/// Linear warm-up: iterations and start learning rate.
pub const WARMUP_ITERS: usize = 50;
pub const WARMUP_LR: f64 = 1e-5;
/// Validation interval (iterations).
pub const EVAL_FREQ: usize = 100;

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

/// How the head weight starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    /// Per class mean of the L2-normalised template text features, L2-normalised.
    Zeroshot,
    /// PyTorch's `nn.Linear` default: uniform(±1/√D), seeded.
    Random,
}

/// The zero-shot init `[C, D]`: rows of `text_raw` are `(class, template)` pairs, class-major
/// (`row = c·T + t`). As the official `get_zero_shot_weights` (engine/model/head.py): each text
/// feature L2-normalised, the per-class mean, then L2-normalised again. (Issue 4 says "mean of the
/// raw features"; the official code normalises each feature first. With one template both agree.)
pub fn zeroshot_init(text_raw: &Mat, classes: usize) -> Result<Mat> {
    let text_raw = &text_raw.l2_normalized();
    ensure!(
        classes > 0 && text_raw.rows % classes == 0 && text_raw.rows > 0,
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

/// Mean cross-entropy of the head on normalised rows `xn` and its gradient w.r.t. `W`
/// (`s/B · (softmax − onehot)ᵀ · xn`), written into `grad` (`[C, D]`, overwritten).
pub fn loss_and_grad(xn: &Mat, labels: &[usize], w: &Mat, grad: &mut Mat) -> f32 {
    let b = xn.rows;
    let c = w.rows;
    let d = w.cols;
    let mut p = logits_normalized(xn, w);
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
    let scale = LOGIT_SCALE / b as f32;
    grad.data.fill(0.0);
    for (ci, g) in grad.data.chunks_mut(d).enumerate() {
        for i in 0..b {
            let coef = scale * p.data[i * c + ci];
            if coef != 0.0 {
                for (gv, xv) in g.iter_mut().zip(xn.row(i)) {
                    *gv += coef * xv;
                }
            }
        }
    }
    (loss / b as f64) as f32
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
    pub weight: Mat,
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

/// Trains the linear head from `init` for one hyperparameter setting; validates every
/// [`EVAL_FREQ`] iterations and keeps the best state (`best_iter` is the 0-based iteration after
/// whose step it was taken). `None` when the batch does not fit the sets.
pub fn train_one(
    text: &Rows,
    image: &Rows,
    val: &Rows,
    init: &Mat,
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
    let d = init.cols;
    let mut w = init.clone();
    let mut grad = Mat::zeros(init.rows, d);
    let mut adam = Adam::new(w.data.len());
    let mut batch = Mat::zeros(th + ih, d);
    let mut labels = vec![0usize; th + ih];
    let val_acc = |w: &Mat| accuracy(&logits_normalized(&val.x, w), &val.labels);
    // As the official loop: validate after the step of every iteration `it` with
    // `it % EVAL_FREQ == 0` (after 1, 101, 201, ... steps) and keep the first best state.
    let mut best: Option<(f64, usize, Mat)> = None;
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
        loss_and_grad(&batch, &labels, &w, &mut grad);
        adam.step(
            &mut w.data,
            &grad.data,
            lr_at(hyper.lr, it, settings.iters),
            hyper.weight_decay,
        );
        if it % EVAL_FREQ == 0 {
            let acc = val_acc(&w);
            if best.as_ref().is_none_or(|b| acc > b.0) {
                best = Some((acc, it, w.clone()));
            }
        }
    }
    let (val_acc, best_iter, weight) = best?;
    Some(RunOutcome {
        hyper,
        weight,
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
    init: &Mat,
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
                notes.push(format!(
                    "skipped lr {} wd {} batch {}: a half batch exceeds the {} text / {} image rows",
                    h.lr,
                    h.weight_decay,
                    h.batch_size,
                    text.labels.len(),
                    image.labels.len()
                ));
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
        bail!("every sweep setting was skipped: the batch halves exceed the training rows");
    };
    Ok(SweepOutcome {
        best,
        results,
        notes,
    })
}

/// WiSE-FT: `α·W_learned + (1−α)·normalize(W_zeroshot)`.
pub fn wise_ft(learned: &Mat, zeroshot: &Mat, alpha: f32) -> Mat {
    let z = zeroshot.l2_normalized();
    Mat::new(
        learned.rows,
        learned.cols,
        learned
            .data
            .iter()
            .zip(&z.data)
            .map(|(a, b)| alpha * a + (1.0 - alpha) * b)
            .collect(),
    )
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
    pub projection_dim: usize,
    pub class_folders: Vec<String>,
    pub class_names: Vec<String>,
    pub templates: Vec<String>,
    pub shots: Option<usize>,
    pub seed: u64,
    pub head: String,
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
    pub wise_ft_alpha: Option<f64>,
    pub val_acc_wiseft: Option<f64>,
    /// Head used by `eval --adapter` unless `--head-variant` says otherwise: `head` or
    /// `head_wiseft`.
    pub default_head: String,
}

/// A trained head: `head` `[C, D]` and the optional WiSE-FT head.
#[derive(Debug, Clone)]
pub struct CrossArtifact {
    pub meta: CrossMeta,
    pub head: Mat,
    pub head_wiseft: Option<Mat>,
}

impl CrossArtifact {
    pub fn save(&self, path: &Path) -> Result<()> {
        let h = self.head.to_tensor()?;
        let w = self
            .head_wiseft
            .as_ref()
            .map(|m| m.to_tensor())
            .transpose()?;
        let mut t: Vec<(&str, &Tensor)> = vec![("head", &h)];
        if let Some(w) = &w {
            t.push(("head_wiseft", w));
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
        let meta: CrossMeta = serde_json::from_value(meta)
            .with_context(|| format!("{}: malformed cross-modal metadata", path.display()))?;
        let head = Mat::from_tensor(&crate::io::take(&mut t, "head", path)?)?;
        let head_wiseft = t
            .remove("head_wiseft")
            .map(|x| Mat::from_tensor(&x))
            .transpose()?;
        let c = meta.class_names.len();
        ensure!(
            head.rows == c
                && head.cols == meta.projection_dim
                && meta.class_folders.len() == c
                && head_wiseft
                    .as_ref()
                    .is_none_or(|w| w.rows == c && w.cols == head.cols),
            "{}: inconsistent tensor shapes",
            path.display()
        );
        Ok(Self {
            meta,
            head,
            head_wiseft,
        })
    }

    /// The head of a variant: `default`, `learned` or `wiseft`.
    pub fn pick(&self, variant: &str) -> Result<(&Mat, &'static str)> {
        let v = if variant == "default" {
            if self.meta.default_head == "head_wiseft" {
                "wiseft"
            } else {
                "learned"
            }
        } else {
            variant
        };
        match v {
            "learned" => Ok((&self.head, "crossmodal")),
            "wiseft" => match &self.head_wiseft {
                Some(w) => Ok((w, "crossmodal-wiseft")),
                None => bail!("this head has no WiSE-FT variant; train with --wise-ft"),
            },
            other => bail!("unknown head variant `{other}` (default, learned, wiseft)"),
        }
    }

    pub fn check_compatible(&self, clip: &Clip, dataset: &Dataset, path: &Path) -> Result<()> {
        super::check_compatible(
            &super::ArtifactIdentity {
                model: &self.meta.model,
                projection_dim: self.meta.projection_dim,
                class_folders: &self.meta.class_folders,
                class_names: &self.meta.class_names,
            },
            clip,
            dataset,
            path,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

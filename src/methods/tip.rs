//! Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022), computed as the official code
//! (gaopengcuhk/Tip-Adapter) computes them, except that every choice (α/β, the Tip-Adapter-F
//! epoch) is made on the `val` split: clipft never looks at `test` to choose anything.
//!
//! - Cache keys `F` (`[NK, D]`): the *raw* image features of `E` augmented views of the K-shot
//!   train images, averaged over the views, then L2-normalised. Values `L` (`[NK, C]`): one-hot.
//! - Logits: `100·f·Wᵀ + α·exp(−β·(1 − f·Fᵀ))·L` with L2-normalised features `f`.
//! - α/β: the full grid `β_i = i·(β_max−0.1)/n_β + 0.1`, `α_j = j·(α_max−0.1)/n_α + 0.1`
//!   (`i < n_β`, `j < n_α`), keeping the first best val top-1 (β outer, α inner).
//! - Tip-Adapter-F: the keys become a trainable `[NK, D]` weight (affinity `f·Wᵀ`, initialised
//!   with the keys, not re-normalised), trained with AdamW (lr 1e-3, eps 1e-4, weight decay
//!   0.01) on a per-iteration cosine schedule, cross-entropy on the Tip logits with the initial
//!   α/β; the epoch with the best val accuracy is kept, then α/β are searched again on val.
//!
//! The math is in pure functions on tensors ([`tip_logits`], [`Grid`], [`search`],
//! [`TipFTrainer`], [`train_adapter`]); [`build_cache`], [`train`] and [`evaluate_adapter`] run
//! it on a model and a dataset folder.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::optim::{AdamWParams, FusedAdamW};
use crate::data::{Dataset, Sample, Split};
use crate::features::{image_features, l2_normalize, text_classifier, ExtractOptions};
use crate::model::Clip;
use crate::preprocess::{ImageError, View};

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// Per-dataset settings (`configs/tip/<name>.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TipConfig {
    pub name: String,
    /// `[β_max, α_max]` of the search grid.
    pub search_scale: [f64; 2],
    /// `[n_β, n_α]`: grid points of β and α.
    pub search_step: [usize; 2],
    pub init_beta: f64,
    pub init_alpha: f64,
    /// Augmented views averaged into the cache keys.
    pub augment_epochs: usize,
    /// Tip-Adapter-F epochs.
    pub train_epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    /// Prompt templates of the text classifier, `{}` standing for the class name.
    pub templates: Vec<String>,
}

/// Built-in configurations, embedded from `configs/tip/`: the official per-dataset values.
pub const BUILTIN_CONFIGS: &[(&str, &str)] = &[
    ("default", include_str!("../../configs/tip/default.json")),
    ("imagenet", include_str!("../../configs/tip/imagenet.json")),
    (
        "oxford_pets",
        include_str!("../../configs/tip/oxford_pets.json"),
    ),
    ("ucf101", include_str!("../../configs/tip/ucf101.json")),
    (
        "caltech101",
        include_str!("../../configs/tip/caltech101.json"),
    ),
    ("dtd", include_str!("../../configs/tip/dtd.json")),
    ("eurosat", include_str!("../../configs/tip/eurosat.json")),
    ("sun397", include_str!("../../configs/tip/sun397.json")),
    (
        "fgvc_aircraft",
        include_str!("../../configs/tip/fgvc_aircraft.json"),
    ),
    ("food101", include_str!("../../configs/tip/food101.json")),
    (
        "oxford_flowers",
        include_str!("../../configs/tip/oxford_flowers.json"),
    ),
    (
        "stanford_cars",
        include_str!("../../configs/tip/stanford_cars.json"),
    ),
];

/// The largest `search_step` per axis a config may ask for.
pub const MAX_SEARCH_STEPS: usize = 10_000;

/// The most augmented views per train image (the paper averages 10): each is a pass over the
/// train set, so a larger count is a typo, not a setting.
pub const MAX_AUGMENT_EPOCHS: usize = 1000;

/// A config's, or an artifact's, `augment_epochs` is in `1..=`[`MAX_AUGMENT_EPOCHS`].
fn check_augment_epochs(n: usize) -> Result<()> {
    ensure!(
        (1..=MAX_AUGMENT_EPOCHS).contains(&n),
        "augment_epochs must be between 1 and {MAX_AUGMENT_EPOCHS}"
    );
    Ok(())
}

impl TipConfig {
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let cfg: TipConfig =
            serde_json::from_str(text).with_context(|| format!("{origin}: invalid Tip config"))?;
        cfg.validate().with_context(|| origin.to_string())?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        // (The official grids are 200 × 20 at most; the search holds n_β·n_α scores per val
        // image batch.)
        ensure!(
            self.search_step
                .iter()
                .all(|&n| (1..=MAX_SEARCH_STEPS).contains(&n)),
            "search_step must be between [1, 1] and [{MAX_SEARCH_STEPS}, {MAX_SEARCH_STEPS}]"
        );
        ensure!(self.train_epochs >= 1, "train_epochs must be at least 1");
        ensure!(
            self.search_scale.iter().all(|s| s.is_finite() && *s > 0.0),
            "search_scale must be positive"
        );
        // β sharpens the affinities and α weighs the cache: a negative one inverts the method.
        ensure!(
            [self.init_beta, self.init_alpha]
                .iter()
                .all(|v| v.is_finite() && *v >= 0.0),
            "init_beta and init_alpha must be at least 0"
        );
        check_augment_epochs(self.augment_epochs)?;
        ensure!(self.batch_size >= 1, "batch_size must be at least 1");
        ensure!(self.lr > 0.0 && self.lr.is_finite(), "lr must be positive");
        ensure!(!self.templates.is_empty(), "templates must not be empty");
        for t in &self.templates {
            if let Err(e) = crate::templates::check(t) {
                bail!("template `{t}` {e}");
            }
        }
        Ok(())
    }

    /// The file a `--config` value reads, if it names one (not a built-in config).
    pub fn file(spec: &str) -> Option<&Path> {
        let builtin = BUILTIN_CONFIGS.iter().any(|(n, _)| *n == spec);
        (!builtin).then(|| Path::new(spec)).filter(|p| p.is_file())
    }

    /// `--config NAME|FILE`: a built-in name or a JSON file.
    pub fn resolve(spec: &str) -> Result<Self> {
        if let Some((name, text)) = BUILTIN_CONFIGS.iter().find(|(n, _)| *n == spec) {
            return Self::parse(text, name);
        }
        let path = Path::new(spec);
        if !path.is_file() {
            let names: Vec<&str> = BUILTIN_CONFIGS.iter().map(|(n, _)| *n).collect();
            bail!(
                "--config {spec}: neither a file nor a built-in config ({})",
                names.join(", ")
            );
        }
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let text = String::from_utf8(bytes).map_err(|_| {
            anyhow::anyhow!(
                "--config {}: not UTF-8 text (save it as UTF-8)",
                path.display()
            )
        })?;
        // A byte-order mark (some Windows editors) is not part of the JSON.
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text).to_string();
        let origin = path.display().to_string();
        // A file gives the keys it changes: the rest come from `default`, the name from the
        // file's stem.
        let given: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .with_context(|| {
                let object = text.trim_start().starts_with('{');
                format!(
                    "{origin}: invalid Tip config{}",
                    if object {
                        ""
                    } else {
                        " (expected a JSON object)"
                    }
                )
            })?;
        let mut missing = serde_json::to_value(Self::resolve("default")?)?
            .as_object()
            .expect("a config serialises to an object")
            .clone();
        missing.insert(
            "name".into(),
            path.file_stem()
                .map_or("custom".into(), |s| s.to_string_lossy())
                .into(),
        );
        missing.retain(|k, _| !given.contains_key(k));
        // The missing keys go textually before the closing brace, so a parse error's line and
        // column still point into the user's file (the appended keys are valid).
        let close = text.rfind('}').expect("a JSON object ends with `}`");
        let mut merged = text[..close].to_string();
        for (i, (k, v)) in missing.iter().enumerate() {
            let sep = if i == 0 && given.is_empty() { "" } else { "," };
            merged.push_str(&format!("{sep}{}:{v}", serde_json::Value::from(k.as_str())));
        }
        merged.push_str(&text[close..]);
        Self::parse(&merged, &origin)
    }

    pub fn grid(&self) -> Grid {
        Grid::new(self.search_scale, self.search_step)
    }
}

// ---------------------------------------------------------------------------------------------
// Pure math
// ---------------------------------------------------------------------------------------------

/// Cache keys from `E` views of raw features (each `[NK, D]`): the mean over views of the raw
/// features, then L2-normalised (the official order; normalising each view first differs).
pub fn cache_keys_from_views(views: &[Tensor]) -> Result<Tensor> {
    ensure!(!views.is_empty(), "no augmented views");
    let stacked = Tensor::stack(views, 0)?.to_dtype(DType::F32)?;
    l2_normalize(&stacked.mean(0)?)
}

/// One-hot `[N, C]` f32 values.
pub fn one_hot(labels: &[usize], classes: usize) -> Result<Tensor> {
    let mut v = vec![0f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        ensure!(l < classes, "label {l} out of range for {classes} classes");
        v[i * classes + l] = 1.0;
    }
    Ok(Tensor::from_vec(v, (labels.len(), classes), &Device::Cpu)?)
}

/// Labels of one-hot rows (an error when a row is not one-hot).
pub fn labels_of_one_hot(values: &Tensor) -> Result<Vec<usize>> {
    let rows = values.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let ones: Vec<usize> = (0..r.len()).filter(|&j| r[j] == 1.0).collect();
            let zeros = r.iter().filter(|&&x| x == 0.0).count();
            ensure!(
                ones.len() == 1 && zeros + 1 == r.len(),
                "cache value row {i} is not one-hot"
            );
            Ok(ones[0])
        })
        .collect()
}

/// Tip-Adapter logits `100·f·Wᵀ + α·exp(−β·(1 − A))·L` from L2-normalised `features` (`[N, D]`),
/// the `affinity` `A` (`[N, NK]`: `f·Fᵀ`, or `f·Wᵀ` of a trained adapter), the cache `values`
/// (`[NK, C]`) and the text `classifier` (`[C, D]`). Differentiable in `affinity`.
pub fn tip_logits(
    features: &Tensor,
    affinity: &Tensor,
    values: &Tensor,
    classifier: &Tensor,
    beta: f64,
    alpha: f64,
) -> Result<Tensor> {
    let clip_logits = crate::eval::zero_shot_logits(features, classifier)?;
    Ok((clip_logits + cache_logits(affinity, values, beta)?.affine(alpha, 0.0)?)?)
}

/// `exp(−β·(1 − A))·L`, i.e. `exp(β·A − β)·L`.
pub fn cache_logits(affinity: &Tensor, values: &Tensor, beta: f64) -> Result<Tensor> {
    Ok(affinity.affine(beta, -beta)?.exp()?.matmul(values)?)
}

/// The α/β search grid: `β_i = β_0 + i·h_β` for `i < n_β` and `α_j = α_0 + j·h_α` for `j < n_α`,
/// with `β_0 = α_0 = 0.1` and `h = (max − 0.1) / n`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Grid {
    pub beta0: f64,
    pub beta_step: f64,
    pub n_beta: usize,
    pub alphas: Vec<f64>,
}

impl Grid {
    pub fn new(scale: [f64; 2], step: [usize; 2]) -> Self {
        let value = |i: usize, s: f64, n: usize| i as f64 * (s - 0.1) / n as f64 + 0.1;
        Self {
            beta0: 0.1,
            beta_step: (scale[0] - 0.1) / step[0] as f64,
            n_beta: step[0],
            alphas: (0..step[1]).map(|j| value(j, scale[1], step[1])).collect(),
        }
    }

    /// A single point (no search).
    pub fn single(beta: f64, alpha: f64) -> Self {
        Self {
            beta0: beta,
            beta_step: 0.0,
            n_beta: 1,
            alphas: vec![alpha],
        }
    }

    pub fn beta(&self, i: usize) -> f64 {
        self.beta0 + i as f64 * self.beta_step
    }

    pub fn betas(&self) -> Vec<f64> {
        (0..self.n_beta).map(|i| self.beta(i)).collect()
    }
}

/// Result of an α/β search.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchResult {
    pub beta: f64,
    pub alpha: f64,
    /// Top-1 in percent at `(beta, alpha)`.
    pub acc: f64,
    pub n: usize,
    /// Correct predictions per grid point, `[n_beta][n_alpha]` flattened β-major.
    #[serde(skip)]
    pub correct: Vec<u32>,
}

/// Exhaustive α/β search: the first grid point (β outer, α inner) with the best top-1.
///
/// `affinity` is `[N, NK]`, `cache_labels` the class of each cache entry (the one-hot values),
/// `clip_logits` the `[N, C]` zero-shot logits. Vectorised: the affinity is computed once by the
/// caller; per β, each row's `exp(−β(1−a))` comes from the previous β by one multiplication
/// (`exp(−h(1−a))`, in f64 so 200 steps stay exact to ~1e-14), the one-hot product is a per-class
/// sum, and all α share it. Rows run in parallel.
pub fn search(
    affinity: &Tensor,
    cache_labels: &[usize],
    clip_logits: &Tensor,
    labels: &[usize],
    grid: &Grid,
) -> Result<SearchResult> {
    let (n, nk) = affinity.dims2()?;
    let (n2, c) = clip_logits.dims2()?;
    ensure!(
        n == n2 && n == labels.len(),
        "search: {n} affinity rows, {n2} logit rows, {} labels",
        labels.len()
    );
    ensure!(
        nk == cache_labels.len(),
        "search: {nk} cache columns, {} cache labels",
        cache_labels.len()
    );
    ensure!(
        cache_labels.iter().all(|&l| l < c) && labels.iter().all(|&l| l < c),
        "label out of range"
    );
    ensure!(
        grid.n_beta >= 1 && !grid.alphas.is_empty(),
        "empty search grid"
    );
    let a = affinity
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let z = clip_logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (nb, na) = (grid.n_beta, grid.alphas.len());
    let alphas = &grid.alphas;
    let counts = (0..n)
        .into_par_iter()
        .fold(
            || vec![0u32; nb * na],
            |mut acc, row| {
                let arow = &a[row * nk..(row + 1) * nk];
                let zrow = &z[row * c..(row + 1) * c];
                let y = labels[row];
                let mut e: Vec<f64> = arow
                    .iter()
                    .map(|&x| (-grid.beta0 * (1.0 - x as f64)).exp())
                    .collect();
                let r: Vec<f64> = arow
                    .iter()
                    .map(|&x| (-grid.beta_step * (1.0 - x as f64)).exp())
                    .collect();
                let zr: Vec<f64> = zrow.iter().map(|&x| x as f64).collect();
                let mut s = vec![0f64; c];
                for i in 0..nb {
                    s.iter_mut().for_each(|v| *v = 0.0);
                    for ((ek, rk), &lk) in e.iter_mut().zip(&r).zip(cache_labels) {
                        s[lk] += *ek;
                        *ek *= rk;
                    }
                    let out = &mut acc[i * na..(i + 1) * na];
                    for (j, &alpha) in alphas.iter().enumerate() {
                        let mut best = 0;
                        let mut best_v = f64::NEG_INFINITY;
                        for (cc, (&zc, &sc)) in zr.iter().zip(&s).enumerate() {
                            let v = zc + alpha * sc;
                            if v > best_v {
                                best_v = v;
                                best = cc;
                            }
                        }
                        out[j] += (best == y) as u32;
                    }
                }
                acc
            },
        )
        .reduce(
            || vec![0u32; nb * na],
            |mut x, y| {
                x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
                x
            },
        );
    let mut best = 0usize;
    for (k, &v) in counts.iter().enumerate() {
        if v > counts[best] {
            best = k;
        }
    }
    let (i, j) = (best / na, best % na);
    Ok(SearchResult {
        beta: grid.beta(i),
        alpha: alphas[j],
        acc: pct(counts[best] as usize, n),
        n,
        correct: counts,
    })
}

fn pct(hits: usize, n: usize) -> f64 {
    if n == 0 {
        0.0
    } else {
        100.0 * hits as f64 / n as f64
    }
}

/// Top-1 accuracy (percent) of `[N, C]` logits; ties go to the lower class index.
pub fn top1(logits: &Tensor, labels: &[usize]) -> Result<f64> {
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    ensure!(
        rows.len() == labels.len(),
        "{} rows for {} labels",
        rows.len(),
        labels.len()
    );
    let hits = rows
        .iter()
        .zip(labels)
        .filter(|(r, &y)| {
            let mut best = 0;
            for (j, &v) in r.iter().enumerate() {
                if v > r[best] {
                    best = j;
                }
            }
            best == y
        })
        .count();
    Ok(pct(hits, labels.len()))
}

/// `CosineAnnealingLR` (η_min = 0) at step `t` of `total`.
pub fn cosine_lr(base: f64, t: usize, total: usize) -> f64 {
    if total == 0 {
        return base;
    }
    base * (1.0 + (std::f64::consts::PI * t as f64 / total as f64).cos()) / 2.0
}

/// Tip-Adapter-F optimisation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TipFSettings {
    pub epochs: usize,
    pub lr: f64,
    pub batch_size: usize,
    pub init_beta: f64,
    pub init_alpha: f64,
    /// AdamW's ε (the official 1e-4).
    pub eps: f64,
    /// AdamW's decoupled weight decay (PyTorch's default 0.01).
    pub weight_decay: f64,
    /// Seed of the per-epoch shuffles.
    pub seed: u64,
}

impl TipFSettings {
    pub fn from_config(cfg: &TipConfig, seed: u64) -> Self {
        Self {
            epochs: cfg.train_epochs,
            lr: cfg.lr,
            batch_size: cfg.batch_size,
            init_beta: cfg.init_beta,
            init_alpha: cfg.init_alpha,
            eps: 1e-4,
            weight_decay: 0.01,
            seed,
        }
    }
}

/// The trainable cache of Tip-Adapter-F: a `[NK, D]` weight `W` (affinity `f·Wᵀ`) with AdamW on a
/// per-iteration cosine schedule.
pub struct TipFTrainer {
    pub weight: Var,
    opt: FusedAdamW,
    values: Tensor,
    classifier: Tensor,
    beta: f64,
    alpha: f64,
    base_lr: f64,
    total_steps: usize,
    step: usize,
}

impl TipFTrainer {
    /// `keys` (`[NK, D]`) initialise the weight as they are (not re-normalised).
    pub fn new(
        keys: &Tensor,
        values: &Tensor,
        classifier: &Tensor,
        settings: &TipFSettings,
        total_steps: usize,
    ) -> Result<Self> {
        let weight = Var::from_tensor(&keys.to_dtype(DType::F32)?.copy()?)?;
        let opt = FusedAdamW::new(
            &weight,
            AdamWParams {
                lr: settings.lr,
                beta1: 0.9,
                beta2: 0.999,
                eps: settings.eps,
                weight_decay: settings.weight_decay,
            },
        )?;
        Ok(Self {
            weight,
            opt,
            values: values.to_dtype(DType::F32)?,
            classifier: classifier.to_dtype(DType::F32)?,
            beta: settings.init_beta,
            alpha: settings.init_alpha,
            base_lr: settings.lr,
            total_steps,
            step: 0,
        })
    }

    /// Tip logits of L2-normalised `features` under the current weight (and initial α/β).
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        let affinity = features.matmul(&self.weight.as_tensor().t()?)?;
        tip_logits(
            features,
            &affinity,
            &self.values,
            &self.classifier,
            self.beta,
            self.alpha,
        )
    }

    /// Cross-entropy of a batch (a differentiable scalar).
    pub fn loss(&self, features: &Tensor, labels: &[usize]) -> Result<Tensor> {
        let y: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
        let y = Tensor::new(y.as_slice(), features.device())?;
        Ok(candle_nn::loss::cross_entropy(&self.logits(features)?, &y)?)
    }

    /// The learning rate the next step uses.
    pub fn current_lr(&self) -> f64 {
        cosine_lr(self.base_lr, self.step, self.total_steps)
    }

    /// The loss of a batch and its gradient with respect to the weight, in closed form:
    /// `d logits = (softmax − onehot)/B`, `dE = α·d logits·Lᵀ`, `dA = β·E ⊙ dE`, `dW = dAᵀ·x`
    /// with `E = exp(β(A − 1))`, `A = x·Wᵀ`. The same numbers as autograd through [`Self::loss`]
    /// (tested), without autograd's wasted products (the gradient of `x` and of the values).
    pub fn loss_and_grad(&self, features: &Tensor, labels: &[usize]) -> Result<(f32, Tensor)> {
        let w = self.weight.as_tensor();
        let b = features.dims2()?.0;
        ensure!(
            b == labels.len(),
            "{b} feature rows for {} labels",
            labels.len()
        );
        let e = features
            .matmul(&w.t()?)?
            .affine(self.beta, -self.beta)?
            .exp()?;
        let logits = (crate::eval::zero_shot_logits(features, &self.classifier)?
            + e.matmul(&self.values)?.affine(self.alpha, 0.0)?)?;
        let log_p = candle_nn::ops::log_softmax(&logits, 1)?;
        let y: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
        let y = Tensor::new(y.as_slice(), features.device())?;
        let loss = candle_nn::loss::nll(&log_p, &y)?.to_scalar::<f32>()?;
        let onehot = one_hot(labels, self.values.dims2()?.1)?.to_device(features.device())?;
        let d_logits = ((log_p.exp()? - onehot)? * (1.0 / b as f64))?;
        let d_e = d_logits.matmul(&self.values.t()?)?;
        let d_a = (e * d_e)?.affine(self.alpha * self.beta, 0.0)?;
        let d_w = d_a.t()?.matmul(features)?;
        Ok((loss, d_w))
    }

    /// One optimisation step on a batch; returns the loss before the step.
    pub fn step(&mut self, features: &Tensor, labels: &[usize]) -> Result<f32> {
        self.opt.set_learning_rate(self.current_lr());
        let (loss, grad) = self.loss_and_grad(features, labels)?;
        self.opt.step(&self.weight, &grad)?;
        self.step += 1;
        Ok(loss)
    }

    pub fn weight(&self) -> Result<Tensor> {
        Ok(self.weight.as_tensor().copy()?)
    }
}

/// What [`train_adapter`] returns.
#[derive(Debug, Clone)]
pub struct TipFOutcome {
    /// The weight of the best val epoch, `[NK, D]`.
    pub weight: Tensor,
    pub best_epoch: usize,
    /// Val top-1 (percent, initial α/β) after each epoch.
    pub val_accs: Vec<f64>,
    /// Mean train loss per epoch.
    pub losses: Vec<f64>,
}

/// The permutation of `n` training rows for an epoch.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (epoch as u64 + 1),
    );
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rng);
    idx
}

/// Tip-Adapter-F training on features. `epoch_features(e)` gives the L2-normalised `[NK, D]`
/// features of the train images for epoch `e` (a view from a pre-encoded bank, or freshly
/// encoded), rows aligned with `train_labels`. Each epoch is shuffled, split into batches of
/// `batch_size`, and scored on val with the initial α/β; the best epoch's weight (first best) is
/// returned.
#[allow(clippy::too_many_arguments)]
pub fn train_adapter(
    keys: &Tensor,
    values: &Tensor,
    classifier: &Tensor,
    settings: &TipFSettings,
    train_labels: &[usize],
    val_features: &Tensor,
    val_labels: &[usize],
    epoch_features: &mut dyn FnMut(usize) -> Result<Tensor>,
    progress: bool,
) -> Result<TipFOutcome> {
    let nk = train_labels.len();
    ensure!(nk > 0, "no training images");
    ensure!(settings.epochs >= 1, "--epochs must be at least 1");
    let batch = settings.batch_size.max(1);
    let iters = nk.div_ceil(batch);
    let mut trainer =
        TipFTrainer::new(keys, values, classifier, settings, settings.epochs * iters)?;
    let mut best: Option<(f64, usize, Tensor)> = None;
    let mut val_accs = Vec::new();
    let mut losses = Vec::new();
    let pb = crate::progress::bar(settings.epochs as u64, "Tip-F", progress);
    for epoch in 0..settings.epochs {
        let feats = epoch_features(epoch)?;
        ensure!(
            feats.dims2()?.0 == nk,
            "epoch {epoch}: {} feature rows for {nk} labels",
            feats.dims2()?.0
        );
        let order = epoch_order(nk, settings.seed, epoch);
        let mut sum = 0.0;
        for chunk in order.chunks(batch) {
            let idx: Vec<u32> = chunk.iter().map(|&i| i as u32).collect();
            let idx = Tensor::new(idx.as_slice(), feats.device())?;
            let x = feats.index_select(&idx, 0)?;
            let y: Vec<usize> = chunk.iter().map(|&i| train_labels[i]).collect();
            sum += trainer.step(&x, &y)? as f64;
        }
        let loss = sum / iters as f64;
        ensure!(
            loss.is_finite(),
            "Tip-Adapter-F training diverged in epoch {} (mean loss {loss}): lower --lr (it is {})",
            epoch + 1,
            settings.lr
        );
        losses.push(loss);
        let acc = top1(&trainer.logits(val_features)?, val_labels)?;
        val_accs.push(acc);
        if best.as_ref().is_none_or(|(b, _, _)| acc > *b) {
            best = Some((acc, epoch, trainer.weight()?));
        }
        pb.set_message(format!("Tip-F val {acc:.1}%"));
        pb.inc(1);
    }
    pb.finish_and_clear();
    let (_, best_epoch, weight) = best.expect("at least one epoch");
    Ok(TipFOutcome {
        weight,
        best_epoch,
        val_accs,
        losses,
    })
}

// ---------------------------------------------------------------------------------------------
// Artifacts
// ---------------------------------------------------------------------------------------------

/// Tip-Adapter (`tip`) or Tip-Adapter-F (`tipf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Tip,
    Tipf,
}

impl Kind {
    pub fn method_name(self) -> &'static str {
        match self {
            Kind::Tip => "tip-adapter",
            Kind::Tipf => "tip-adapter-f",
        }
    }
}

/// The augmentation of the cache views (RandomResizedCrop + horizontal flip).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    pub scale_min: f64,
    pub scale_max: f64,
    pub flip_p: f64,
}

pub const OFFICIAL_AUGMENT: Augment = Augment {
    scale_min: 0.5,
    scale_max: 1.0,
    flip_p: 0.5,
};

impl Augment {
    /// The ranges torchvision's `RandomResizedCrop(scale)` and `RandomHorizontalFlip(p)` take.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            0.0 < self.scale_min && self.scale_min <= self.scale_max && self.scale_max.is_finite(),
            "augment scale must satisfy 0 < scale_min <= scale_max (it is {}..{})",
            self.scale_min,
            self.scale_max
        );
        ensure!(
            (0.0..=1.0).contains(&self.flip_p),
            "augment flip_p must be in 0..1 (it is {})",
            self.flip_p
        );
        Ok(())
    }

    pub fn view(&self, seed: u64, epoch: u64) -> View {
        View::Augment {
            seed,
            epoch,
            scale_min: self.scale_min,
            scale_max: self.scale_max,
            flip_p: self.flip_p,
        }
    }
}

/// Tip-Adapter-F training record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainInfo {
    pub settings: TipFSettings,
    /// Fresh augmented views every epoch (true) or the cache's views reused (false).
    pub fresh_views: bool,
    pub best_epoch: usize,
    pub val_accs: Vec<f64>,
    pub losses: Vec<f64>,
}

/// Everything needed to use and reproduce an artifact (JSON metadata under `clipft`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TipMeta {
    pub kind: Kind,
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
    pub dtype: String,
    pub class_folders: Vec<String>,
    pub class_names: Vec<String>,
    pub templates: Vec<String>,
    pub config: TipConfig,
    pub data: String,
    pub shots: Option<usize>,
    pub seed: u64,
    pub allow_fewer_shots: bool,
    pub augment_epochs: usize,
    pub augment: Augment,
    /// Train images of the cache, relative to the dataset folder, in cache row order.
    pub train_paths: Vec<String>,
    /// SHA-256 of each train image's bytes, same order (absent before 2026-11-28): `tip train`
    /// refuses images that changed since the cache was built from them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_digests: Option<Vec<String>>,
    /// The searched (or, without a search, initial) α/β.
    pub beta: f64,
    pub alpha: f64,
    /// Val top-1 (percent) at `beta`/`alpha`.
    pub val_acc: f64,
    /// Val top-1 at the initial α/β and of zero-shot CLIP.
    pub val_acc_init: f64,
    pub val_acc_zeroshot: f64,
    pub val_n: usize,
    pub train: Option<TrainInfo>,
    /// Whether some of its images were decoded reduced (`--fast-decode`): not the reference
    /// pixels. Absent (false) otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fast_decode: bool,
    /// Whether its augmented views were drawn by the images' names in composed form
    /// ([`crate::features::view_key`]); absent (false) before 2026-11-29, when they went by the
    /// names' bytes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub composed_views: bool,
}

impl TipMeta {
    /// Whether `tip train` would draw other augmented views of the cache's images than those
    /// its keys were encoded from: a cache built before views went by composed names, from
    /// names that are not composed (as macOS stores accented names).
    fn views_went_by_bytes(&self) -> bool {
        !self.composed_views && !self.train_paths.iter().all(|r| crate::data::is_composed(r))
    }

    /// What the methods take on trust from the file: the settings they rerun with (`tip train`
    /// re-encodes the cache's views) and the blend they evaluate with.
    fn validate(&self) -> Result<()> {
        ensure!(
            self.version == 1,
            "version {} (this clipft reads version 1: the file is from a newer clipft)",
            self.version
        );
        self.config.validate()?;
        check_augment_epochs(self.augment_epochs)?;
        self.augment.validate()?;
        ensure!(
            [self.alpha, self.beta]
                .iter()
                .all(|v| v.is_finite() && *v >= 0.0),
            "alpha and beta must be at least 0 (they are {} and {})",
            self.alpha,
            self.beta
        );
        ensure!(
            self.train_paths.len()
                == self
                    .train_digests
                    .as_ref()
                    .map_or(self.train_paths.len(), Vec::len),
            "train_paths and train_digests differ in length"
        );
        Ok(())
    }
}

/// A Tip-Adapter or Tip-Adapter-F artifact.
#[derive(Debug, Clone)]
pub struct TipArtifact {
    pub meta: TipMeta,
    /// `[NK, D]`, L2-normalised.
    pub cache_keys: Tensor,
    /// `[NK, C]` one-hot.
    pub cache_values: Tensor,
    /// `[C, D]`.
    pub classifier: Tensor,
    /// `[NK, D]` trained keys (Tip-Adapter-F only).
    pub adapter: Option<Tensor>,
}

impl TipArtifact {
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(&str, &Tensor)> = vec![
            ("cache_keys", &self.cache_keys),
            ("cache_values", &self.cache_values),
            ("text_classifier", &self.classifier),
        ];
        if let Some(a) = &self.adapter {
            tensors.push(("adapter_weight", a));
        }
        crate::io::save(path, &tensors, &serde_json::to_value(&self.meta)?)
    }

    /// Loads the artifact `eval --adapter` was given.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_checked(path, |kind| {
            format!(
                "{}: not an adapter (kind `{kind}`): `--adapter` takes a Tip-Adapter artifact \
                 (`clipft tip build-cache` / `tip train`), a cross-modal head (`clipft crossmodal \
                 train`) or an FD-Align output folder (`clipft fdalign train`){}",
                path.display(),
                if path
                    .file_name()
                    .is_some_and(|n| n == "fdalign_head.safetensors")
                {
                    "; for FD-Align give the folder, not its head file"
                } else {
                    ""
                }
            )
        })
    }

    /// Loads the cache `tip train --cache` was given.
    pub fn load_cache(path: &Path) -> Result<Self> {
        Self::load_checked(path, |kind| {
            format!(
                "--cache {}: not a Tip-Adapter cache (kind `{kind}`); pass the file from `clipft \
                 tip build-cache`",
                path.display()
            )
        })
    }

    /// Loads a Tip-Adapter(-F) artifact; `wrong_kind` says what else the file is.
    fn load_checked(path: &Path, wrong_kind: impl Fn(&str) -> String) -> Result<Self> {
        let (mut t, meta) = crate::io::load(path)?;
        let kind = meta.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        ensure!(kind == "tip" || kind == "tipf", "{}", wrong_kind(kind));
        let meta: TipMeta = serde_json::from_value(meta)
            .with_context(|| format!("{}: malformed Tip-Adapter metadata", path.display()))?;
        meta.validate()
            .with_context(|| format!("{}: invalid Tip-Adapter metadata", path.display()))?;
        let cache_keys = crate::io::take_matrix(&mut t, "cache_keys", path)?;
        let cache_values = crate::io::take_matrix(&mut t, "cache_values", path)?;
        let classifier = crate::io::take_matrix(&mut t, "text_classifier", path)?;
        let adapter = match meta.kind {
            Kind::Tipf => Some(crate::io::take_matrix(&mut t, "adapter_weight", path)?),
            Kind::Tip => None,
        };
        let (nk, d) = cache_keys
            .dims2()
            .with_context(|| format!("{}: cache_keys is not a matrix", path.display()))?;
        let c = meta.class_names.len();
        let shapes = format!(
            "cache_keys {:?}, cache_values {:?}, text_classifier {:?}{}; {} classes, \
             projection_dim {}",
            cache_keys.dims(),
            cache_values.dims(),
            classifier.dims(),
            adapter.as_ref().map_or(String::new(), |a| format!(
                ", adapter_weight {:?}",
                a.dims()
            )),
            c,
            meta.projection_dim
        );
        ensure!(
            d == meta.projection_dim
                && cache_values.dims() == [nk, c]
                && classifier.dims() == [c, d]
                && adapter.as_ref().is_none_or(|a| a.dims() == [nk, d])
                && meta.class_folders.len() == c
                && meta.train_paths.len() == nk
                && nk > 0,
            "{}: inconsistent tensor shapes ({shapes}, {} train_paths)",
            path.display(),
            meta.train_paths.len()
        );
        let labels =
            labels_of_one_hot(&cache_values).with_context(|| path.display().to_string())?;
        // Each row's class is also recorded by its image's class folder: rows of the values
        // moved against the keys would otherwise vote for the wrong classes unnoticed.
        for (i, (&y, rel)) in labels.iter().zip(&meta.train_paths).enumerate() {
            // (Written on Windows, the separator is a backslash; on Unix it may be part of a name.)
            let in_folder =
                |seps: &[char]| rel.rsplit(seps).nth(1) == Some(meta.class_folders[y].as_str());
            ensure!(
                in_folder(&['/']) || in_folder(&['/', '\\']),
                "{}: cache value row {i} says class `{}`, but its train image {rel} is not in \
                 that class's folder (the file is damaged)",
                path.display(),
                meta.class_folders[y]
            );
        }
        Ok(Self {
            meta,
            cache_keys,
            cache_values,
            classifier,
            adapter,
        })
    }

    /// The keys the affinity uses: the trained weight for Tip-Adapter-F, the cache keys otherwise.
    pub fn keys(&self) -> &Tensor {
        self.adapter.as_ref().unwrap_or(&self.cache_keys)
    }

    /// Logits of L2-normalised features at the artifact's α/β.
    pub fn logits(&self, features: &Tensor) -> Result<Tensor> {
        let affinity = features.matmul(&self.keys().t()?)?;
        tip_logits(
            features,
            &affinity,
            &self.cache_values,
            &self.classifier,
            self.meta.beta,
            self.meta.alpha,
        )
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

/// SHA-256 of each file's bytes (a few-shot train set: a few MB to a few hundred, read in
/// parallel).
fn file_digests(paths: &[PathBuf]) -> Result<Vec<String>> {
    use rayon::prelude::*;
    use sha2::{Digest, Sha256};
    paths
        .par_iter()
        .map(|p| {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            Ok(format!("{:x}", Sha256::digest(&bytes)))
        })
        .collect()
}

/// Whether two model ids name the same checkpoint (equal ids, or the same local folder).
pub fn same_model(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    match (Path::new(a).canonicalize(), Path::new(b).canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Orchestration on a model and a dataset
// ---------------------------------------------------------------------------------------------

/// Settings of `clipft tip build-cache`.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub config: TipConfig,
    pub shots: Option<usize>,
    pub seed: u64,
    pub allow_fewer_shots: bool,
    pub augment_epochs: usize,
    pub augment: Augment,
}

/// Raw features of `E` augmented views of the train images (cached per view), `[NK, D]` each.
pub fn encode_views(
    clip: &Clip,
    paths: &[PathBuf],
    augment: &Augment,
    seed: u64,
    epochs: std::ops::Range<u64>,
    opts: &ExtractOptions,
) -> Result<Vec<Tensor>> {
    // Rows must stay aligned with the labels across views: never skip a train image.
    let strict = ExtractOptions {
        skip_bad_images: false,
        ..opts.clone()
    };
    epochs
        .map(|e| Ok(image_features(clip, paths, &augment.view(seed, e), &strict)?.features))
        .collect()
}

/// L2-normalised centre-crop features and labels of a split (unreadable images skipped only with
/// `--skip-bad-images`), plus the images skipped.
pub fn split_features(
    clip: &Clip,
    samples: &[Sample],
    opts: &ExtractOptions,
) -> Result<(Tensor, Vec<usize>, Vec<ImageError>)> {
    let paths: Vec<PathBuf> = samples.iter().map(|s| s.path.clone()).collect();
    let f = image_features(clip, &paths, &View::Center, opts)?;
    let labels = f.kept.iter().map(|&i| samples[i].label).collect();
    Ok((l2_normalize(&f.features)?, labels, f.skipped))
}

fn relative(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

fn val_samples(dataset: &Dataset) -> Result<Vec<Sample>> {
    dataset.samples(Split::Val).map_err(|e| {
        anyhow::anyhow!(
            "{e}. Tip-Adapter chooses α/β (and the Tip-Adapter-F epoch) on the val split; clipft \
             never tunes on test, so the dataset needs a val/ folder"
        )
    })
}

/// `clipft tip build-cache`: text classifier, augmented cache, α/β search on val.
pub fn build_cache(
    clip: &Clip,
    dataset: &Dataset,
    train: &[Sample],
    build: &BuildOptions,
    opts: &ExtractOptions,
) -> Result<TipArtifact> {
    let cfg = &build.config;
    ensure!(!train.is_empty(), "no training images");
    let val = val_samples(dataset)?;
    let class_names = dataset.class_names();
    let classifier = text_classifier(
        clip,
        &class_names,
        &cfg.templates,
        crate::features::TEXT_BATCH,
        opts.progress,
    )?;
    let paths: Vec<PathBuf> = train.iter().map(|s| s.path.clone()).collect();
    let labels: Vec<usize> = train.iter().map(|s| s.label).collect();
    let views = encode_views(
        clip,
        &paths,
        &build.augment,
        build.seed,
        0..build.augment_epochs as u64,
        opts,
    )?;
    let keys = cache_keys_from_views(&views)?;
    let values = one_hot(&labels, class_names.len())?;
    let (val_f, val_labels, val_skipped) = split_features(clip, &val, opts)?;
    crate::features::warn_skipped(&val_skipped, "val ");
    let clip_logits = crate::eval::zero_shot_logits(&val_f, &classifier)?;
    let affinity = val_f.matmul(&keys.t()?)?;
    let zs = top1(&clip_logits, &val_labels)?;
    let init = search(
        &affinity,
        &labels,
        &clip_logits,
        &val_labels,
        &Grid::single(cfg.init_beta, cfg.init_alpha),
    )?;
    let found = search(&affinity, &labels, &clip_logits, &val_labels, &cfg.grid())?;
    let meta = TipMeta {
        kind: Kind::Tip,
        version: 1,
        model: clip.files.id.clone(),
        revision: clip.files.revision.clone(),
        model_digest: Some(clip.weights_digest()?.to_string()),
        preprocess: Some(clip.preprocess.clone()),
        projection_dim: clip.config().projection_dim,
        dtype: clip.precision.to_string(),
        class_folders: dataset.class_folders(),
        class_names,
        templates: cfg.templates.clone(),
        config: cfg.clone(),
        data: std::path::absolute(&dataset.root)
            .unwrap_or_else(|_| dataset.root.clone())
            .display()
            .to_string(),
        shots: build.shots,
        seed: build.seed,
        allow_fewer_shots: build.allow_fewer_shots,
        augment_epochs: build.augment_epochs,
        augment: build.augment,
        train_paths: paths.iter().map(|p| relative(&dataset.root, p)).collect(),
        train_digests: Some(file_digests(&paths)?),
        beta: found.beta,
        alpha: found.alpha,
        val_acc: found.acc,
        val_acc_init: init.acc,
        val_acc_zeroshot: zs,
        val_n: val_labels.len(),
        train: None,
        fast_decode: opts.decode != crate::preprocess::Decode::Exact,
        composed_views: true,
    };
    Ok(TipArtifact {
        meta,
        cache_keys: keys,
        cache_values: values,
        classifier,
        adapter: None,
    })
}

/// Settings of `clipft tip train`.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub settings: TipFSettings,
    pub fresh_views: bool,
}

/// `clipft tip train`: Tip-Adapter-F from a Tip-Adapter artifact. `train` must be the same
/// images, in the same order, as the cache (checked against the artifact).
pub fn train(
    clip: &Clip,
    dataset: &Dataset,
    cache: &TipArtifact,
    train: &[Sample],
    train_opts: &TrainOptions,
    opts: &ExtractOptions,
) -> Result<TipArtifact> {
    let m = &cache.meta;
    let paths: Vec<PathBuf> = train.iter().map(|s| s.path.clone()).collect();
    let rel: Vec<String> = paths.iter().map(|p| relative(&dataset.root, p)).collect();
    // (First: such a cache's sample, drawn by the names' bytes, may differ as well.)
    ensure!(
        !m.views_went_by_bytes(),
        "--cache: built by a clipft older than 2026-11-29 from image names with decomposed \
         accents (as macOS stores them), whose sample and augmented views then went by the \
         names' bytes; this clipft goes by the composed names, so its views would not be those \
         of the cache keys: build the cache again"
    );
    ensure!(
        // (Compared composed: a copy between macOS and Linux changes accented names' bytes.)
        crate::data::same_names(&rel, &m.train_paths),
        "--data {}: the few-shot train images ({}, seed {}) differ from the {} images the \
         cache was built from: was the train split changed?",
        dataset.root.display(),
        m.shots.map_or("every image".to_string(), |k| format!(
            "{k} shots per class"
        )),
        m.seed,
        m.train_paths.len()
    );
    if let Some(want) = &m.train_digests {
        let got = file_digests(&paths)?;
        if let Some(i) = (0..got.len()).find(|&i| got.get(i) != want.get(i)) {
            bail!(
                "--data {}: {} changed since the cache was built from it; build the cache again \
                 with --no-cache (the feature cache may hold the old image's features if its \
                 size and modification time were kept)",
                dataset.root.display(),
                paths[i].display()
            );
        }
    }
    let labels: Vec<usize> = train.iter().map(|s| s.label).collect();
    ensure!(
        labels_of_one_hot(&cache.cache_values)? == labels,
        "--cache: its cache values do not match the labels of its train images (the file is \
         damaged)"
    );
    let val = val_samples(dataset)?;
    let (val_f, val_labels, val_skipped) = split_features(clip, &val, opts)?;
    crate::features::warn_skipped(&val_skipped, "val ");
    let quiet_opts = ExtractOptions {
        progress: opts.progress,
        ..opts.clone()
    };
    let bank: Vec<Tensor> = if train_opts.fresh_views {
        Vec::new()
    } else {
        encode_views(
            clip,
            &paths,
            &m.augment,
            m.seed,
            // Epoch e trains on view e mod E: views past the last epoch are never used.
            0..m.augment_epochs.min(train_opts.settings.epochs) as u64,
            &quiet_opts,
        )?
        .iter()
        .map(l2_normalize)
        .collect::<Result<_>>()?
    };
    let mut epoch_features = |e: usize| -> Result<Tensor> {
        if train_opts.fresh_views {
            // Views after the cache's own, so every epoch sees new crops.
            let epoch = (m.augment_epochs + e) as u64;
            let v = encode_views(
                clip,
                &paths,
                &m.augment,
                m.seed,
                epoch..epoch + 1,
                &quiet_opts,
            )?;
            l2_normalize(&v[0])
        } else {
            Ok(bank[e % bank.len()].clone())
        }
    };
    let outcome = train_adapter(
        &cache.cache_keys,
        &cache.cache_values,
        &cache.classifier,
        &train_opts.settings,
        &labels,
        &val_f,
        &val_labels,
        &mut epoch_features,
        opts.progress,
    )?;
    let affinity = val_f.matmul(&outcome.weight.t()?)?;
    let clip_logits = crate::eval::zero_shot_logits(&val_f, &cache.classifier)?;
    let found = search(
        &affinity,
        &labels,
        &clip_logits,
        &val_labels,
        &m.config.grid(),
    )?;
    let mut meta = m.clone();
    meta.composed_views = true;
    meta.kind = Kind::Tipf;
    // The model where it is now: a moved copy was recognised by its digest, and the new
    // artifact should not send `eval` to the old place.
    if meta.model_digest.is_some() {
        meta.model = clip.files.id.clone();
        meta.revision = clip.files.revision.clone();
    }
    meta.fast_decode |= opts.decode != crate::preprocess::Decode::Exact;
    meta.beta = found.beta;
    meta.alpha = found.alpha;
    meta.val_acc = found.acc;
    meta.val_acc_init = outcome.val_accs[outcome.best_epoch];
    meta.val_n = val_labels.len();
    meta.train = Some(TrainInfo {
        settings: train_opts.settings.clone(),
        fresh_views: train_opts.fresh_views,
        best_epoch: outcome.best_epoch,
        val_accs: outcome.val_accs,
        losses: outcome.losses,
    });
    Ok(TipArtifact {
        meta,
        cache_keys: cache.cache_keys.clone(),
        cache_values: cache.cache_values.clone(),
        classifier: cache.classifier.clone(),
        adapter: Some(outcome.weight),
    })
}

/// `clipft eval --adapter`: the artifact's logits on a split.
pub fn evaluate_adapter(
    clip: &Clip,
    dataset: &Dataset,
    artifact: &TipArtifact,
    split: Split,
    opts: &ExtractOptions,
) -> Result<crate::eval::EvalRun> {
    crate::eval::evaluate_split(
        clip,
        dataset,
        split,
        opts,
        artifact.meta.kind.method_name(),
        |f| artifact.logits(f),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f32], r: usize, c: usize) -> Tensor {
        Tensor::from_vec(v.to_vec(), (r, c), &Device::Cpu).unwrap()
    }

    #[test]
    fn builtin_configs_parse() {
        for (name, _) in BUILTIN_CONFIGS {
            let c = TipConfig::resolve(name).unwrap();
            assert_eq!(&c.name, name);
            assert_eq!(c.search_step, [200, 20]);
            assert_eq!(c.init_beta, 1.0);
        }
        let pets = TipConfig::resolve("oxford_pets").unwrap();
        assert_eq!(pets.search_scale, [7.0, 3.0]);
        assert_eq!(pets.templates, vec!["a photo of a {}, a type of pet."]);
        assert_eq!(TipConfig::resolve("imagenet").unwrap().templates.len(), 7);
        assert!(TipConfig::resolve("nope").is_err());
    }

    /// A config file gives the keys it changes; the rest are `default`'s, the name its stem.
    #[test]
    fn config_files_change_only_their_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mine.json");
        std::fs::write(&p, r#"{"search_step": [5, 4], "templates": ["a {}."]}"#).unwrap();
        let c = TipConfig::resolve(p.to_str().unwrap()).unwrap();
        let d = TipConfig::resolve("default").unwrap();
        assert_eq!(c.name, "mine");
        assert_eq!(c.search_step, [5, 4]);
        assert_eq!(c.templates, ["a {}."]);
        assert_eq!(
            (c.search_scale, c.init_alpha, c.lr),
            (d.search_scale, d.init_alpha, d.lr)
        );
        // A misspelt key is an error, not silently the default.
        std::fs::write(&p, r#"{"serch_step": [5, 4]}"#).unwrap();
        let e = format!("{:#}", TipConfig::resolve(p.to_str().unwrap()).unwrap_err());
        assert!(e.contains("mine.json") && e.contains("serch_step"), "{e}");
        // A type error points into the user's file, not into the merged config.
        std::fs::write(&p, "{\n  \"lr\": 0.001,\n  \"search_step\": \"x\"\n}\n").unwrap();
        let e = format!("{:#}", TipConfig::resolve(p.to_str().unwrap()).unwrap_err());
        assert!(e.contains("line 3 column"), "{e}");
        std::fs::write(&p, "{ }").unwrap();
        assert_eq!(TipConfig::resolve(p.to_str().unwrap()).unwrap().lr, d.lr);
        std::fs::write(&p, "[1, 2]").unwrap();
        assert!(TipConfig::resolve(p.to_str().unwrap()).is_err());
        // A byte-order mark is not part of the JSON.
        std::fs::write(&p, "\u{feff}{\"lr\": 0.5}").unwrap();
        assert_eq!(TipConfig::resolve(p.to_str().unwrap()).unwrap().lr, 0.5);
        // Values the methods cannot run with are refused naming the file.
        for (text, want) in [
            (
                r#"{"search_step": [18446744073709551615, 2]}"#,
                "search_step must be between",
            ),
            (r#"{"train_epochs": 0}"#, "train_epochs must be at least 1"),
            (r#"{"init_alpha": -1}"#, "init_beta and init_alpha"),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = format!("{:#}", TipConfig::resolve(p.to_str().unwrap()).unwrap_err());
            assert!(e.contains("mine.json") && e.contains(want), "{e}");
        }
    }

    #[test]
    fn grid_matches_official_formula() {
        let g = Grid::new([7.0, 3.0], [200, 20]);
        let b = g.betas();
        assert_eq!(b.len(), 200);
        for (i, &x) in b.iter().enumerate() {
            assert!((x - (i as f64 * 6.9 / 200.0 + 0.1)).abs() < 1e-12);
        }
        assert_eq!(g.alphas.len(), 20);
        assert!((g.alphas[19] - (19.0 * 2.9 / 20.0 + 0.1)).abs() < 1e-12);
    }

    /// The vectorised search equals a direct evaluation of every grid point.
    #[test]
    fn search_matches_brute_force() {
        let (n, nk, c, d) = (23, 12, 4, 6);
        let f = l2_normalize(&Tensor::randn(0f32, 1., (n, d), &Device::Cpu).unwrap()).unwrap();
        let keys = l2_normalize(&Tensor::randn(0f32, 1., (nk, d), &Device::Cpu).unwrap()).unwrap();
        let w = l2_normalize(&Tensor::randn(0f32, 1., (c, d), &Device::Cpu).unwrap()).unwrap();
        let cache_labels: Vec<usize> = (0..nk).map(|k| k % c).collect();
        let labels: Vec<usize> = (0..n).map(|i| (i * 7) % c).collect();
        let values = one_hot(&cache_labels, c).unwrap();
        let aff = f.matmul(&keys.t().unwrap()).unwrap();
        let z = crate::eval::zero_shot_logits(&f, &w).unwrap();
        let grid = Grid::new([5.0, 4.0], [17, 6]);
        let r = search(&aff, &cache_labels, &z, &labels, &grid).unwrap();
        for i in 0..grid.n_beta {
            for (j, &a) in grid.alphas.iter().enumerate() {
                let l = tip_logits(&f, &aff, &values, &w, grid.beta(i), a).unwrap();
                let acc = top1(&l, &labels).unwrap();
                let got = 100.0 * r.correct[i * grid.alphas.len() + j] as f64 / n as f64;
                assert!((acc - got).abs() < 1e-9, "β {i} α {j}: {acc} vs {got}");
            }
        }
    }

    /// Gradients reach the adapter weight and agree with finite differences.
    #[test]
    fn gradients_flow_to_the_adapter() {
        let keys = l2_normalize(&t(
            &[0.9, 0.1, 0.2, 0.1, 0.8, 0.3, 0.2, 0.2, 0.9, 0.5, 0.5, 0.1],
            4,
            3,
        ))
        .unwrap();
        let values = one_hot(&[0, 1, 2, 0], 3).unwrap();
        // Nearly equal class weights, so the cache term decides and the softmax is not saturated.
        let w = l2_normalize(&t(&[1., 0.50, 0.5, 1., 0.51, 0.5, 1., 0.5, 0.51], 3, 3)).unwrap();
        let x = l2_normalize(&t(&[0.7, 0.3, 0.2, 0.1, 0.2, 0.9], 2, 3)).unwrap();
        let y = [0usize, 2];
        let settings = TipFSettings {
            epochs: 1,
            lr: 1e-3,
            batch_size: 2,
            init_beta: 1.0,
            init_alpha: 1.17,
            eps: 1e-4,
            weight_decay: 0.01,
            seed: 0,
        };
        let tr = TipFTrainer::new(&keys, &values, &w, &settings, 1).unwrap();
        let loss = tr.loss(&x, &y).unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(tr.weight.as_tensor())
            .expect("gradient")
            .to_vec2::<f32>()
            .unwrap();
        assert!(g.iter().flatten().any(|v| v.abs() > 1e-4));
        // The closed-form gradient the optimiser uses is the autograd gradient.
        let (l2, g2) = tr.loss_and_grad(&x, &y).unwrap();
        assert!((l2 - loss.to_scalar::<f32>().unwrap()).abs() < 1e-5);
        let g2 = g2.to_vec2::<f32>().unwrap();
        for (a, b) in g.iter().flatten().zip(g2.iter().flatten()) {
            assert!((a - b).abs() < 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
        }
        let base = keys.to_vec2::<f32>().unwrap();
        let h = 1e-2f32;
        for (r, c) in [(0, 0), (1, 2), (3, 1)] {
            let mut lp = 0.0;
            for sign in [1f32, -1.] {
                let mut p = base.clone();
                p[r][c] += sign * h;
                let flat: Vec<f32> = p.into_iter().flatten().collect();
                let tr2 = TipFTrainer::new(&t(&flat, 4, 3), &values, &w, &settings, 1).unwrap();
                lp += sign * tr2.loss(&x, &y).unwrap().to_scalar::<f32>().unwrap();
            }
            let fd = lp / (2.0 * h);
            assert!(
                (fd - g[r][c]).abs() < 1e-2 * (1.0 + fd.abs()),
                "{fd} vs {}",
                g[r][c]
            );
        }
    }

    #[test]
    fn cosine_schedule() {
        assert_eq!(cosine_lr(1e-3, 0, 10), 1e-3);
        assert!((cosine_lr(1e-3, 5, 10) - 5e-4).abs() < 1e-15);
        assert!(cosine_lr(1e-3, 10, 10).abs() < 1e-15);
    }

    #[test]
    fn one_hot_round_trip() {
        let v = one_hot(&[2, 0, 1], 3).unwrap();
        assert_eq!(labels_of_one_hot(&v).unwrap(), vec![2, 0, 1]);
        assert!(labels_of_one_hot(&t(&[1., 1., 0.], 1, 3)).is_err());
    }
}

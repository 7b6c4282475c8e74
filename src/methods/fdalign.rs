//! FD-Align (Feature Discrimination Alignment): the objective and its parts, as the official code
//! (skingorz/FD-Align) computes them.
//!
//! - Class head: a linear layer on L2-normalised image features, weights initialised to
//!   `100 ×` each class's prompt-ensemble embedding (templates normalised, averaged,
//!   re-normalised), bias zero; both trainable.
//! - Spurious ("context") prototypes: per template, the mean over classes of the normalised text
//!   embeddings, re-normalised, `× 100`. The official code keeps the 60 most typical templates by
//!   an isolation forest and merges them into 20 k-means centres; [`select_prototypes`] does the
//!   same, seeded (the forest and k-means are our own, so the chosen set can differ from
//!   scikit-learn's draw); `clusters = 0` keeps every template.
//! - Loss: `CE(head(f_t(x)), y) + β · KL(P₀ ‖ P_t)` with `P = softmax(norm(f) · Sᵀ)` over the
//!   prototypes S, `P₀` from the frozen encoder. The KL uses PyTorch `KLDivLoss()`'s default
//!   reduction, the mean over batch × prototypes (the paper writes a sum over prototypes,
//!   averaged over the batch: β differs by the number of prototypes between the two notations).
//! - Optimiser: SGD with Nesterov momentum and L2 weight decay, PyTorch's update.

use anyhow::{ensure, Result};
use candle_core::{Tensor, Var, D};
use rand::{Rng, SeedableRng};

use crate::features::l2_normalize;

/// Spurious prototypes from raw text features `[T, C, D]` (template × class): `[T, D]`, scaled
/// by the model's `logit_scale.exp()` (`scale`; 100 for the released CLIP models) as in the
/// official code.
pub fn context_weights(text: &Tensor, scale: f64) -> Result<Tensor> {
    let per_template = l2_normalize(&l2_normalize(text)?.mean(1)?)?;
    Ok((per_template * scale)?)
}

/// Initial class-head weights from raw text features `[T, C, D]`: `[C, D]`, scaled like
/// [`context_weights`].
pub fn class_head_init(text: &Tensor, scale: f64) -> Result<Tensor> {
    let per_class = l2_normalize(&l2_normalize(text)?.mean(0)?)?;
    Ok((per_class * scale)?)
}

/// Logits of a linear layer on L2-normalised features: `norm(f)·Wᵀ + b`.
pub fn normalized_linear(
    features: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let logits = l2_normalize(features)?.matmul(&weight.t()?)?;
    Ok(match bias {
        Some(b) => logits.broadcast_add(b)?,
        None => logits,
    })
}

/// `KL(P₀ ‖ P_t)` averaged over batch × prototypes (PyTorch `KLDivLoss()` on
/// `log softmax(ctx(f_t))` and `softmax(ctx(f₀))`), where `ctx(f) = norm(f)·Sᵀ`.
pub fn spurious_kl(f_t: &Tensor, f_0: &Tensor, prototypes: &Tensor) -> Result<Tensor> {
    let log_pt =
        candle_nn::ops::log_softmax(&normalized_linear(f_t, prototypes, None)?, D::Minus1)?;
    let log_p0 = candle_nn::ops::log_softmax(
        &normalized_linear(f_0, prototypes, None)?.detach(),
        D::Minus1,
    )?;
    let kl = (log_p0.exp()? * (log_p0 - log_pt)?)?;
    Ok(kl.mean_all()?)
}

/// The FD-Align objective for a batch; returns `(total, ce, kl)`.
pub fn loss(
    f_t: &Tensor,
    f_0: &Tensor,
    labels: &Tensor,
    head_w: &Tensor,
    head_b: &Tensor,
    prototypes: &Tensor,
    beta: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let logits = normalized_linear(f_t, head_w, Some(head_b))?;
    let ce = candle_nn::loss::cross_entropy(&logits, labels)?;
    let kl = spurious_kl(f_t, f_0, prototypes)?;
    let total = (&ce + (&kl * beta)?)?;
    Ok((total, ce, kl))
}

/// PyTorch's `SGD(momentum, nesterov=True, weight_decay)`: `g ← g + λθ`, `b ← μb + g` (`b = g` on
/// the first step), `g ← g + μb`, `θ ← θ − lr·g`.
pub struct Sgd {
    vars: Vec<Var>,
    buffers: Vec<Option<Tensor>>,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

impl Sgd {
    pub fn new(vars: Vec<Var>, lr: f64, momentum: f64, weight_decay: f64) -> Self {
        let buffers = vec![None; vars.len()];
        Self {
            vars,
            buffers,
            lr,
            momentum,
            weight_decay,
        }
    }

    pub fn step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        for (var, buf) in self.vars.iter().zip(self.buffers.iter_mut()) {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let param = var.as_tensor();
            let b = match buf.take() {
                Some(b) if b.is_contiguous() => b,
                Some(b) => b.copy()?,
                None => Tensor::zeros(param.shape(), param.dtype(), param.device())?,
            };
            let (lr, mu, wd) = (self.lr, self.momentum, self.weight_decay);
            if let Some(done) = super::optim::nesterov_sgd_in_place(param, &b, g, lr, mu, wd) {
                done?;
                *buf = Some(b);
                continue;
            }
            let g = (g + (param * wd)?)?;
            let b = ((b * mu)? + &g)?;
            let update = (g + (&b * mu)?)?;
            var.set(&(param - (update * lr)?)?)?;
            *buf = Some(b.detach());
        }
        Ok(())
    }

    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The momentum buffers (for checkpoints), in the order of the variables.
    pub fn buffers(&self) -> &[Option<Tensor>] {
        &self.buffers
    }

    /// Restores momentum buffers saved by [`Self::buffers`].
    pub fn set_buffers(&mut self, buffers: Vec<Option<Tensor>>) {
        assert_eq!(buffers.len(), self.vars.len(), "one buffer per variable");
        self.buffers = buffers;
    }
}

/// Dynamic loss scaling for f16 training, as PyTorch's `GradScaler` (its defaults): the loss is
/// multiplied by [`LossScaler::scale`] before the backward pass, so that gradients too small
/// for f16 (below 6·10⁻⁸) survive it, and the gradients are divided back in the variables' f32
/// before the update. A step whose gradients overflowed is skipped and the scale halved; after
/// [`LossScaler::GROWTH_INTERVAL`] finite steps in a row it doubles. bf16 has f32's range and
/// f32 needs nothing: the scale stays 1 and nothing is checked.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub good_steps: usize,
    pub dynamic: bool,
    /// Steps skipped so far because their gradients overflowed.
    #[serde(default)]
    pub skipped: usize,
}

impl LossScaler {
    pub const INITIAL: f64 = 65536.0;
    pub const GROWTH_INTERVAL: usize = 2000;

    /// Dynamic scaling for an f16 forward pass, none otherwise.
    pub fn for_dtype(compute: candle_core::DType) -> Self {
        let dynamic = compute == candle_core::DType::F16;
        Self {
            scale: if dynamic { Self::INITIAL } else { 1.0 },
            good_steps: 0,
            dynamic,
            skipped: 0,
        }
    }

    /// Divides the gradients of `vars` by the scale and tells whether the step may be taken:
    /// `Ok(false)` when some gradient is not finite (the scale is halved; skip the update).
    /// Fails when the gradients overflow even unscaled: the run diverged.
    pub fn unscale(
        &mut self,
        grads: &mut candle_core::backprop::GradStore,
        vars: &[Var],
    ) -> Result<bool> {
        if !self.dynamic {
            return Ok(true);
        }
        let mut sums = Vec::with_capacity(vars.len());
        for var in vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                let g = (g * (1.0 / self.scale))?;
                // inf − inf and NaN both end as NaN in the sum; an overflowing finite sum
                // needs gradients near f32's limit, which the unscaled ones are not.
                sums.push(g.sum_all()?.to_dtype(candle_core::DType::F32)?);
                grads.insert(var.as_tensor(), g);
            }
        }
        let total = if sums.is_empty() {
            0.0
        } else {
            Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f32>()?
        };
        if total.is_finite() {
            self.good_steps += 1;
            if self.good_steps >= Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
            return Ok(true);
        }
        ensure!(
            self.scale > 1.0,
            "the f16 gradients overflow even without loss scaling: training diverged \
             (lower --lr, or train with --dtype bf16 or f32)"
        );
        self.scale /= 2.0;
        self.good_steps = 0;
        self.skipped += 1;
        Ok(false)
    }
}

/// Average path length of an unsuccessful search in a binary search tree of `n` points: the
/// isolation forest's normaliser `c(n)`.
fn c_factor(n: usize) -> f64 {
    match n {
        0 | 1 => 0.0,
        2 => 1.0,
        _ => {
            let n = n as f64;
            2.0 * ((n - 1.0).ln() + 0.577_215_664_901_532_9) - 2.0 * (n - 1.0) / n
        }
    }
}

/// Path length of `x` in a random isolation tree grown on `rows` (indices into `data`).
fn isolation_path(
    data: &[Vec<f32>],
    rows: &[usize],
    x: &[f32],
    depth: usize,
    max_depth: usize,
    rng: &mut impl Rng,
) -> f64 {
    if rows.len() <= 1 || depth >= max_depth {
        return depth as f64 + c_factor(rows.len());
    }
    let dims = data[rows[0]].len();
    // A random feature with spread, then a uniform split inside its range.
    for _ in 0..dims {
        let f = rng.random_range(0..dims);
        let (lo, hi) = rows
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &r| {
                (lo.min(data[r][f]), hi.max(data[r][f]))
            });
        if hi > lo {
            let split = rng.random_range(lo..hi);
            let (left, right): (Vec<usize>, Vec<usize>) =
                rows.iter().partition(|&&r| data[r][f] < split);
            let side = if x[f] < split { left } else { right };
            return isolation_path(data, &side, x, depth + 1, max_depth, rng);
        }
    }
    depth as f64 + c_factor(rows.len())
}

/// Isolation-forest anomaly scores `2^(−E[h(x)]/c(ψ))` (higher = more atypical), with scikit-
/// learn's defaults: 100 trees, subsamples of `min(256, n)` points, depth limit `⌈log₂ ψ⌉`.
/// Each tree is grown lazily along each point's path, seeded per (tree, point).
pub fn isolation_scores(data: &[Vec<f32>], seed: u64) -> Vec<f64> {
    let n = data.len();
    let psi = n.min(256);
    let max_depth = (psi.max(2) as f64).log2().ceil() as usize;
    let trees = 100;
    let mut depth_sum = vec![0.0; n];
    for t in 0..trees {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ t as u64,
        );
        let sample: Vec<usize> = rand::seq::index::sample(&mut rng, n, psi).into_vec();
        let tree_seed: u64 = rng.random();
        for (i, x) in data.iter().enumerate() {
            // Same seed for every point: every point descends the same tree.
            let mut tree_rng = rand_chacha::ChaCha8Rng::seed_from_u64(tree_seed);
            depth_sum[i] += isolation_path(data, &sample, x, 0, max_depth, &mut tree_rng);
        }
    }
    let c = c_factor(psi);
    depth_sum
        .iter()
        .map(|&s| 2f64.powf(-(s / trees as f64) / c))
        .collect()
}

/// Squared Euclidean distance.
fn dist2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// How many runs scikit-learn's `KMeans` makes by default (`n_init=10` in 1.0.1, the version
/// the official code pins); the run with the lowest inertia is kept.
const KMEANS_RUNS: usize = 10;

/// k-means as scikit-learn's `KMeans(k)` runs it (the official code's): [`KMEANS_RUNS`] runs, each
/// a greedy k-means++ seeding followed by Lloyd iterations to convergence, the run with the
/// lowest inertia kept. Seeded; the draws differ from scikit-learn's. (A single plain k-means++
/// run, as before, left about 20% more inertia than scikit-learn on template features.)
pub fn kmeans(data: &[Vec<f32>], k: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..KMEANS_RUNS)
        .map(|_| lloyd(data, kmeans_plus_plus(data, k, &mut rng)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("at least one run")
        .0
}

/// scikit-learn's greedy k-means++ (`_kmeans_plusplus`): each new centre is the best, by the
/// resulting potential (sum of squared distances to the nearest centre), of `2 + ⌊ln k⌋`
/// candidates drawn with probability proportional to the current squared distance.
fn kmeans_plus_plus(
    data: &[Vec<f32>],
    k: usize,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Vec<Vec<f32>> {
    let trials = 2 + (k as f64).ln() as usize;
    let mut centers = vec![data[rng.random_range(0..data.len())].clone()];
    let mut closest: Vec<f32> = data.iter().map(|x| dist2(x, &centers[0])).collect();
    while centers.len() < k {
        let pot: f32 = closest.iter().sum();
        let mut best: Option<(f32, usize, Vec<f32>)> = None;
        for _ in 0..trials {
            // The first index whose running sum of squared distances exceeds the draw.
            let mut pick = rng.random_range(0.0..pot.max(f32::MIN_POSITIVE));
            let mut cand = data.len() - 1;
            for (i, &d) in closest.iter().enumerate() {
                if pick < d {
                    cand = i;
                    break;
                }
                pick -= d;
            }
            let with: Vec<f32> = data
                .iter()
                .zip(&closest)
                .map(|(x, &d)| d.min(dist2(x, &data[cand])))
                .collect();
            let cand_pot: f32 = with.iter().sum();
            if best.as_ref().is_none_or(|b| cand_pot < b.0) {
                best = Some((cand_pot, cand, with));
            }
        }
        let (_, cand, with) = best.expect("at least two trials");
        closest = with;
        centers.push(data[cand].clone());
    }
    centers
}

/// Lloyd iterations from `centers` until the assignment stops changing (at most 300, as
/// scikit-learn's `max_iter`); an empty cluster keeps its centre. Returns the centres and their
/// inertia.
fn lloyd(data: &[Vec<f32>], mut centers: Vec<Vec<f32>>) -> (Vec<Vec<f32>>, f32) {
    let nearest = |x: &[f32], centers: &[Vec<f32>]| {
        (0..centers.len())
            .min_by(|&a, &b| dist2(x, &centers[a]).total_cmp(&dist2(x, &centers[b])))
            .expect("k > 0")
    };
    let mut assign = vec![usize::MAX; data.len()];
    for _ in 0..300 {
        let next: Vec<usize> = data.iter().map(|x| nearest(x, &centers)).collect();
        if next == assign {
            break;
        }
        assign = next;
        for (c, center) in centers.iter_mut().enumerate() {
            let members: Vec<&Vec<f32>> = data
                .iter()
                .zip(&assign)
                .filter(|(_, &a)| a == c)
                .map(|(x, _)| x)
                .collect();
            if !members.is_empty() {
                for (j, v) in center.iter_mut().enumerate() {
                    *v = members.iter().map(|m| m[j]).sum::<f32>() / members.len() as f32;
                }
            }
        }
    }
    let inertia = data
        .iter()
        .map(|x| dist2(x, &centers[nearest(x, &centers)]))
        .sum();
    (centers, inertia)
}

/// The spurious prototypes FD-Align regularises with: the `keep` most typical of the `[T, D]`
/// context weights (lowest isolation-forest scores), merged into `clusters` k-means centres;
/// `clusters == 0` returns every template's weight.
pub fn select_prototypes(
    context: &Tensor,
    keep: usize,
    clusters: usize,
    seed: u64,
) -> Result<Tensor> {
    if clusters == 0 {
        return Ok(context.clone());
    }
    let rows: Vec<Vec<f32>> = context.to_dtype(candle_core::DType::F32)?.to_vec2()?;
    ensure!(
        clusters <= keep && keep <= rows.len(),
        "need clusters ({clusters}) <= keep ({keep}) <= templates ({})",
        rows.len()
    );
    let scores = isolation_scores(&rows, seed);
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let typical: Vec<Vec<f32>> = order[..keep].iter().map(|&i| rows[i].clone()).collect();
    let centers = kmeans(&typical, clusters, seed);
    let d = centers[0].len();
    Ok(Tensor::from_vec(
        centers.concat(),
        (clusters, d),
        context.device(),
    )?)
}

// ---------------------------------------------------------------------------------------------
// Training
// ---------------------------------------------------------------------------------------------

/// FD-Align training settings (defaults: the official ones).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FdAlignSettings {
    pub epochs: usize,
    /// Learning rate for a batch of 256; the rate used is `base_lr · batch / 256`.
    pub base_lr: f64,
    /// Images per optimiser step [default: min(256, train size)].
    pub batch_size: Option<usize>,
    /// Micro-batches per step (gradients summed), to fit a large batch in memory.
    pub accum_steps: usize,
    pub beta: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// RandomResizedCrop area range of the training views (no flip).
    pub scale: (f64, f64),
    pub spurious_keep: usize,
    pub spurious_clusters: usize,
    pub seed: u64,
}

impl Default for FdAlignSettings {
    fn default() -> Self {
        Self {
            epochs: 60,
            base_lr: 5e-5,
            batch_size: None,
            accum_steps: 1,
            beta: 20.0,
            momentum: 0.9,
            weight_decay: 5e-4,
            scale: (0.08, 1.0),
            spurious_keep: 60,
            spurious_clusters: 20,
            seed: 1,
        }
    }
}

impl FdAlignSettings {
    /// Rejects settings that would train nothing or silently misbehave, naming the flag.
    pub fn validate(&self) -> Result<()> {
        ensure!(self.epochs >= 1, "--epochs must be at least 1");
        ensure!(
            self.base_lr.is_finite() && self.base_lr > 0.0,
            "--lr must be a positive number, not {}",
            self.base_lr
        );
        ensure!(
            self.batch_size != Some(0),
            "--batch-size must be at least 1"
        );
        ensure!(self.accum_steps >= 1, "--accum-steps must be at least 1");
        ensure!(
            self.beta.is_finite() && self.beta >= 0.0,
            "--beta must be a non-negative number, not {}",
            self.beta
        );
        ensure!(
            self.spurious_keep >= 1,
            "--spurious-keep must be at least 1 (templates kept for the spurious prototypes)"
        );
        Ok(())
    }

    pub fn batch(&self, train_size: usize) -> usize {
        self.batch_size.unwrap_or(256).min(train_size).max(1)
    }
    pub fn lr(&self, train_size: usize) -> f64 {
        self.base_lr * self.batch(train_size) as f64 / 256.0
    }
}

/// Cosine learning rate at step `t` of `total` (per-step schedule, no warm-up).
pub fn cosine_lr(base: f64, t: usize, total: usize) -> f64 {
    super::tip::cosine_lr(base, t, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state written with a learning rate resumes with the same one: the JSON of the state's
    /// settings reads back bit for bit (serde_json's `float_roundtrip`; without it the last
    /// digit of some 17-digit values came back 1 ulp off, and `--resume` refused the run).
    #[test]
    fn settings_round_trip_exactly_through_json() {
        for lr in [9.999999999999999e-5, 0.1 + 0.2, 2e-2, 1.0 / 3.0] {
            let s = FdAlignSettings {
                base_lr: lr,
                ..FdAlignSettings::default()
            };
            let back: FdAlignSettings =
                serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
            assert_eq!(back, s, "{lr:e}");
            let text: FdAlignSettings =
                serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
            assert_eq!(text, s, "{lr:e}");
        }
    }
    use candle_core::{DType, Device};

    fn formula(rows: usize, cols: usize, salt: f64) -> Vec<f32> {
        (0..rows * cols)
            .map(|i| (((i as f64) * 0.731 + salt).sin() * 1.3 + ((i % 7) as f64) * 0.05) as f32)
            .collect()
    }

    #[test]
    fn kl_is_zero_when_the_encoders_agree_and_positive_otherwise() {
        let dev = Device::Cpu;
        let f = Tensor::from_vec(formula(4, 6, 0.1), (4, 6), &dev).unwrap();
        let g = Tensor::from_vec(formula(4, 6, 2.0), (4, 6), &dev).unwrap();
        let s = Tensor::from_vec(formula(5, 6, 1.0), (5, 6), &dev).unwrap();
        let same = spurious_kl(&f, &f, &s).unwrap().to_scalar::<f32>().unwrap();
        assert!(same.abs() < 1e-7, "{same}");
        let diff = spurious_kl(&g, &f, &s).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff > 1e-4, "{diff}");
    }

    /// Numbers from PyTorch: `KLDivLoss()(log(softmax(ctx(f_t))), softmax(ctx(f_0)))`,
    /// `cross_entropy(normalize(f_t)·Wᵀ, y)` and their sum with β = 20, on the same formula inputs.
    #[test]
    fn loss_matches_pytorch() {
        let dev = Device::Cpu;
        let t = |r, c, salt| Tensor::from_vec(formula(r, c, salt), (r, c), &dev).unwrap();
        let (ft, f0, s, w) = (t(4, 6, 2.0), t(4, 6, 0.1), t(5, 6, 1.0), t(3, 6, 0.5));
        let b = Tensor::zeros(3, DType::F32, &dev).unwrap();
        let y = Tensor::new(&[0u32, 2, 1, 2], &dev).unwrap();
        let (total, ce, kl) = loss(&ft, &f0, &y, &w, &b, &s, 20.0).unwrap();
        let get = |x: Tensor| x.to_scalar::<f32>().unwrap();
        assert!((get(kl) - 0.336_542_52).abs() < 1e-6);
        assert!((get(ce) - 1.274_972_9).abs() < 1e-6);
        assert!((get(total) - 8.005_823).abs() < 2e-5);
    }

    #[test]
    fn sgd_matches_pytorch_nesterov_formula() {
        let dev = Device::Cpu;
        // f64: candle's ops; f32: the in-place passes.
        for (dtype, tol) in [(DType::F64, 1e-8), (DType::F32, 1e-6)] {
            let w = Var::from_tensor(
                &Tensor::new(&[1.0f64, -2.0, 0.5], &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let mut opt = Sgd::new(vec![w.clone()], 0.1, 0.9, 0.01);
            // Loss Σ w², gradient 2w; expected values from torch.optim.SGD(lr=0.1,
            // momentum=0.9, nesterov=True, weight_decay=0.01), three steps.
            for _ in 0..3 {
                let grads = w
                    .as_tensor()
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                opt.step(&grads).unwrap();
            }
            let got: Vec<f64> = w
                .as_tensor()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            let expected = [-0.1116510943, 0.2233021885, -0.0558255471];
            for (a, b) in got.iter().zip(expected) {
                assert!((a - b).abs() < tol, "{dtype:?}: {got:?}");
            }
        }
    }

    #[test]
    fn isolation_forest_flags_outliers_and_kmeans_finds_clusters() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let mut data: Vec<Vec<f32>> = (0..60)
            .map(|i| {
                let c = (i % 3) as f32 * 10.0;
                (0..4).map(|_| c + rng.random_range(-0.5..0.5)).collect()
            })
            .collect();
        data.push(vec![100.0, -100.0, 50.0, 0.0]);
        let scores = isolation_scores(&data, 1);
        let outlier = scores[60];
        assert!(
            scores[..60].iter().all(|&s| s < outlier),
            "outlier {outlier} not the most anomalous"
        );
        let centers = kmeans(&data[..60], 3, 2);
        let mut firsts: Vec<i32> = centers.iter().map(|c| c[0].round() as i32).collect();
        firsts.sort();
        assert_eq!(firsts, [0, 10, 20]);
        // Prototype selection: keep the typical ones, merge into k centres.
        let t = Tensor::from_vec(data.concat(), (61, 4), &Device::Cpu).unwrap();
        let p = select_prototypes(&t, 60, 3, 0).unwrap();
        assert_eq!(p.dims(), &[3, 4]);
        assert!(
            p.to_vec2::<f32>().unwrap().iter().all(|c| c[0] < 30.0),
            "the outlier was kept"
        );
        assert_eq!(select_prototypes(&t, 60, 0, 0).unwrap().dims(), &[61, 4]);
    }

    /// Twelve clusters 6 apart, three of them of 2 points among clusters of 12: one k-means++ run
    /// often spends two centres on one big cluster and merges small ones (a Python port: 85% of
    /// seeds for one plain run, 20% for one greedy run); the best of [`KMEANS_RUNS`] greedy runs
    /// finds every cluster, whatever the seed.
    #[test]
    fn kmeans_finds_small_clusters_among_big_ones() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let means: Vec<[f32; 3]> = (0..12)
            .map(|c| {
                [
                    (c % 4) as f32 * 6.0,
                    (c / 4) as f32 * 6.0,
                    (c % 3) as f32 * 2.0,
                ]
            })
            .collect();
        let mut data = Vec::new();
        for (c, m) in means.iter().enumerate() {
            for _ in 0..if c % 4 == 1 { 2 } else { 12 } {
                data.push(
                    m.iter()
                        .map(|v| v + rng.random_range(-1.0..1.0))
                        .collect::<Vec<f32>>(),
                );
            }
        }
        for seed in 0..20 {
            let centers = kmeans(&data, 12, seed);
            for m in &means {
                assert!(
                    centers.iter().any(|c| dist2(c, m) < 2.0),
                    "seed {seed}: no centre near the cluster at {m:?}"
                );
            }
        }
    }

    #[test]
    fn prototypes_and_head_init_follow_the_official_recipe() {
        let dev = Device::Cpu;
        let text = Tensor::from_vec(formula(3, 2 * 4, 0.3), (3, 2, 4), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let ctx = context_weights(&text, 14.3)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let head = class_head_init(&text, 14.3)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        let raw: Vec<Vec<Vec<f64>>> = text.to_vec3().unwrap();
        let norm = |v: &[f64]| {
            let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| x / n).collect::<Vec<f64>>()
        };
        for t in 0..3 {
            let mean: Vec<f64> = (0..4)
                .map(|d| (norm(&raw[t][0])[d] + norm(&raw[t][1])[d]) / 2.0)
                .collect();
            let want: Vec<f64> = norm(&mean).iter().map(|x| x * 14.3).collect();
            for d in 0..4 {
                assert!((ctx[t][d] - want[d]).abs() < 1e-9);
            }
        }
        for c in 0..2 {
            let mean: Vec<f64> = (0..4)
                .map(|d| (0..3).map(|t| norm(&raw[t][c])[d]).sum::<f64>() / 3.0)
                .collect();
            let want: Vec<f64> = norm(&mean).iter().map(|x| x * 14.3).collect();
            for d in 0..4 {
                assert!((head[c][d] - want[d]).abs() < 1e-9);
            }
        }
    }

    /// Gradients of `Σ w·c` for one variable `w`: `c`, whatever `c` holds.
    fn grads_of(c: &[f32]) -> (Var, candle_core::backprop::GradStore) {
        let dev = Device::Cpu;
        let w = Var::ones(c.len(), DType::F32, &dev).unwrap();
        let c = Tensor::new(c, &dev).unwrap();
        let g = (w.as_tensor() * c)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        (w, g)
    }

    #[test]
    fn loss_scaler_unscales_skips_overflows_and_grows() {
        let mut s = LossScaler::for_dtype(DType::F16);
        assert_eq!(s.scale, LossScaler::INITIAL);
        // Finite gradients come back divided by the scale, and the step is taken.
        let (w, mut g) = grads_of(&[65536.0, -131072.0, 3.0]);
        assert!(s.unscale(&mut g, std::slice::from_ref(&w)).unwrap());
        let got: Vec<f32> = g.get(w.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(got, [1.0, -2.0, 3.0 / 65536.0]);
        assert_eq!((s.scale, s.good_steps), (LossScaler::INITIAL, 1));
        // An overflow (or NaN) skips the step and halves the scale.
        for bad in [f32::INFINITY, f32::NAN] {
            let (w, mut g) = grads_of(&[1.0, bad]);
            let before = s.scale;
            assert!(!s.unscale(&mut g, &[w]).unwrap());
            assert_eq!((s.scale, s.good_steps), (before / 2.0, 0));
        }
        assert_eq!(s.skipped, 2);
        // GROWTH_INTERVAL finite steps in a row double it.
        s.good_steps = LossScaler::GROWTH_INTERVAL - 1;
        let (w, mut g) = grads_of(&[1.0]);
        assert!(s.unscale(&mut g, &[w]).unwrap());
        assert_eq!((s.scale, s.good_steps), (LossScaler::INITIAL / 2.0, 0));
        // Overflowing at scale 1 is divergence, not a scale to lower.
        s.scale = 1.0;
        let (w, mut g) = grads_of(&[f32::INFINITY]);
        let err = s.unscale(&mut g, &[w]).unwrap_err().to_string();
        assert!(err.contains("diverged"), "{err}");
        // bf16 and f32 runs are not scaled, and nothing is checked.
        for dtype in [DType::BF16, DType::F32] {
            let mut s = LossScaler::for_dtype(dtype);
            let (w, mut g) = grads_of(&[f32::INFINITY, 2.0]);
            assert!(s.unscale(&mut g, std::slice::from_ref(&w)).unwrap());
            assert_eq!(s.scale, 1.0);
            let got: Vec<f32> = g.get(w.as_tensor()).unwrap().to_vec1().unwrap();
            assert_eq!(got, [f32::INFINITY, 2.0]);
        }
    }
}

//! The attention core `softmax(q·kᵀ + mask)·v` of every head in one pass on the CPU, with a
//! backward pass of the same kind for training.
//!
//! candle composes it from a head-split copy, a batched matmul of many tiny (T×64) matrices, a
//! broadcast mask add, a softmax pass, a second batched matmul and a head-merge copy, each with
//! its own output buffer. Here each sequence's heads are read straight from the fused QKV
//! projection's output and written straight into the layout the output projection reads; the
//! scores of one query row live in a small buffer. Those steps took about 7% of a ViT-B/32
//! forward on the CPU (perf), mostly overhead rather than arithmetic; fused, images/s rose 5–6%.
//! For training, the backward pass recomputes the scores, so the autograd graph keeps only the
//! projections and the output, not the split heads, scores and probabilities.
//!
//! With AVX-512 and the head widths of CLIP models, both passes are register-blocked over a few
//! query rows at a time, with the softmax on 16 lanes and keys (values) transposed in 16 × 16
//! register blocks. With AVX2 (AMD Zen 1–3, many Intel CPUs) and head widths of whole 8-lane
//! vectors, one query row's scores and outputs stay in registers (half the time of the plain
//! loops on a Zen 3, forward and backward); elsewhere plain loops that the compiler vectorises
//! run instead.

use std::mem::MaybeUninit;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::vmath::{isa, Isa};

/// The attention core of a multi-head layer: `qkv` `[B, T, 3H]` holds each row's queries
/// (already scaled by 1/√head_dim), keys and values, heads side by side in each; `mask` an
/// optional additive `[T, T]` constant. Returns the heads' outputs side by side, `[B, T, H]`
/// (what the output projection takes), with a backward pass to `qkv` when it is tracked
/// (recomputing the scores: only `qkv` and the output stay alive for it). `None` where this
/// kernel does not apply (not on the CPU, not f32, a tracked mask, or a CPU without AVX2/FMA):
/// the caller composes it from candle ops.
pub fn attention(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> Option<Result<Tensor>> {
    let applies = qkv.device().is_cpu()
        && qkv.dtype() == DType::F32
        && mask.is_none_or(|m| m.dtype() == DType::F32 && !m.track_op())
        && isa().is_some();
    if !applies {
        return None;
    }
    let op = Attention {
        heads,
        mask: mask.cloned(),
    };
    Some(qkv.contiguous().and_then(|qkv| qkv.apply_op1(op)))
}

struct Attention {
    heads: usize,
    mask: Option<Tensor>,
}

impl Attention {
    /// The mask's values, read out of its tensor (a constant, so copied once per call).
    fn mask_values(&self) -> Result<Option<Vec<f32>>> {
        self.mask
            .as_ref()
            .map(|m| m.flatten_all()?.to_vec1::<f32>())
            .transpose()
    }

    /// The output `[B, T, H]`, or with `grad` `[B, T, H]` the gradient `[B, T, 3H]` of `qkv`.
    fn run(&self, s: &CpuStorage, l: &Layout, grad: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let mask = self.mask_values()?;
        let mask = mask.as_deref();
        let (b, t, h3) = l.shape().dims3()?;
        let (CpuStorage::F32(data), Some((start, end))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("attention: a contiguous f32 input expected")
        };
        let h = h3 / 3;
        if h3 % 3 != 0 || self.heads == 0 || h % self.heads != 0 {
            candle_core::bail!("attention: {h3} columns for {} heads", self.heads)
        }
        if mask.is_some_and(|m| m.len() != t * t) {
            candle_core::bail!("attention: mask for a sequence of {t} expected")
        }
        let Some(isa) = isa() else {
            candle_core::bail!("attention: needs AVX2 and FMA")
        };
        let qkv = &data[start..end];
        let hd = h / self.heads;
        let width = if grad.is_some() { h3 } else { h };
        if grad.is_some_and(|g| g.len() != b * t * h) {
            candle_core::bail!("attention: gradient of shape [{b}, {t}, {h}] expected")
        }
        // Not zeroed: the blocked kernels write every element once; the plain loops get their
        // rows zeroed first ([`zeroed`]).
        let n = b * t * width;
        let mut out: Vec<f32> = Vec::with_capacity(n);
        out.spare_capacity_mut()[..n]
            .par_chunks_mut(t * width)
            .zip(qkv.par_chunks(t * h3))
            .enumerate()
            .for_each(|(i, (out, x))| {
                let seq = Sequence {
                    x,
                    t,
                    h,
                    hd,
                    heads: self.heads,
                    mask,
                };
                let g = grad.map(|g| &g[i * t * h..][..t * h]);
                // SAFETY: `isa` was detected on this CPU.
                unsafe {
                    match isa {
                        Isa::Avx512 => seq.avx512(out, g),
                        Isa::Avx2 => seq.avx2(out, g),
                    }
                }
            });
        // SAFETY: each sequence's kernel initialised all of its `t · width` elements.
        unsafe { out.set_len(n) };
        Ok((CpuStorage::F32(out), Shape::from((b, t, width))))
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s, l, None)
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        self.grad(qkv, g).map(Some)
    }
}

/// The gradient `[B, T, 3H]` of [`attention`]'s `qkv` (f32 on the CPU, no mask) given its
/// output's `g` `[B, T, H]`, the scores recomputed.
pub(crate) fn attention_grad(qkv: &Tensor, heads: usize, g: &Tensor) -> Result<Tensor> {
    Attention { heads, mask: None }.grad(qkv, g)
}

impl Attention {
    fn grad(&self, qkv: &Tensor, g: &Tensor) -> Result<Tensor> {
        let g = g.contiguous()?;
        let (gs, gl) = g.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(gv)) = &*gs else {
            candle_core::bail!("attention: an f32 CPU gradient expected")
        };
        let Some((start, end)) = gl.contiguous_offsets() else {
            candle_core::bail!("attention: a contiguous gradient expected")
        };
        let gv = gv[start..end].to_vec();
        drop(gs);
        qkv.detach()
            .contiguous()?
            .apply_op1_no_bwd(&Grad { op: self, g: gv })
    }
}

/// The backward pass as an op of its own: `qkv` to its gradient, given the output's.
struct Grad<'a> {
    op: &'a Attention,
    g: Vec<f32>,
}

impl CustomOp1 for Grad<'_> {
    fn name(&self) -> &'static str {
        "attention-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.op.run(s, l, Some(&self.g))
    }
}

/// `out` zeroed, as the initialised slice the plain loops take.
fn zeroed(out: &mut [MaybeUninit<f32>]) -> &mut [f32] {
    out.fill(MaybeUninit::new(0.0));
    // SAFETY: every element was initialised just above; `MaybeUninit<f32>` has `f32`'s layout.
    unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<f32>(), out.len()) }
}

/// One sequence's `[T, 3H]` rows.
struct Sequence<'a> {
    x: &'a [f32],
    t: usize,
    h: usize,
    hd: usize,
    heads: usize,
    mask: Option<&'a [f32]>,
}

impl Sequence<'_> {
    /// The heads' outputs into `out` `[T, H]`, or with `g` (`[T, H]`, the outputs' gradient)
    /// the gradient of the `[T, 3H]` input into `out`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn avx512(&self, out: &mut [MaybeUninit<f32>], g: Option<&[f32]>) {
        match (g, self.hd) {
            // Register-blocked for the head widths of CLIP models (ViT-B and -L: 64, ViT-H: 80).
            (None, 32) => self.heads_blocked::<4, 2>(out),
            (None, 64) => self.heads_blocked::<4, 4>(out),
            (None, 80) => self.heads_blocked::<4, 5>(out),
            (None, 128) => self.heads_blocked::<2, 8>(out),
            (None, _) => self.heads_into(zeroed(out)),
            (Some(g), 32) => self.grads_blocked::<4, 2>(g, out),
            (Some(g), 64) => self.grads_blocked::<4, 4>(g, out),
            (Some(g), 80) => self.grads_blocked::<4, 5>(g, out),
            (Some(g), 128) => self.grads_blocked::<2, 8>(g, out),
            (Some(g), _) => self.grads_into(g, zeroed(out)),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(&self, out: &mut [MaybeUninit<f32>], g: Option<&[f32]>) {
        match g {
            None if self.hd.is_multiple_of(8) => self.heads_avx2(out),
            None => self.heads_into(zeroed(out)),
            Some(g) if self.hd.is_multiple_of(8) => self.grads_avx2(g, out),
            Some(g) => self.grads_into(g, zeroed(out)),
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn avx512(&self, out: &mut [MaybeUninit<f32>], g: Option<&[f32]>) {
        match g {
            None => self.heads_into(zeroed(out)),
            Some(g) => self.grads_into(g, zeroed(out)),
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    unsafe fn avx2(&self, out: &mut [MaybeUninit<f32>], g: Option<&[f32]>) {
        self.avx512(out, g)
    }

    /// Keys (or values) of `head` transposed into `dst` `[head_dim, ld]`, from column `col`
    /// (columns `[T, ld)` are left as they are).
    #[inline(always)]
    fn transposed(&self, head: usize, col: usize, dst: &mut [f32], ld: usize) {
        let (t, hd, h3) = (self.t, self.hd, 3 * self.h);
        for j in 0..t {
            let k = &self.x[j * h3 + col + head * hd..][..hd];
            for (d, &k) in k.iter().enumerate() {
                dst[d * ld + j] = k;
            }
        }
    }

    /// Row `i`'s softmax probabilities of `head` into `p` (`kt`: the keys transposed).
    #[inline(always)]
    fn probabilities(&self, head: usize, i: usize, kt: &[f32], p: &mut [f32]) {
        let (t, hd, h3) = (self.t, self.hd, 3 * self.h);
        let q = &self.x[i * h3 + head * hd..][..hd];
        match self.mask {
            Some(m) => p.copy_from_slice(&m[i * t..][..t]),
            None => p.fill(0.0),
        }
        for (d, &qd) in q.iter().enumerate() {
            for (s, &k) in p.iter_mut().zip(&kt[d * t..][..t]) {
                *s = qd.mul_add(k, *s);
            }
        }
        softmax(p);
    }

    /// With `P = softmax(q·kᵀ + mask)` and `O = P·v`: `dv = Pᵀ·dO`, `dP = dO·vᵀ`,
    /// `dS = P ⊙ (dP − rowsum(dP ⊙ P))`, `dq = dS·k`, `dk = dSᵀ·q`, into `dx` `[T, 3H]`.
    #[inline(always)]
    fn grads_into(&self, g: &[f32], dx: &mut [f32]) {
        let (t, h, hd, h3) = (self.t, self.h, self.hd, 3 * self.h);
        dx.fill(0.0);
        let mut kt = vec![0f32; hd * t];
        let mut vt = vec![0f32; hd * t];
        let mut p = vec![0f32; t];
        let mut dp = vec![0f32; t];
        let mut dq = vec![0f32; hd];
        for head in 0..self.heads {
            self.transposed(head, h, &mut kt, t);
            self.transposed(head, 2 * h, &mut vt, t);
            let (qc, kc, vc) = (head * hd, h + head * hd, 2 * h + head * hd);
            for i in 0..t {
                self.probabilities(head, i, &kt, &mut p);
                let go = &g[i * h + head * hd..][..hd];
                dp.fill(0.0);
                for (d, &gd) in go.iter().enumerate() {
                    for (s, &v) in dp.iter_mut().zip(&vt[d * t..][..t]) {
                        *s = gd.mul_add(v, *s);
                    }
                }
                let dot: f32 = dp.iter().zip(&p).map(|(a, b)| a * b).sum();
                for (s, &pj) in dp.iter_mut().zip(&p) {
                    *s = pj * (*s - dot);
                }
                // dq_i = Σ_j dS_ij k_j; dk_j += dS_ij q_i; dv_j += P_ij dO_i.
                let q = &self.x[i * h3 + qc..][..hd];
                dq.fill(0.0);
                for j in 0..t {
                    let (ds, pj) = (dp[j], p[j]);
                    let k = &self.x[j * h3 + kc..][..hd];
                    for (a, &k) in dq.iter_mut().zip(k) {
                        *a = ds.mul_add(k, *a);
                    }
                    let row = &mut dx[j * h3..][..h3];
                    for (a, &q) in row[kc..kc + hd].iter_mut().zip(q) {
                        *a = ds.mul_add(q, *a);
                    }
                    for (a, &g) in row[vc..vc + hd].iter_mut().zip(go) {
                        *a = pj.mul_add(g, *a);
                    }
                }
                dx[i * h3 + qc..][..hd].copy_from_slice(&dq);
            }
        }
    }

    /// Plain loops over contiguous slices, inlined into the entry points above so that the
    /// compiler vectorises them for the detected instruction set (`mul_add` becomes an FMA).
    #[inline(always)]
    fn heads_into(&self, out: &mut [f32]) {
        let (t, h, hd, h3) = (self.t, self.h, self.hd, 3 * self.h);
        let mut kt = vec![0f32; hd * t];
        let mut p = vec![0f32; t];
        for head in 0..self.heads {
            // Keys transposed, so each query's scores are FMAs over whole rows.
            self.transposed(head, h, &mut kt, t);
            for i in 0..t {
                self.probabilities(head, i, &kt, &mut p);
                let o = &mut out[i * h + head * hd..][..hd];
                o.fill(0.0);
                for (j, &pj) in p.iter().enumerate() {
                    let v = &self.x[j * h3 + 2 * h + head * hd..][..hd];
                    for (o, &v) in o.iter_mut().zip(v) {
                        *o = pj.mul_add(v, *o);
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Sequence<'_> {
    /// [`Sequence::heads_into`] for heads of `16·HV` dims with AVX-512, `R` query rows at a
    /// time: their scores against 64 keys at a time stay in `4R` registers across the head
    /// dimension, their outputs in `R·HV` registers across the keys, so each key and value
    /// vector loaded serves `R` rows (the plain loops keep one row's scores in memory and
    /// wait on a store for every FMA step).
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn heads_blocked<const R: usize, const HV: usize>(&self, out: &mut [MaybeUninit<f32>]) {
        let (t, h, hd, h3) = (self.t, self.h, self.hd, 3 * self.h);
        debug_assert_eq!(hd, 16 * HV);
        assert!(self.x.len() >= t * h3 && out.len() >= t * h);
        // Keys transposed, rows padded with zeros to whole vectors.
        let tp = t.next_multiple_of(16);
        let mut kt = vec![0f32; hd * tp];
        let mut p = vec![0f32; t * tp];
        for head in 0..self.heads {
            self.transposed_blocks(h + head * hd, &mut kt, tp);
            let v = self.x.as_ptr().add(2 * h + head * hd);
            let mut i = 0;
            while i < t {
                let n = if i + R <= t { R } else { 1 };
                let rows = &mut p[i * tp..];
                let o = out.as_mut_ptr().cast::<f32>().add(i * h + head * hd);
                // Unnormalised probabilities; each output row is divided by its sum on the
                // way out.
                if n == R {
                    let inv = self.probability_rows::<R, false>(head, i, &kt, tp, rows);
                    weighted_rows::<R, HV>(t, |r, j| rows[r * tp + j], v, h3, inv, o, h);
                } else {
                    let inv = self.probability_rows::<1, false>(head, i, &kt, tp, rows);
                    weighted_rows::<1, HV>(t, |_, j| rows[j], v, h3, inv, o, h);
                }
                i += n;
            }
        }
    }

    /// [`Sequence::grads_into`] for heads of `16·HV` dims with AVX-512, in the blocks of
    /// [`Sequence::heads_blocked`]: per head `P` and `dS` (`T × T`) are built `R` rows at a
    /// time, then `dq = dS·k`, `dk = dSᵀ·q` and `dv = Pᵀ·dO` are each `R` output rows in
    /// registers at a time, written once (the plain loops add into `dk` and `dv` in memory
    /// for every query row).
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn grads_blocked<const R: usize, const HV: usize>(
        &self,
        g: &[f32],
        dx: &mut [MaybeUninit<f32>],
    ) {
        let (t, h, hd, h3) = (self.t, self.h, self.hd, 3 * self.h);
        debug_assert_eq!(hd, 16 * HV);
        assert!(self.x.len() >= t * h3 && dx.len() >= t * h3 && g.len() >= t * h);
        let tp = t.next_multiple_of(16);
        let mut kt = vec![0f32; hd * tp];
        let mut vt = vec![0f32; hd * tp];
        let mut p = vec![0f32; t * tp];
        let mut ds = vec![0f32; t * tp];
        let dx = dx.as_mut_ptr().cast::<f32>();
        for head in 0..self.heads {
            self.transposed_blocks(h + head * hd, &mut kt, tp);
            self.transposed_blocks(2 * h + head * hd, &mut vt, tp);
            let mut i = 0;
            while i < t {
                let n = if i + R <= t { R } else { 1 };
                if n == R {
                    self.grad_rows::<R>(head, i, &kt, &vt, tp, g, &mut p, &mut ds);
                } else {
                    self.grad_rows::<1>(head, i, &kt, &vt, tp, g, &mut p, &mut ds);
                }
                i += n;
            }
            let mut i = 0;
            while i < t {
                let n = if i + R <= t { R } else { 1 };
                if n == R {
                    self.grad_outputs::<R, HV>(head, i, tp, g, &p, &ds, dx);
                } else {
                    self.grad_outputs::<1, HV>(head, i, tp, g, &p, &ds, dx);
                }
                i += n;
            }
        }
    }

    /// Rows `[i, i + R)` of `head`'s `dq` (dS rows against the keys), `dk` (dS columns against
    /// the queries) and `dv` (P columns against dO) into `dx` (`[T, 3H]`), from the whole
    /// head's `p` and `ds` (`T` rows of `tp`).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn grad_outputs<const R: usize, const HV: usize>(
        &self,
        head: usize,
        i: usize,
        tp: usize,
        g: &[f32],
        p: &[f32],
        ds: &[f32],
        dx: *mut f32,
    ) {
        let (t, h, hd, h3) = (self.t, self.h, self.hd, 3 * self.h);
        let (qc, kc, vc) = (head * hd, h + head * hd, 2 * h + head * hd);
        let (x, go, out) = (self.x.as_ptr(), g.as_ptr().add(qc), dx.add(i * h3));
        let ones = [1f32; R];
        let dsr = |r: usize, j: usize| ds[(i + r) * tp + j];
        weighted_rows::<R, HV>(t, dsr, x.add(kc), h3, ones, out.add(qc), h3);
        let dsc = |r: usize, j: usize| ds[j * tp + i + r];
        weighted_rows::<R, HV>(t, dsc, x.add(qc), h3, ones, out.add(kc), h3);
        let pc = |r: usize, j: usize| p[j * tp + i + r];
        weighted_rows::<R, HV>(t, pc, go, h, ones, out.add(vc), h3);
    }

    /// Rows `[i, i + R)` of `P` into `p` and of `dS = P ⊙ (dP − rowsum(dP ⊙ P))` into `ds`
    /// (`T` rows of `tp` each), with `dP = dO·vᵀ` (`vt`: the values transposed).
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn grad_rows<const R: usize>(
        &self,
        head: usize,
        i: usize,
        kt: &[f32],
        vt: &[f32],
        tp: usize,
        g: &[f32],
        p: &mut [f32],
        ds: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        let (t, h, hd) = (self.t, self.h, self.hd);
        self.probability_rows::<R, true>(head, i, kt, tp, &mut p[i * tp..]);
        let go: [&[f32]; R] = std::array::from_fn(|r| &g[(i + r) * h + head * hd..][..hd]);
        scores_all(&go, vt, hd, tp, &mut ds[i * tp..]);
        for r in i..i + R {
            let (pr, dr) = (p[r * tp..][..t].as_ptr(), ds[r * tp..][..t].as_mut_ptr());
            let mut dot = _mm512_setzero_ps();
            for j in (0..t).step_by(16) {
                let k = lanes(t - j);
                let (pj, dj) = (
                    _mm512_maskz_loadu_ps(k, pr.add(j)),
                    _mm512_maskz_loadu_ps(k, dr.add(j)),
                );
                dot = _mm512_fmadd_ps(pj, dj, dot);
            }
            let dot = _mm512_set1_ps(_mm512_reduce_add_ps(dot));
            for j in (0..t).step_by(16) {
                let k = lanes(t - j);
                let (pj, dj) = (
                    _mm512_maskz_loadu_ps(k, pr.add(j)),
                    _mm512_maskz_loadu_ps(k, dr.add(j)),
                );
                _mm512_mask_storeu_ps(dr.add(j), k, _mm512_mul_ps(pj, _mm512_sub_ps(dj, dot)));
            }
        }
    }

    /// Query rows `[i, i + R)` of `head`: their scores (plus the mask) into `p` (`R` rows of
    /// `tp`) as `e^(s − max)`, normalised when `NORMALISE`, else left for the caller to
    /// scale by the returned `1 / Σ`.
    #[inline(always)]
    unsafe fn probability_rows<const R: usize, const NORMALISE: bool>(
        &self,
        head: usize,
        i: usize,
        kt: &[f32],
        tp: usize,
        p: &mut [f32],
    ) -> [f32; R] {
        use std::arch::x86_64::*;
        let (t, hd, h3) = (self.t, self.hd, 3 * self.h);
        let q: [&[f32]; R] = std::array::from_fn(|r| &self.x[(i + r) * h3 + head * hd..][..hd]);
        scores_all(&q, kt, hd, tp, p);
        // (A loop, not `array::from_fn`: a closure does not inherit the target features, so
        // the calls inside it would not be inlined.)
        let mut inv = [0f32; R];
        for (r, inv) in inv.iter_mut().enumerate() {
            let mask = self.mask.map(|m| &m[(i + r) * t..][..t]);
            let row = &mut p[r * tp..][..t];
            *inv = exp_scores(row, mask);
            if NORMALISE {
                let s = _mm512_set1_ps(*inv);
                for j in (0..t).step_by(16) {
                    let (k, at) = (lanes(t - j), row.as_mut_ptr().add(j));
                    _mm512_mask_storeu_ps(at, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, at), s));
                }
                *inv = 1.0;
            }
        }
        inv
    }

    /// Columns `[col, col + head_dim)` of the `T` rows transposed into `dst` `[head_dim, ld]`
    /// (`ld` ≥ T a multiple of 16; columns T..ld zero) by 16 × 16 blocks in registers: the
    /// scalar copy in [`Sequence::transposed`] stores to 16 cache lines per key and took
    /// about a sixth of the attention core's time.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn transposed_blocks(&self, col: usize, dst: &mut [f32], ld: usize) {
        use std::arch::x86_64::*;
        let (t, hd, h3) = (self.t, self.hd, 3 * self.h);
        assert!(ld >= t && ld.is_multiple_of(16) && hd.is_multiple_of(16));
        assert!(dst.len() >= hd * ld && col + hd <= h3);
        let src = self.x.as_ptr().add(col);
        for j0 in (0..ld).step_by(16) {
            for c0 in (0..hd).step_by(16) {
                let rows: [__m512; 16] = std::array::from_fn(|r| {
                    if j0 + r < t {
                        _mm512_loadu_ps(src.add((j0 + r) * h3 + c0))
                    } else {
                        _mm512_setzero_ps()
                    }
                });
                for (c, col) in transpose16(rows).iter().enumerate() {
                    _mm512_storeu_ps(dst.as_mut_ptr().add((c0 + c) * ld + j0), *col);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Sequence<'_> {
    /// [`Sequence::heads_into`] on 8-lane registers for head widths of whole vectors: a query
    /// row's scores against up to 64 keys at a time, and its output up to 64 columns at a
    /// time, stay in registers across the head dimension and the keys (the plain loops load
    /// and store a row of scores or outputs for every FMA step).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn heads_avx2(&self, out: &mut [MaybeUninit<f32>]) {
        let (t, h, hd, h3) = (self.t, self.h, self.hd, 3 * self.h);
        assert!(hd.is_multiple_of(8) && self.x.len() >= t * h3 && out.len() >= t * h);
        // Keys transposed, rows padded with zeros to whole vectors.
        let tp = t.next_multiple_of(8);
        let mut kt = vec![0f32; hd * tp];
        let mut p = vec![0f32; tp];
        let out = out.as_mut_ptr().cast::<f32>();
        for head in 0..self.heads {
            self.transposed(head, h, &mut kt, tp);
            let v = self.x.as_ptr().add(2 * h + head * hd);
            for i in 0..t {
                self.probability_row8(head, i, &kt, tp, &mut p);
                let row = &p[..t];
                weighted8(hd, t, |j| row[j], v, h3, out.add(i * h + head * hd));
            }
        }
    }

    /// Row `i`'s softmax probabilities of `head` into `p[..T]` (`kt`: the keys transposed,
    /// `[hd, tp]`).
    #[inline(always)]
    unsafe fn probability_row8(&self, head: usize, i: usize, kt: &[f32], tp: usize, p: &mut [f32]) {
        let (t, hd, h3) = (self.t, self.hd, 3 * self.h);
        scores8(&self.x[i * h3 + head * hd..][..hd], kt, tp, p);
        let row = &mut p[..t];
        if let Some(m) = self.mask {
            row.iter_mut()
                .zip(&m[i * t..][..t])
                .for_each(|(s, m)| *s += m);
        }
        softmax(row);
    }

    /// [`Sequence::grads_into`] on 8-lane registers for head widths of whole vectors: per head
    /// `P` and `dS` (`T × T`) are built row by row ([`scores8`] for the scores and for
    /// `dP = dO·vᵀ`), then every row of `dq = dS·k`, `dk = dSᵀ·q` and `dv = Pᵀ·dO` is summed in
    /// registers ([`weighted8`]) and written once (the plain loops add into `dk` and `dv` in
    /// memory for every query row).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn grads_avx2(&self, g: &[f32], dx: &mut [MaybeUninit<f32>]) {
        let (t, h, hd, h3) = (self.t, self.h, self.hd, 3 * self.h);
        assert!(hd.is_multiple_of(8) && self.x.len() >= t * h3);
        assert!(dx.len() >= t * h3 && g.len() >= t * h);
        let tp = t.next_multiple_of(8);
        let mut kt = vec![0f32; hd * tp];
        let mut vt = vec![0f32; hd * tp];
        let mut p = vec![0f32; t * tp];
        let mut ds = vec![0f32; t * tp];
        let (x, go, dx) = (self.x.as_ptr(), g.as_ptr(), dx.as_mut_ptr().cast::<f32>());
        for head in 0..self.heads {
            self.transposed(head, h, &mut kt, tp);
            self.transposed(head, 2 * h, &mut vt, tp);
            let (qc, kc, vc) = (head * hd, h + head * hd, 2 * h + head * hd);
            for i in 0..t {
                let (pr, dr) = (&mut p[i * tp..][..tp], &mut ds[i * tp..][..tp]);
                self.probability_row8(head, i, &kt, tp, pr);
                scores8(&g[i * h + qc..][..hd], &vt, tp, dr);
                let (pr, dr) = (&pr[..t], &mut dr[..t]);
                let dot: f32 = dr.iter().zip(pr).map(|(d, p)| d * p).sum();
                dr.iter_mut()
                    .zip(pr)
                    .for_each(|(d, &p)| *d = p * (*d - dot));
            }
            for i in 0..t {
                let (pc, dsr) = (|j: usize| p[j * tp + i], |j: usize| ds[i * tp + j]);
                let dsc = |j: usize| ds[j * tp + i];
                let row = dx.add(i * h3);
                weighted8(hd, t, dsr, x.add(kc), h3, row.add(qc));
                weighted8(hd, t, dsc, x.add(qc), h3, row.add(kc));
                weighted8(hd, t, pc, go.add(qc), h, row.add(vc));
            }
        }
    }
}

/// `f::<NV>(args)` for each chunk `c` of up to 64 floats (`NV` ≤ 8 vectors of 8) covering
/// `[0, width)`, `width` a multiple of 8: the chunk width is a constant of the kernel, so its
/// accumulators are registers.
#[cfg(target_arch = "x86_64")]
macro_rules! in_chunks8 {
    ($width:expr, |$c:ident| $f:ident::<NV>($($arg:expr),*)) => {{
        let width = $width;
        let mut $c = 0;
        while $c < width {
            match ((width - $c) / 8).min(8) {
                1 => $f::<1>($($arg),*),
                2 => $f::<2>($($arg),*),
                3 => $f::<3>($($arg),*),
                4 => $f::<4>($($arg),*),
                5 => $f::<5>($($arg),*),
                6 => $f::<6>($($arg),*),
                7 => $f::<7>($($arg),*),
                _ => $f::<8>($($arg),*),
            }
            $c += 64;
        }
    }};
}

/// The scores of `q` (`hd` floats) against all `tp` columns of `kt` (`[hd, tp]`, `tp` a
/// multiple of 8) into `p[..tp]`, up to 64 columns at a time in registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scores8(q: &[f32], kt: &[f32], tp: usize, p: &mut [f32]) {
    in_chunks8!(tp, |c| scores8_at::<NV>(q, kt, tp, c, p));
}

/// `out[..w] = Σ_{j < n} coef(j) · m[j][..w]` (`m[j]` at `m + j·stride`, `w` a multiple of 8),
/// up to 64 columns at a time in registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn weighted8(
    w: usize,
    n: usize,
    coef: impl Fn(usize) -> f32 + Copy,
    m: *const f32,
    stride: usize,
    out: *mut f32,
) {
    in_chunks8!(w, |c| weighted8_at::<NV>(
        n,
        coef,
        m.add(c),
        stride,
        out.add(c)
    ));
}

/// The scores of query `q` against keys `[c, c + 8·NV)` of `kt` (`[hd, tp]`) into `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scores8_at<const NV: usize>(q: &[f32], kt: &[f32], tp: usize, c: usize, p: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(kt.len() >= q.len() * tp && c + 8 * NV <= tp && p.len() >= tp);
    let mut acc = [_mm256_setzero_ps(); NV];
    for (d, &qd) in q.iter().enumerate() {
        let k = kt.as_ptr().add(d * tp + c);
        let qd = _mm256_set1_ps(qd);
        for (v, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(qd, _mm256_loadu_ps(k.add(8 * v)), *a);
        }
    }
    for (v, &a) in acc.iter().enumerate() {
        _mm256_storeu_ps(p.as_mut_ptr().add(c + 8 * v), a);
    }
}

/// `out = Σ_{j < n} coef(j) · m[j]` for `8·CV` floats (`m[j]` at `m + j·stride`), the sum in
/// registers.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn weighted8_at<const CV: usize>(
    n: usize,
    coef: impl Fn(usize) -> f32,
    m: *const f32,
    stride: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut o = [_mm256_setzero_ps(); CV];
    for j in 0..n {
        let (c, v) = (_mm256_set1_ps(coef(j)), m.add(j * stride));
        for (k, o) in o.iter_mut().enumerate() {
            *o = _mm256_fmadd_ps(c, _mm256_loadu_ps(v.add(8 * k)), *o);
        }
    }
    for (k, &o) in o.iter().enumerate() {
        _mm256_storeu_ps(out.add(8 * k), o);
    }
}

/// `out[r] = scale[r] · Σ_{j < n} coef(r, j) · m[j]` for `R` rows of `16·HV` floats (`m[j]`
/// at `m + j·stride`, `out[r]` at `out + r·ld`): the rows' sums stay in registers and each
/// vector of `m` loaded serves all `R` of them.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn weighted_rows<const R: usize, const HV: usize>(
    n: usize,
    coef: impl Fn(usize, usize) -> f32,
    m: *const f32,
    stride: usize,
    scale: [f32; R],
    out: *mut f32,
    ld: usize,
) {
    use std::arch::x86_64::*;
    let mut o = [[_mm512_setzero_ps(); HV]; R];
    for j in 0..n {
        let v = m.add(j * stride);
        let v: [__m512; HV] = std::array::from_fn(|k| _mm512_loadu_ps(v.add(16 * k)));
        for (r, o) in o.iter_mut().enumerate() {
            let c = _mm512_set1_ps(coef(r, j));
            for (o, &v) in o.iter_mut().zip(&v) {
                *o = _mm512_fmadd_ps(c, v, *o);
            }
        }
    }
    for (r, o) in o.iter().enumerate() {
        let s = _mm512_set1_ps(scale[r]);
        for (k, &o) in o.iter().enumerate() {
            _mm512_storeu_ps(out.add(r * ld + 16 * k), _mm512_mul_ps(o, s));
        }
    }
}

/// The scores of `R` `rows` against all `tp` columns of `kt` (`[hd, tp]`) into `p` (`R` rows
/// of `tp`), 64 columns at a time.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scores_all<const R: usize>(
    rows: &[&[f32]; R],
    kt: &[f32],
    hd: usize,
    tp: usize,
    p: &mut [f32],
) {
    let mut c = 0;
    while c < tp {
        match (tp - c) / 16 {
            1 => scores::<R, 1>(rows, kt, hd, tp, c, p),
            2 => scores::<R, 2>(rows, kt, hd, tp, c, p),
            3 => scores::<R, 3>(rows, kt, hd, tp, c, p),
            _ => scores::<R, 4>(rows, kt, hd, tp, c, p),
        }
        c += 64;
    }
}

/// Scores of the `R` query `rows` against keys `[c, c + 16·NV)` into `p`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scores<const R: usize, const NV: usize>(
    rows: &[&[f32]; R],
    kt: &[f32],
    hd: usize,
    tp: usize,
    c: usize,
    p: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NV]; R];
    for d in 0..hd {
        let k = kt[d * tp + c..][..16 * NV].as_ptr();
        let k: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(k.add(16 * v)));
        for (acc, row) in acc.iter_mut().zip(rows) {
            let qd = _mm512_set1_ps(*row.get_unchecked(d));
            for (a, &k) in acc.iter_mut().zip(&k) {
                *a = _mm512_fmadd_ps(qd, k, *a);
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let dst = p[r * tp + c..][..16 * NV].as_mut_ptr();
        for (v, &a) in acc.iter().enumerate() {
            _mm512_storeu_ps(dst.add(16 * v), a);
        }
    }
}

/// A row of scores (plus `mask`) into `e^(s − max)` in place; returns `1 / Σ e^(s − max)`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn exp_scores(p: &mut [f32], mask: Option<&[f32]>) -> f32 {
    use std::arch::x86_64::*;
    let n = p.len();
    let ptr = p.as_mut_ptr();
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    for i in (0..n).step_by(16) {
        // All lanes, or the tail's.
        let k = lanes(n - i);
        let mut s = _mm512_maskz_loadu_ps(k, ptr.add(i));
        if let Some(m) = mask {
            s = _mm512_add_ps(s, _mm512_maskz_loadu_ps(k, m.as_ptr().add(i)));
            _mm512_mask_storeu_ps(ptr.add(i), k, s);
        }
        max = _mm512_mask_max_ps(max, k, max, s);
    }
    let max = _mm512_set1_ps(_mm512_reduce_max_ps(max));
    let mut sum = _mm512_setzero_ps();
    for i in (0..n).step_by(16) {
        let k = lanes(n - i);
        let e = super::vmath::exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, ptr.add(i)), max));
        _mm512_mask_storeu_ps(ptr.add(i), k, e);
        sum = _mm512_mask_add_ps(sum, k, sum, e);
    }
    1.0 / _mm512_reduce_add_ps(sum)
}

/// The mask of the first `min(n, 16)` lanes.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn lanes(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        (1u16 << n) - 1
    }
}

/// A 16 × 16 block of floats transposed: `rows[r]` lane `c` becomes lane `r` of column `c`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose16(rows: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    // Pairs of rows interleaved within each 128-bit lane, then pairs of those: u[4i + c]
    // holds, in lane L, column 4L + c of rows 4i..4i + 4.
    let t: [__m512; 16] = std::array::from_fn(|k| {
        let (a, b) = (rows[k & !1], rows[k | 1]);
        if k % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    let u: [__m512; 16] = std::array::from_fn(|k| {
        let (i, c) = (k / 4, k % 4);
        let (a, b) = (
            _mm512_castps_pd(t[4 * i + c / 2]),
            _mm512_castps_pd(t[4 * i + c / 2 + 2]),
        );
        _mm512_castpd_ps(if c % 2 == 0 {
            _mm512_unpacklo_pd(a, b)
        } else {
            _mm512_unpackhi_pd(a, b)
        })
    });
    // Then the 128-bit lanes: column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
    let mut cols = [_mm512_setzero_ps(); 16];
    for c in 0..4 {
        let even = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        let odd = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
        let even2 = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        let odd2 = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
        cols[c] = _mm512_shuffle_f32x4::<0x88>(even, even2);
        cols[4 + c] = _mm512_shuffle_f32x4::<0x88>(odd, odd2);
        cols[8 + c] = _mm512_shuffle_f32x4::<0xdd>(even, even2);
        cols[12 + c] = _mm512_shuffle_f32x4::<0xdd>(odd, odd2);
    }
    cols
}

/// A row of scores into probabilities, in place.
#[inline(always)]
fn softmax(p: &mut [f32]) {
    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for s in p.iter_mut() {
        *s = super::vmath::exp_nonpositive(*s - max);
        sum += *s;
    }
    let inv = 1.0 / sum;
    p.iter_mut().for_each(|s| *s *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// The composed formulation clip.rs falls back to.
    fn composed(qkv: &Tensor, heads: usize, mask: Option<&Tensor>) -> Tensor {
        let (b, t, h3) = qkv.dims3().unwrap();
        let (h, hd) = (h3 / 3, h3 / 3 / heads);
        let y = qkv
            .reshape((b, t, 3, heads, hd))
            .unwrap()
            .permute((2, 0, 3, 1, 4))
            .unwrap()
            .contiguous()
            .unwrap();
        let (q, k, v) = (y.get(0).unwrap(), y.get(1).unwrap(), y.get(2).unwrap());
        let mut a = q.matmul(&k.t().unwrap()).unwrap();
        if let Some(m) = mask {
            a = a.broadcast_add(m).unwrap();
        }
        let a = candle_nn::ops::softmax(&a, D::Minus1).unwrap();
        a.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, h))
            .unwrap()
    }

    #[test]
    fn fused_attention_equals_the_composed_ops() {
        if isa().is_none() {
            eprintln!("no AVX2/FMA on this CPU: the composed ops are used instead");
            return;
        }
        let dev = Device::Cpu;
        // Head widths of the plain loops (8, 16) and of the blocked kernel (32, 64, 80, 128),
        // with sequence lengths that leave partial row blocks and key chunks (77: the text).
        for (b, t, heads, hd) in [
            (3, 50, 4, 16),
            (2, 7, 2, 64),
            (1, 1, 1, 8),
            (2, 50, 2, 64),
            (1, 77, 2, 64),
            (1, 21, 1, 80),
            (1, 66, 2, 32),
            (1, 9, 1, 128),
            // One token, and whole and just-over 16-key blocks.
            (1, 1, 2, 64),
            (2, 16, 1, 64),
            (1, 17, 1, 32),
        ] {
            let qkv = Tensor::randn(0f32, 1.5, (b, t, 3 * heads * hd), &dev).unwrap();
            let causal = crate::model::clip::causal_mask(t, DType::F32, &dev).unwrap();
            for mask in [None, Some(&causal)] {
                let fused = attention(&qkv, heads, mask).unwrap().unwrap();
                let want = composed(&qkv, heads, mask);
                let diff = crate::testutil::max_abs_diff(&fused, &want);
                // Unscaled N(0, 1.5²) queries and keys make logits up to ~40: outputs of ~1.5
                // differ by a few ulp with the summation order.
                assert!(
                    diff < 1e-4,
                    "{b}×{t}, {heads} heads, mask {}: {diff}",
                    mask.is_some()
                );
            }
        }
    }

    /// An output buffer for the blocked kernels, "uninitialised" as NaN: an element they leave
    /// unwritten fails [`written`].
    #[cfg(target_arch = "x86_64")]
    fn uninit(n: usize) -> Vec<MaybeUninit<f32>> {
        vec![MaybeUninit::new(f32::NAN); n]
    }

    #[cfg(target_arch = "x86_64")]
    fn written(out: Vec<MaybeUninit<f32>>) -> Vec<f32> {
        // SAFETY: initialised (as NaN) by `uninit`.
        let out: Vec<f32> = out
            .into_iter()
            .map(|v| unsafe { v.assume_init() })
            .collect();
        assert!(out.iter().all(|v| !v.is_nan()), "an element left unwritten");
        out
    }

    /// Asserts that a kernel's outputs (`fwd`) and gradients (`bwd`) equal the plain loops' on
    /// one shape of deterministic inputs, with and without the causal mask. The kernels write
    /// into [`uninit`] buffers, so an element they leave unwritten fails too.
    #[cfg(target_arch = "x86_64")]
    fn assert_kernel_equals_plain_loops(
        (t, heads, hd): (usize, usize, usize),
        fwd: impl Fn(&Sequence, &mut [MaybeUninit<f32>]),
        bwd: impl Fn(&Sequence, &[f32], &mut [MaybeUninit<f32>]),
    ) {
        let h = heads * hd;
        let x: Vec<f32> = (0..t * 3 * h)
            .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 3.0)
            .collect();
        let g: Vec<f32> = (0..t * h)
            .map(|i| (i * 4253 % 997) as f32 / 997.0 - 0.5)
            .collect();
        let causal = crate::model::clip::causal_mask(t, DType::F32, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let max_diff = |a: &[f32], b: Vec<f32>| {
            a.iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max)
        };
        for mask in [None, Some(&causal[..])] {
            let seq = Sequence {
                x: &x,
                t,
                h,
                hd,
                heads,
                mask,
            };
            let (mut plain, mut fast) = (vec![0f32; t * h], uninit(t * h));
            seq.heads_into(&mut plain);
            fwd(&seq, &mut fast);
            let diff = max_diff(&plain, written(fast));
            assert!(
                diff < 1e-5,
                "outputs {t}×{heads}×{hd}, mask {}: {diff}",
                mask.is_some()
            );

            let (mut plain, mut fast) = (vec![0f32; t * 3 * h], uninit(t * 3 * h));
            seq.grads_into(&g, &mut plain);
            bwd(&seq, &g, &mut fast);
            let diff = max_diff(&plain, written(fast));
            assert!(
                diff < 1e-4,
                "gradients {t}×{heads}×{hd}, mask {}: {diff}",
                mask.is_some()
            );
        }
    }

    /// The 8-lane kernels against the plain loops on any CPU with AVX2 (on AVX-512 CPUs the
    /// fused-attention tests above run the 16-lane kernels instead): head widths of one, eight
    /// and ten vectors (two column chunks), sequences with partial key vectors and more than 64
    /// keys, with and without the causal mask.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernel_equals_the_plain_loops() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            eprintln!("no AVX2/FMA on this CPU: the 8-lane kernel is not used");
            return;
        }
        for shape in [
            (77, 2, 64),
            (50, 3, 8),
            (9, 1, 80),
            (1, 2, 64),
            (66, 1, 128),
        ] {
            assert_kernel_equals_plain_loops(
                shape,
                // SAFETY (both): AVX2 and FMA were detected above.
                |seq, out| unsafe { seq.heads_avx2(out) },
                |seq, g, dx| unsafe { seq.grads_avx2(g, dx) },
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn blocked_kernels_equal_the_plain_loops() {
        if isa() != Some(Isa::Avx512) {
            eprintln!("no AVX-512 on this CPU: the blocked kernels are not used");
            return;
        }
        assert_kernel_equals_plain_loops(
            (77, 2, 64),
            // SAFETY (both): AVX-512 was detected above.
            |seq, out| unsafe { seq.heads_blocked::<4, 4>(out) },
            |seq, g, dx| unsafe { seq.grads_blocked::<4, 4>(g, dx) },
        );
    }

    #[test]
    fn fused_attention_gradient_equals_the_composed_one() {
        if isa().is_none() {
            return;
        }
        let dev = Device::Cpu;
        // The plain loops (16) and every blocked head width, with partial row blocks.
        for (b, t, heads, hd) in [
            (2, 9, 3, 16),
            (1, 50, 2, 64),
            (1, 77, 2, 64),
            (2, 21, 1, 80),
            (1, 66, 2, 32),
            (1, 9, 1, 128),
            (1, 1, 2, 64),
            (2, 16, 1, 64),
            (1, 17, 1, 32),
        ] {
            let qkv = candle_core::Var::from_tensor(
                &(Tensor::randn(0f32, 1.0, (b, t, 3 * heads * hd), &dev).unwrap() * 0.5).unwrap(),
            )
            .unwrap();
            let mix = Tensor::randn(0f32, 1.0, (b, t, heads * hd), &dev).unwrap();
            let causal = crate::model::clip::causal_mask(t, DType::F32, &dev).unwrap();
            for mask in [None, Some(&causal)] {
                let grad = |y: Tensor| {
                    let g = (y * &mix).unwrap().sum_all().unwrap().backward().unwrap();
                    g.get(qkv.as_tensor()).unwrap().clone()
                };
                let fused = grad(attention(qkv.as_tensor(), heads, mask).unwrap().unwrap());
                let want = grad(composed(qkv.as_tensor(), heads, mask));
                let diff = crate::testutil::max_abs_diff(&fused, &want);
                assert!(
                    diff < 1e-4,
                    "{b}×{t}, {heads} heads, mask {}: {diff}",
                    mask.is_some()
                );
            }
        }
    }
}

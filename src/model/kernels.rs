//! Fused CPU kernels for the element-heavy steps of a transformer layer.
//!
//! candle composes `x·Wᵀ + b` from a GEMM and a broadcast add, and QuickGELU `x·σ(1.702x)` from
//! three element-wise passes, each allocating a fresh output; its fused layer-norm and softmax
//! kernels have no backward pass, so training composes those too (six and five passes, each
//! output kept alive by the autograd graph). On the CPU those extra passes cost about a tenth of
//! a ViT forward, and more of a training step and its memory. Here the bias is the GEMM's
//! initial output (`gemm` accumulates onto it), and QuickGELU, layer norm and softmax are one
//! pass each, forward and backward (the backward passes are fused kernels of their own on the
//! CPU, composed candle ops elsewhere), so the same layers train; other devices and dtypes use
//! the composed formulation.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use super::gemm_bf16::{self, Epilogue, PackedView, Pairs};

/// The contiguous f32 elements of a CPU operand, or `None` for anything else.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout) -> Option<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(data), Some((start, end))) => Some(&data[start..end]),
        _ => None,
    }
}

/// Whether every tensor is f32 on the CPU, where the fused kernels here apply.
pub(crate) fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// A new output of `l`'s shape, filled by `f(out_block, in_block)` over blocks of `block`
/// elements in parallel (`block` a multiple of whatever row the op works on).
fn map_blocks(
    x: &[f32],
    l: &Layout,
    block: usize,
    f: impl Fn(&mut [f32], &[f32]) + Sync,
) -> (CpuStorage, Shape) {
    (CpuStorage::F32(par_map(x, block, f)), l.shape().clone())
}

/// `f(out_block, in_block)` over blocks of `block` elements of `x` in parallel, into a new
/// vector.
fn par_map(x: &[f32], block: usize, f: impl Fn(&mut [f32], &[f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(block.max(1))
        .zip(x.par_chunks(block.max(1)))
        .for_each(|(o, x)| f(o, x));
    out
}

/// An operand of [`gemm_f32`]: its first element, and the strides between its columns and
/// between its rows.
#[derive(Clone, Copy)]
struct Strided {
    at: *const f32,
    cs: isize,
    rs: isize,
}

impl Strided {
    fn new(at: *const f32, cs: usize, rs: usize) -> Self {
        Self {
            at,
            cs: cs as isize,
            rs: rs as isize,
        }
    }
}

/// `c = a·b`, or `c += a·b` with `accumulate`, for `a` `[m, k]`, `b` `[k, n]` and a row-major
/// `[m, n]` output at `c`: the one call into the `gemm` crate, on clipft's rayon threads.
///
/// # Safety
/// The operands hold every element their sizes and strides reach; `c` holds `m·n` elements,
/// initialised when `accumulate` (otherwise they are only written).
unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    a: Strided,
    b: Strided,
    c: *mut f32,
    accumulate: bool,
) {
    // gemm computes `c = alpha·c + beta·a·b`, reading `c` only when told to.
    let alpha = if accumulate { 1.0f32 } else { 0.0 };
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        n as isize,
        accumulate,
        a.at,
        a.cs,
        a.rs,
        b.at,
        b.cs,
        b.rs,
        alpha,
        1.0f32,
        false,
        false,
        false,
        threads(),
    )
}

fn threads() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `x·Wᵀ + b` for `x` `[M, K]`, `W` `[N, K]`, `b` `[N]`; with `gelu_input`,
/// `QuickGELU(x)·Wᵀ + b`, the MLP's activation taken inside the second layer so that training
/// keeps the `[M, K]` pre-activation alone for the backward pass, not the activation as well
/// (each is 4× the width of the residual stream); the activation is recomputed there. With a
/// `residual` `[M, N]` (inference only), `r + x·Wᵀ + b`: the output starts as `r + b` instead of
/// `b`, so the residual connection costs no pass of its own.
struct DenseBias {
    gelu_input: bool,
    residual: Option<Tensor>,
}

impl CustomOp3 for DenseBias {
    fn name(&self) -> &'static str {
        "dense-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l1.shape().dims2()?;
        let (n, k2) = l2.shape().dims2()?;
        let (Some(x), Some(w), Some(b)) = (f32_slice(s1, l1), f32_slice(s2, l2), f32_slice(s3, l3))
        else {
            candle_core::bail!("dense-bias: contiguous f32 operands expected")
        };
        if k != k2 || b.len() != n {
            candle_core::bail!(
                "dense-bias: shapes {:?} {:?} {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let activated;
        let x = if self.gelu_input {
            activated = par_map(x, 1 << 14, super::vmath::quick_gelu);
            &activated[..]
        } else {
            x
        };
        let mut out = Vec::with_capacity(m * n);
        match &self.residual {
            None => {
                for _ in 0..m {
                    out.extend_from_slice(b);
                }
            }
            Some(r) => {
                let (storage, layout) = r.storage_and_layout();
                let candle_core::Storage::Cpu(storage) = &*storage else {
                    candle_core::bail!("dense-bias: a CPU residual expected")
                };
                let Some(r) = f32_slice(storage, layout).filter(|r| r.len() == m * n) else {
                    candle_core::bail!("dense-bias: a contiguous f32 residual [{m}, {n}] expected")
                };
                for row in r.chunks_exact(n) {
                    out.extend(row.iter().zip(b).map(|(r, b)| r + b));
                }
            }
        }
        if let Some(blas) = super::blas::get() {
            blas.dense(x, m, k, w, n, &mut out);
            return Ok((CpuStorage::F32(out), Shape::from((m, n))));
        }
        // SAFETY: `out` is m×n row-major (the bias rows), `x` m×k row-major, and Wᵀ is read
        // from the n×k row-major `w` through strides (column stride k, row stride 1).
        unsafe {
            gemm_f32(
                (m, n, k),
                Strided::new(x.as_ptr(), 1, k),
                Strided::new(w.as_ptr(), k, 1),
                out.as_mut_ptr(),
                true,
            )
        }
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.residual.is_some() {
            candle_core::bail!("dense-bias: the residual form is built for inference only")
        }
        // An untracked input (the patch embedding's pixels) needs no gradient: candle would
        // compute and store one anyway, a GEMM as large as the weights' for nothing.
        let (dx, dw, db) = dense_bias_grads(x, w, g, self.gelu_input, x.track_op())?;
        Ok((dx, Some(dw), Some(db)))
    }
}

/// The gradients `(dx, dW, db)` of a dense layer `x·Wᵀ + b` (of `QuickGELU(x)·Wᵀ + b` with
/// `gelu_input`) for `x` `[M, K]`, `W` `[N, K]`, given the output's gradient `g` `[M, N]`;
/// `dx` only `with_dx`.
pub(crate) fn dense_bias_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    gelu_input: bool,
    with_dx: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let db = match cpu_f32_grad(&[g], |t| t[0].apply_op1_no_bwd(&ColumnSum)) {
        Some(db) => db?,
        None => g.sum(0)?,
    };
    if !gelu_input {
        let dx = with_dx.then(|| product(g, false, w)).transpose()?;
        return Ok((dx, product(g, true, x)?, db));
    }
    let x = x.detach().contiguous()?;
    let a = x.apply_op1_no_bwd(&QuickGelu)?;
    let dx = with_dx
        .then(|| x.apply_op2_no_bwd(&product(g, false, w)?.contiguous()?, &QuickGeluGrad))
        .transpose()?;
    Ok((dx, product(g, true, &a)?, db))
}

/// `a·b`, or `aᵀ·b` with `a_t`, for 2-D tensors: on the CPU in f32 one op ([`Product`]), else
/// candle's matmul.
fn product(a: &Tensor, a_t: bool, b: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[a, b]) {
        return a
            .contiguous()?
            .apply_op2_no_bwd(&b.contiguous()?, &Product { a_t });
    }
    match a_t {
        true => a.t()?.matmul(b),
        false => a.matmul(b),
    }
}

/// [`product`] on the CPU: through the external BLAS where one is loaded ([`super::blas`]),
/// else the `gemm` crate writing straight into a new output (candle's matmul zero-fills its
/// output first, 2% of an FD-Align step in `memset`).
struct Product {
    a_t: bool,
}

impl CustomOp2 for Product {
    fn name(&self) -> &'static str {
        "product"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (r1, c1) = l1.shape().dims2()?;
        let (k, n) = l2.shape().dims2()?;
        let (m, k1) = if self.a_t { (c1, r1) } else { (r1, c1) };
        let (Some(a), Some(b)) = (f32_slice(s1, l1), f32_slice(s2, l2)) else {
            candle_core::bail!("product: contiguous f32 operands expected")
        };
        if k != k1 {
            candle_core::bail!("product: shapes {:?} {:?}", l1.dims(), l2.dims())
        }
        if let Some(blas) = super::blas::get() {
            let c = blas.matmul(a, self.a_t, b, m, k, n);
            return Ok((CpuStorage::F32(c), Shape::from((m, n))));
        }
        if k == 0 {
            // An empty sum; gemm might leave the output unwritten.
            return Ok((CpuStorage::F32(vec![0f32; m * n]), Shape::from((m, n))));
        }
        // `a` is `[m, k]` row-major, or `[k, m]` read transposed; `b` is `[k, n]` row-major.
        let (a_cs, a_rs) = if self.a_t { (m, 1) } else { (1, k) };
        let mut c: Vec<f32> = Vec::with_capacity(m * n);
        // SAFETY: `c` has room for the m×n row-major output, which gemm writes whole without
        // reading it; the operands' strides stay inside `a` and `b`.
        unsafe {
            gemm_f32(
                (m, n, k),
                Strided::new(a.as_ptr(), a_cs, a_rs),
                Strided::new(b.as_ptr(), 1, n),
                c.as_mut_ptr(),
                false,
            );
            c.set_len(m * n);
        }
        Ok((CpuStorage::F32(c), Shape::from((m, n))))
    }
}

/// `QuickGELU(x)·Wᵀ + b` for a 2-D `x` `[M, K]`: on the CPU in f32 one op that keeps only `x`
/// for the backward pass; composed elsewhere.
pub fn quick_gelu_dense_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[x, w, b]) {
        x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            DenseBias {
                gelu_input: true,
                residual: None,
            },
        )
    } else {
        dense_bias(&quick_gelu(x)?, w, b)
    }
}

/// Column sums of a `[M, N]` matrix (the bias gradient), over blocks of rows in parallel
/// (candle's own sum over rows runs on one core).
struct ColumnSum;

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, n) = l.shape().dims2()?;
        let Some(g) = f32_slice(s, l) else {
            candle_core::bail!("column-sum: a contiguous f32 input expected")
        };
        let sums = g
            .par_chunks(64 * n.max(1))
            .map(|block| {
                let mut p = vec![0f32; n];
                for row in block.chunks(n.max(1)) {
                    p.iter_mut().zip(row).for_each(|(p, g)| *p += g);
                }
                p
            })
            .reduce(
                || vec![0f32; n],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        Ok((CpuStorage::F32(sums), Shape::from(n)))
    }
}

/// `x·Wᵀ + b` for a 2-D `x` `[M, K]`, `W` `[N, K]`, `b` `[N]`: fused on the CPU in f32.
pub fn dense_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[x, w, b]) {
        x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            DenseBias {
                gelu_input: false,
                residual: None,
            },
        )
    } else {
        x.matmul(&w.t()?)?.broadcast_add(b)
    }
}

/// `r + x·Wᵀ + b` for a 2-D `x` `[M, K]` and `r` `[M, N]`: on the CPU in f32 with nothing
/// tracked, one op whose output starts as `r + b` (no pass of its own for the residual);
/// composed elsewhere.
pub fn dense_bias_add(x: &Tensor, w: &Tensor, b: &Tensor, r: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[x, w, b, r]) && ![x, w, b, r].iter().any(|t| t.track_op()) {
        x.contiguous()?.apply_op3_no_bwd(
            &w.contiguous()?,
            &b.contiguous()?,
            &DenseBias {
                gelu_input: false,
                residual: Some(r.contiguous()?),
            },
        )
    } else {
        r + dense_bias(x, w, b)?
    }
}

/// `r + QuickGELU(x)·Wᵀ + b` for a 2-D `x` `[M, K]` and `r` `[M, N]`, all f32 on the CPU and
/// untracked: one op (the activation inside the GEMM's input, the residual its initial output).
pub(crate) fn quick_gelu_dense_bias_add(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    r: &Tensor,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &w.contiguous()?,
        &b.contiguous()?,
        &DenseBias {
            gelu_input: true,
            residual: Some(r.contiguous()?),
        },
    )
}

/// `x·Wᵀ + b` with bf16 products ([`super::gemm_bf16`]), QuickGELU applied if `gelu`;
/// inference only.
struct DenseBf16<'a> {
    w: &'a PackedView,
    gelu: bool,
}

impl DenseBf16<'_> {
    fn run(&self, s: &CpuStorage, l: &Layout, epilogue: Epilogue) -> Result<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        let Some(x) = f32_slice(s, l) else {
            candle_core::bail!("dense-bf16: a contiguous f32 input expected")
        };
        if k != self.w.in_dim() {
            candle_core::bail!(
                "dense-bf16: input {:?} for {} inputs",
                l.dims(),
                self.w.in_dim()
            )
        }
        let y = gemm_bf16::dense(x, m, self.w, epilogue);
        Ok((CpuStorage::F32(y), Shape::from((m, self.w.out_dim()))))
    }
}

impl CustomOp1 for DenseBf16<'_> {
    fn name(&self) -> &'static str {
        "dense-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let epilogue = if self.gelu {
            Epilogue::QuickGelu
        } else {
            Epilogue::None
        };
        self.run(s, l, epilogue)
    }
}

/// With a residual added as the second operand.
impl CustomOp2 for DenseBf16<'_> {
    fn name(&self) -> &'static str {
        "dense-bf16-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Some(r) = f32_slice(s2, l2) else {
            candle_core::bail!("dense-bf16: a contiguous f32 residual expected")
        };
        if l2.dims() != [l1.dims()[0], self.w.out_dim()] {
            candle_core::bail!(
                "dense-bf16: residual {:?} for input {:?}",
                l2.dims(),
                l1.dims()
            )
        }
        self.run(s1, l1, Epilogue::Add(r))
    }
}

/// `x·Wᵀ + b` for a 2-D f32 CPU `x` `[M, K]` and a packed bf16 layer, then QuickGELU if `gelu`;
/// no gradient.
pub fn dense_bf16(x: &Tensor, w: &PackedView, gelu: bool) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&DenseBf16 { w, gelu })
}

/// `residual + x·Wᵀ + b`, the residual `[M, N]` added in the GEMM's epilogue; no gradient.
pub fn dense_bf16_add(x: &Tensor, w: &PackedView, residual: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2_no_bwd(&residual.contiguous()?, &DenseBf16 { w, gelu: false })
}

/// A layer norm and what follows it, with bf16 products (inference only). The layer norm's
/// rows go straight into the bf16 pairs the next layer reads, and in the MLP the hidden
/// activations (4× the width of the residual stream) from the first layer to the second the
/// same way: no f32 copy of either is written, read back and converted.
struct NormedBf16<'a> {
    eps: f32,
    then: AfterNorm<'a>,
}

/// The layers after the layer norm in [`NormedBf16`].
#[derive(Clone, Copy)]
enum AfterNorm<'a> {
    /// `LN(x)·Wᵀ + b`: the attention's fused QKV projection.
    Dense(&'a PackedView),
    /// `x + fc2(QuickGELU(fc1·LN(x)))`: the MLP half of an encoder layer.
    Mlp(&'a PackedView, &'a PackedView),
}

impl CustomOp3 for NormedBf16<'_> {
    fn name(&self) -> &'static str {
        "normed-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, h) = l1.shape().dims2()?;
        let (Some(x), Some(w), Some(b)) = (f32_slice(s1, l1), f32_slice(s2, l2), f32_slice(s3, l3))
        else {
            candle_core::bail!("normed-bf16: contiguous f32 operands expected")
        };
        let (first, last, chained) = match self.then {
            AfterNorm::Dense(layer) => (layer, layer, true),
            AfterNorm::Mlp(fc1, fc2) => (
                fc1,
                fc2,
                fc1.out_dim() == fc2.in_dim() && fc2.out_dim() == h,
            ),
        };
        if w.len() != h || b.len() != h || first.in_dim() != h || !chained {
            candle_core::bail!(
                "normed-bf16: input {:?}, layer norm {:?} {:?}, layers {}→{}",
                l1.dims(),
                l2.dims(),
                l3.dims(),
                first.in_dim(),
                last.out_dim()
            )
        }
        let normed = Pairs::from_rows(m, h, |i, row| {
            layer_norm_row(&x[i * h..][..h], w, b, self.eps, row)
        });
        let y = match self.then {
            AfterNorm::Dense(layer) => gemm_bf16::dense_pairs(&normed, layer, Epilogue::None),
            AfterNorm::Mlp(fc1, fc2) => {
                let hidden = gemm_bf16::dense_to_pairs(&normed, fc1, Epilogue::QuickGelu);
                gemm_bf16::dense_pairs(&hidden, fc2, Epilogue::Add(x))
            }
        };
        Ok((CpuStorage::F32(y), Shape::from((m, last.out_dim()))))
    }
}

/// `x` `[M, H]` through a layer norm (`w`, `b`, `eps`) and `then`, for f32 CPU tensors (as the
/// packed layers are); no gradient.
fn normed_bf16(
    x: &Tensor,
    (w, b, eps): (&Tensor, &Tensor, f64),
    then: AfterNorm,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3_no_bwd(
        &w.contiguous()?,
        &b.contiguous()?,
        &NormedBf16 {
            eps: eps as f32,
            then,
        },
    )
}

/// `LN(x)·Wᵀ + b` for a 2-D `x` `[M, H]`, the layer norm's `w`, `b` and `eps`, and a packed bf16
/// layer ([`NormedBf16`]).
pub fn ln_dense_bf16(
    x: &Tensor,
    ln: (&Tensor, &Tensor, f64),
    layer: &PackedView,
) -> Result<Tensor> {
    normed_bf16(x, ln, AfterNorm::Dense(layer))
}

/// `x + fc2(QuickGELU(fc1·LN(x)))` for a 2-D `x` `[M, H]`, the layer norm's `w`, `b` and `eps`,
/// and packed bf16 layers ([`NormedBf16`]).
pub fn mlp_bf16(
    x: &Tensor,
    ln: (&Tensor, &Tensor, f64),
    fc1: &PackedView,
    fc2: &PackedView,
) -> Result<Tensor> {
    normed_bf16(x, ln, AfterNorm::Mlp(fc1, fc2))
}

/// QuickGELU `x·σ(1.702·x)`.
struct QuickGelu;

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(x) = f32_slice(s, l) else {
            candle_core::bail!("quick-gelu: contiguous f32 input expected")
        };
        Ok(map_blocks(x, l, 1 << 14, super::vmath::quick_gelu))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if let Some(dx) = cpu_f32_grad(&[x, g], |t| t[0].apply_op2_no_bwd(&t[1], &QuickGeluGrad)) {
            return dx.map(Some);
        }
        // d/dx x·σ(ax) = σ(ax)·(1 + a·x·(1 − σ(ax)))
        let s = candle_nn::ops::sigmoid(&(x * 1.702)?)?;
        let d = (&s * ((x * &(1.0 - &s)?)? * 1.702)?.affine(1.0, 1.0)?)?;
        Ok(Some((g * d)?))
    }
}

/// QuickGELU's backward pass `g·σ(ax)·(1 + a·x·(1 − σ(ax)))` for `(x, g)`, one pass.
struct QuickGeluGrad;

impl CustomOp2 for QuickGeluGrad {
    fn name(&self) -> &'static str {
        "quick-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some(x), Some(g)) = (f32_slice(s1, l1), f32_slice(s2, l2)) else {
            candle_core::bail!("quick-gelu-grad: contiguous f32 operands expected")
        };
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(1 << 14)
            .zip(x.par_chunks(1 << 14).zip(g.par_chunks(1 << 14)))
            .for_each(|(o, (x, g))| super::vmath::quick_gelu_grad(o, x, g));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// A backward pass's fused CPU kernel applied to contiguous copies of `ts` when all are f32 on
/// the CPU; `None` otherwise (the caller composes candle ops). Gradients need no gradient of
/// their own here (no second-order training), so these kernels record none.
fn cpu_f32_grad(
    ts: &[&Tensor],
    f: impl FnOnce(&[Tensor]) -> Result<Tensor>,
) -> Option<Result<Tensor>> {
    cpu_f32(ts).then(|| {
        f(&ts
            .iter()
            .map(|t| t.contiguous())
            .collect::<Result<Vec<_>>>()?)
    })
}

/// QuickGELU `x·σ(1.702·x)`: one fused pass on the CPU in f32, clipft's CUDA op where it
/// applies ([`super::cuda::quick_gelu`]), composed elsewhere.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if cpu_f32(&[x]) {
        x.contiguous()?.apply_op1(QuickGelu)
    } else if let Some(y) = super::cuda::quick_gelu(x) {
        y
    } else {
        x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
    }
}

/// Layer normalisation over the last dimension, `(x − μ)/√(σ² + ε)·w + b`.
struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some(x), Some(w), Some(b)) = (f32_slice(s1, l1), f32_slice(s2, l2), f32_slice(s3, l3))
        else {
            candle_core::bail!("layer-norm: contiguous f32 operands expected")
        };
        let h = w.len();
        if h == 0 || b.len() != h || x.len() % h != 0 {
            candle_core::bail!(
                "layer-norm: shapes {:?} {:?} {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        Ok(map_blocks(x, l1, h, |o, x| {
            layer_norm_row(x, w, b, self.eps, o)
        }))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // x̂ = (x − μ)·r; dx = r·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂)) with dx̂ = g·w.
        let h = w.dim(0)?;
        if let Some(grads) = layer_norm_grads(x, w, g, self.eps) {
            let (dx, dw, db) = grads?;
            return Ok((Some(dx), Some(dw), Some(db)));
        }
        let rows = x.elem_count() / h;
        let (x2, g2) = (x.reshape((rows, h))?, g.reshape((rows, h))?);
        let mean = x2.mean_keepdim(1)?;
        let xc = x2.broadcast_sub(&mean)?;
        let r = (xc.sqr()?.mean_keepdim(1)? + self.eps as f64)?
            .sqrt()?
            .recip()?;
        let xhat = xc.broadcast_mul(&r)?;
        let dxhat = g2.broadcast_mul(w)?;
        let dx = dxhat
            .broadcast_sub(&dxhat.mean_keepdim(1)?)?
            .sub(&xhat.broadcast_mul(&(&dxhat * &xhat)?.mean_keepdim(1)?)?)?
            .broadcast_mul(&r)?;
        let dw = (&g2 * &xhat)?.sum(0)?;
        let db = g2.sum(0)?;
        Ok((Some(dx.reshape(x.shape())?), Some(dw), Some(db)))
    }
}

/// Layer norm's gradients `(dx, dw, db)` for `x` (rows of `w`'s length), given the output's
/// gradient `g`: one fused pass on the CPU in f32, `None` elsewhere.
pub(crate) fn layer_norm_grads(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f32,
) -> Option<Result<(Tensor, Tensor, Tensor)>> {
    let all = cpu_f32_grad(&[x, w, g], |t| {
        t[0].apply_op3_no_bwd(&t[1], &t[2], &LayerNormGrad { eps })
    })?;
    Some(all.and_then(|all| {
        // Rows of dx, then dw and db.
        let rows = all.dim(0)? - 2;
        Ok((
            all.narrow(0, 0, rows)?.reshape(x.shape())?,
            all.get(rows)?,
            all.get(rows + 1)?,
        ))
    }))
}

/// One row of layer norm, `(x − μ)/√(σ² + ε)·w + b`, into `out`.
fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let (mean, rstd) = row_stats(x, eps);
    for (((o, &x), &w), &b) in out.iter_mut().zip(x).zip(w).zip(b) {
        *o = (x - mean) * rstd * w + b;
    }
}

/// Mean and `1/√(σ² + ε)` of one row, as layer norm's forward and backward passes both need
/// (two passes, as PyTorch: `E[x²] − E[x]²` loses the variance of rows with a large mean).
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = lane_sum(x, x, |v, _| v) / n;
    let var = lane_sum(x, x, |v, _| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `Σ f(a_i, b_i)` in 16 partial sums: a single running sum is a chain of dependent adds that
/// the compiler may not reorder, so it stays scalar; independent lanes vectorise.
#[inline(always)]
fn lane_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    const LANES: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&a, &b)| f(a, b))
        .sum();
    for (ca, cb) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += f(ca[i], cb[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Layer norm's backward pass for `(x, w, g)`: `[rows + 2, h]`, the rows of dx, then dw and db
/// (summed over rows in parallel blocks), statistics recomputed per row.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some(x), Some(w), Some(g)) = (f32_slice(s1, l1), f32_slice(s2, l2), f32_slice(s3, l3))
        else {
            candle_core::bail!("layer-norm-grad: contiguous f32 operands expected")
        };
        let h = w.len();
        if h == 0 || x.len() % h != 0 || g.len() != x.len() {
            candle_core::bail!(
                "layer-norm-grad: shapes {:?} {:?} {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let rows = x.len() / h;
        let mut out = vec![0f32; (rows + 2) * h];
        let (dx, params) = out.split_at_mut(rows * h);
        let block = 32 * h;
        let sums = dx
            .par_chunks_mut(block)
            .zip(x.par_chunks(block).zip(g.par_chunks(block)))
            .map(|(dx, (x, g))| {
                let mut p = vec![0f32; 2 * h];
                let mut xhat = vec![0f32; h];
                let mut dxhat = vec![0f32; h];
                let (pw, pb) = p.split_at_mut(h);
                for ((dx, x), g) in dx.chunks_mut(h).zip(x.chunks(h)).zip(g.chunks(h)) {
                    let (mean, r) = row_stats(x, self.eps);
                    for j in 0..h {
                        xhat[j] = (x[j] - mean) * r;
                        dxhat[j] = g[j] * w[j];
                        pw[j] += g[j] * xhat[j];
                        pb[j] += g[j];
                    }
                    let m1 = lane_sum(&dxhat, &dxhat, |d, _| d) / h as f32;
                    let m2 = lane_sum(&dxhat, &xhat, |d, x| d * x) / h as f32;
                    for j in 0..h {
                        dx[j] = r * (dxhat[j] - m1 - xhat[j] * m2);
                    }
                }
                p
            })
            .reduce(
                || vec![0f32; 2 * h],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        params.copy_from_slice(&sums);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, h))))
    }
}

/// Layer normalisation over the last dimension: one fused pass on the CPU in f32 with a
/// backward pass that recomputes the statistics (so training keeps one tensor per call, not the
/// six a composed formulation keeps); `None` elsewhere, for the caller's own formulation.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Option<Result<Tensor>> {
    cpu_f32(&[x, w, b]).then(|| {
        x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            LayerNormOp { eps: eps as f32 },
        )
    })
}

/// Softmax over the last dimension.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some(x) = f32_slice(s, l) else {
            candle_core::bail!("softmax: contiguous f32 input expected")
        };
        let n = (*l.dims().last().unwrap_or(&1)).max(1);
        Ok(map_blocks(x, l, n * 64, |o, x| {
            for (o, x) in o.chunks_mut(n).zip(x.chunks(n)) {
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                for (o, &x) in o.iter_mut().zip(x) {
                    *o = (x - max).exp();
                    sum += *o;
                }
                o.iter_mut().for_each(|o| *o /= sum);
            }
        }))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if let Some(dx) = cpu_f32_grad(&[y, g], |t| t[0].apply_op2_no_bwd(&t[1], &SoftmaxGrad)) {
            return dx.map(Some);
        }
        // dx = y ⊙ (g − Σ g⊙y)
        let dot = (g * y)?.sum_keepdim(candle_core::D::Minus1)?;
        Ok(Some((y * g.broadcast_sub(&dot)?)?))
    }
}

/// Softmax's backward pass `y ⊙ (g − Σ g⊙y)` for `(y, g)`, row by row in one pass.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (Some(y), Some(g)) = (f32_slice(s1, l1), f32_slice(s2, l2)) else {
            candle_core::bail!("softmax-grad: contiguous f32 operands expected")
        };
        let n = (*l1.dims().last().unwrap_or(&1)).max(1);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(n * 64)
            .zip(y.par_chunks(n * 64).zip(g.par_chunks(n * 64)))
            .for_each(|(o, (y, g))| {
                for ((o, y), g) in o.chunks_mut(n).zip(y.chunks(n)).zip(g.chunks(n)) {
                    let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
                    for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                        *o = y * (g - dot);
                    }
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension with a backward pass: fused on the CPU in f32, `None`
/// elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Option<Result<Tensor>> {
    cpu_f32(&[x]).then(|| x.contiguous()?.apply_op1(Softmax))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_abs_diff as max_diff;
    use candle_core::{Device, Var};

    /// `ours` and `theirs` agree, and so do the gradients of `Σ ours·mix` and `Σ theirs·mix`
    /// with respect to each of `vars`.
    fn assert_same(ours: Tensor, theirs: Tensor, mix: &Tensor, vars: &[&Var], tol: f32) {
        assert!(max_diff(&ours, &theirs) < tol);
        let g1 = (ours * mix).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * mix)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in vars {
            let d = max_diff(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(d < tol, "gradient differs by {d}");
        }
    }

    #[test]
    fn dense_bias_and_its_gradients_equal_the_composed_ops() {
        let dev = Device::Cpu;
        let var = |shape: &[usize]| {
            Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev).unwrap()).unwrap()
        };
        let (x, w, b) = (var(&[7, 5]), var(&[3, 5]), var(&[3]));
        let mix = Tensor::randn(0f32, 1.0, (7, 3), &dev).unwrap();
        let ours = dense_bias(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
        let theirs = x
            .as_tensor()
            .matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        assert_same(ours, theirs, &mix, &[&x, &w, &b], 1e-5);
        // An untracked input (pixels) gets no gradient; the weights' are the same.
        let xc = x.as_tensor().detach();
        let g = (dense_bias(&xc, w.as_tensor(), b.as_tensor()).unwrap() * &mix)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&xc).is_none());
        let theirs = (xc.matmul(&w.as_tensor().t().unwrap()).unwrap() * &mix)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = max_diff(
            g.get(w.as_tensor()).unwrap(),
            theirs.get(w.as_tensor()).unwrap(),
        );
        assert!(d < 1e-5, "{d}");
    }

    /// The backward pass's products, `a·b` and `aᵀ·b`, equal candle's matmul, also on shapes
    /// that the GEMM splits into blocks and threads, and on an empty sum.
    #[test]
    fn products_equal_candles_matmul() {
        let dev = Device::Cpu;
        let t = |shape: (usize, usize)| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        for (m, k, n) in [(1, 1, 1), (7, 3, 5), (130, 257, 67), (3, 600, 2), (4, 0, 3)] {
            let (a, at, b) = (t((m, k)), t((k, m)), t((k, n)));
            let d = max_diff(&product(&a, false, &b).unwrap(), &a.matmul(&b).unwrap());
            assert!(d < 1e-4, "{m}×{k}×{n}: {d}");
            let want = at.t().unwrap().matmul(&b).unwrap();
            let d = max_diff(&product(&at, true, &b).unwrap(), &want);
            assert!(d < 1e-4, "{m}×{k}×{n} transposed: {d}");
        }
    }

    #[test]
    fn dense_bias_add_is_the_residual_plus_the_layer() {
        let dev = Device::Cpu;
        let t = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
        let (x, w, b, r) = (t(&[37, 20]), t(&[48, 20]), t(&[48]), t(&[37, 48]));
        let fused = dense_bias_add(&x, &w, &b, &r).unwrap();
        let composed = (&r + dense_bias(&x, &w, &b).unwrap()).unwrap();
        assert!(crate::testutil::max_abs_diff(&fused, &composed) < 1e-5);
        // A strided residual is read as its values.
        let rt = t(&[48, 37]);
        let fused = dense_bias_add(&x, &w, &b, &rt.t().unwrap()).unwrap();
        let composed = (rt.t().unwrap() + dense_bias(&x, &w, &b).unwrap()).unwrap();
        assert!(crate::testutil::max_abs_diff(&fused, &composed) < 1e-5);
        // Tracked, it is the composed (differentiable) form.
        let (xv, wv, bv, rv) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&w).unwrap(),
            Var::from_tensor(&b).unwrap(),
            Var::from_tensor(&r).unwrap(),
        );
        let mix = t(&[37, 48]);
        let ours = dense_bias_add(
            xv.as_tensor(),
            wv.as_tensor(),
            bv.as_tensor(),
            rv.as_tensor(),
        )
        .unwrap();
        let theirs = (rv.as_tensor()
            + xv.as_tensor()
                .matmul(&wv.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_add(bv.as_tensor())
                .unwrap())
        .unwrap();
        assert_same(ours, theirs, &mix, &[&xv, &wv, &bv, &rv], 1e-5);
    }

    #[test]
    fn gelu_dense_and_its_gradients_equal_the_composed_ops() {
        let dev = Device::Cpu;
        let var = |shape: &[usize], s: f64| {
            Var::from_tensor(&(Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * s).unwrap())
                .unwrap()
        };
        let (x, w, b) = (var(&[9, 6], 3.0), var(&[4, 6], 1.0), var(&[4], 1.0));
        let mix = Tensor::randn(0f32, 1.0, (9, 4), &dev).unwrap();
        let ours = quick_gelu_dense_bias(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
        let xs = x.as_tensor();
        let a = (xs * candle_nn::ops::sigmoid(&(xs * 1.702).unwrap()).unwrap()).unwrap();
        let theirs = a
            .matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        assert_same(ours, theirs, &mix, &[&x, &w, &b], 1e-4);
    }

    #[test]
    fn quick_gelu_and_its_gradient_equal_the_composed_ops() {
        let dev = Device::Cpu;
        // Larger than one parallel chunk, with a tail.
        let x = Var::from_tensor(&(Tensor::randn(0f32, 1.0, 40_000, &dev).unwrap() * 4.0).unwrap())
            .unwrap();
        let mix = Tensor::randn(0f32, 1.0, 40_000, &dev).unwrap();
        let ours = quick_gelu(x.as_tensor()).unwrap();
        let xs = x.as_tensor();
        let theirs = (xs * candle_nn::ops::sigmoid(&(xs * 1.702).unwrap()).unwrap()).unwrap();
        assert_same(ours, theirs, &mix, &[&x], 1e-4);
    }

    #[test]
    fn layer_norm_and_softmax_with_gradients_equal_the_composed_ops() {
        let dev = Device::Cpu;
        let var = |shape: &[usize], s: f64| {
            Var::from_tensor(&(Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * s).unwrap())
                .unwrap()
        };
        let (x, w, b) = (var(&[3, 4, 9], 3.0), var(&[9], 1.0), var(&[9], 1.0));
        let mix = Tensor::randn(0f32, 1.0, (3, 4, 9), &dev).unwrap();
        let ours = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5)
            .unwrap()
            .unwrap();
        let xs = x.as_tensor();
        let xc = xs.broadcast_sub(&xs.mean_keepdim(2).unwrap()).unwrap();
        let var_ = xc.sqr().unwrap().mean_keepdim(2).unwrap();
        let theirs = xc
            .broadcast_div(&(var_ + 1e-5).unwrap().sqrt().unwrap())
            .unwrap()
            .broadcast_mul(w.as_tensor())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        assert_same(ours, theirs, &mix, &[&x, &w, &b], 1e-4);

        let s = var(&[5, 3, 7], 4.0);
        let mix = Tensor::randn(0f32, 1.0, (5, 3, 7), &dev).unwrap();
        let ours = softmax_last_dim(s.as_tensor()).unwrap().unwrap();
        let e = s
            .as_tensor()
            .broadcast_sub(&s.as_tensor().max_keepdim(2).unwrap())
            .unwrap()
            .exp()
            .unwrap();
        let theirs = e.broadcast_div(&e.sum_keepdim(2).unwrap()).unwrap();
        assert_same(ours, theirs, &mix, &[&s], 1e-5);
    }

    #[test]
    fn fused_bf16_blocks_equal_their_steps() {
        use super::super::gemm_bf16::PackedWeight;
        let dev = Device::Cpu;
        let (m, h, hidden) = (30, 64, 96);
        let randn =
            |shape: &[usize], s: f64| (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * s).unwrap();
        let pack = |n: usize, k: usize| {
            let (w, b) = (randn(&[n, k], 0.2), randn(&[n], 0.2));
            PackedView::new(PackedWeight::new(
                &w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                n,
                k,
                Some(&b.to_vec1::<f32>().unwrap()),
            ))
        };
        let (x, lw, lb) = (randn(&[m, h], 3.0), randn(&[h], 1.0), randn(&[h], 1.0));
        let (qkv, fc1, fc2) = (pack(3 * h, h), pack(hidden, h), pack(h, hidden));
        let ln = (&lw, &lb, 1e-5);
        let normed = layer_norm(&x, &lw, &lb, 1e-5).unwrap().unwrap();

        let fused = ln_dense_bf16(&x, ln, &qkv).unwrap();
        let steps = dense_bf16(&normed, &qkv, false).unwrap();
        assert_eq!(max_diff(&fused, &steps), 0.0, "LN → QKV");

        let fused = mlp_bf16(&x, ln, &fc1, &fc2).unwrap();
        let steps = dense_bf16_add(&dense_bf16(&normed, &fc1, true).unwrap(), &fc2, &x).unwrap();
        assert_eq!(max_diff(&fused, &steps), 0.0, "LN → MLP + residual");
        // And not trivially: the block changes its input.
        assert!(max_diff(&fused, &x) > 1e-3);
    }
}

//! clipft's own CUDA kernels (`cuda_kernels.cu`, compiled to PTX by build.rs with the `cuda`
//! feature): for inference, the dense layers' epilogue (bias, activation and residual in one
//! pass over the GEMM's output) and the attention core read straight from the projections'
//! output rows. candle runs each of those as several full passes over the activations
//! (broadcast add, one to three activation kernels, residual add; head-split copy, two batched
//! GEMMs, softmax, head-merge copy), which on a GPU cost as much as the GEMMs. For training, a
//! layer norm and QuickGELU with their own backward passes (candle has no backward pass for its
//! layer norm, so the trained tower composed a dozen passes each way, and composes QuickGELU from
//! three forward and five backward).
//!
//! The kernels are checked on the CPU by `scripts/check_cuda_kernels.sh` (an emulation of the
//! CUDA features they use, against double-precision references), but this code has not yet run
//! on a GPU, so it is off unless `CLIPFT_CUDA_KERNELS=1`; `scripts/bench_gpu.sh` measures and
//! checks both paths. Tracked (trained) tensors take candle's differentiable ops, except in
//! [`layer_norm`] and [`quick_gelu`], whose ops have their backward passes.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{DType, Result, Tensor};

use super::config::Activation;

/// The activation applied by the dense-layer epilogue (codes as in `cuda_kernels.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None = 0,
    QuickGelu = 1,
    Silu = 2,
    GeluErf = 3,
    GeluTanh = 4,
}

impl From<Activation> for Act {
    fn from(a: Activation) -> Self {
        match a {
            Activation::QuickGelu => Act::QuickGelu,
            Activation::Gelu => Act::GeluErf,
            Activation::GeluNew => Act::GeluTanh,
        }
    }
}

const UNSET: u8 = 0;
const OFF: u8 = 1;
const ON: u8 = 2;
static STATE: AtomicU8 = AtomicU8::new(UNSET);

/// Whether the kernels are switched on: [`set_enabled`], else `CLIPFT_CUDA_KERNELS=1`.
pub fn enabled() -> bool {
    match STATE.load(Ordering::Relaxed) {
        UNSET => {
            let on = std::env::var("CLIPFT_CUDA_KERNELS").is_ok_and(|v| v == "1");
            STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
            on
        }
        s => s == ON,
    }
}

/// Switches the kernels on or off for the forward passes that follow (tests and benchmarks
/// compare both paths in one process).
pub fn set_enabled(on: bool) {
    STATE.store(if on { ON } else { OFF }, Ordering::Relaxed);
}

/// Whether the kernels take these tensors: a CUDA build with the kernels on, CUDA tensors of one
/// float dtype, nothing tracked.
pub fn applies<'a>(ts: impl IntoIterator<Item = &'a Tensor>) -> bool {
    fits(ts, false)
}

/// [`applies`], tracked tensors allowed with `tracked_ok` (for ops with a backward pass).
fn fits<'a>(ts: impl IntoIterator<Item = &'a Tensor>, tracked_ok: bool) -> bool {
    if !cfg!(feature = "cuda") || !enabled() {
        return false;
    }
    let mut dtype = None;
    ts.into_iter().all(|t| {
        let same = *dtype.get_or_insert(t.dtype()) == t.dtype();
        same && t.device().is_cuda() && (tracked_ok || !t.track_op())
    }) && matches!(dtype, Some(DType::F32 | DType::F16 | DType::BF16))
}

/// Layer norm over the last dimension with a backward pass of its own (statistics in f32,
/// recomputed backward), for the trained tower on CUDA, where the alternative is a dozen
/// composed passes each way; `None` where it does not apply (as [`applies`], tracked tensors
/// included; rows up to 4,096 wide).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Option<Result<Tensor>> {
    let h = w.elem_count();
    if !fits([x, w, b], true) || h == 0 || h > LN_MAX_WIDTH || x.dims().last() != Some(&h) {
        return None;
    }
    #[cfg(feature = "cuda")]
    {
        Some(imp::layer_norm(x, w, b, eps))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = eps;
        None
    }
}

/// QuickGELU `x·σ(1.702·x)` with a backward pass of its own, one kernel each way, for the
/// trained tower on CUDA (candle composes three passes forward and five backward); `None` where
/// it does not apply (as [`applies`], tracked tensors included).
pub fn quick_gelu(x: &Tensor) -> Option<Result<Tensor>> {
    if !fits([x], true) {
        return None;
    }
    #[cfg(feature = "cuda")]
    {
        Some(x.contiguous().and_then(|x| x.apply_op1(imp::QuickGelu)))
    }
    #[cfg(not(feature = "cuda"))]
    {
        None
    }
}

/// Widest row the layer-norm kernels take: 1,024 threads of `LN_COLS` (4) columns.
const LN_MAX_WIDTH: usize = 4096;

/// `act(x·Wᵀ + b) (+ residual)` for `x` `[M, K]`, `w` `[N, K]`, `b` `[N]`, `residual` `[M, N]`:
/// candle's GEMM, then one pass for the rest. Callers check [`applies`] first.
pub fn dense(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    residual: Option<&Tensor>,
    act: Act,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        imp::dense(x, w, b, residual, act)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w, b, residual, act);
        candle_core::bail!("clipft was built without the `cuda` feature")
    }
}

/// One sequence of an [`attention`] call: its keys and values are rows `[kv_start, kv_start +
/// kv_len)`, its queries rows `[item_start, item_start + items)` of the query (and output)
/// tensor, the first of them at position `pos0` of the sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seq {
    pub kv_start: u32,
    pub kv_len: u32,
    pub item_start: u32,
    pub items: u32,
    pub pos0: u32,
}

/// The sequences of a batch, uploaded once per forward pass (an upload from host memory waits
/// for the GPU's queued work, so not once per layer).
#[derive(Debug, Clone)]
pub struct SeqTable {
    /// `[B, 5]` u32, the fields of [`Seq`] in order.
    table: Tensor,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    max_items: usize,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    items: usize,
}

impl SeqTable {
    /// The `[B, 5]` table as uploaded.
    #[cfg(test)]
    pub(crate) fn table(&self) -> &Tensor {
        &self.table
    }

    pub fn new(seqs: &[Seq], device: &candle_core::Device) -> Result<Self> {
        let flat: Vec<u32> = seqs
            .iter()
            .flat_map(|s| [s.kv_start, s.kv_len, s.item_start, s.items, s.pos0])
            .collect();
        Ok(Self {
            table: Tensor::from_vec(flat, (seqs.len(), 5), device)?,
            max_items: seqs.iter().map(|s| s.items as usize).max().unwrap_or(0),
            items: seqs.iter().map(|s| s.items as usize).sum(),
        })
    }
}

/// Multi-head attention `[items, heads·head_dim]` over the sequences of `seqs`: head `h` of an
/// item's query at columns `h·head_dim..` of its row of `q` (queries pre-scaled), its keys and
/// values at columns `k_off + h·head_dim..` and `v_off + h·head_dim..` of `kv`'s rows; `causal`
/// limits each query to the keys up to its own position. `None` where the kernel does not
/// apply (see [`applies`]; head sizes up to 128).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &Tensor,
    kv: &Tensor,
    k_off: usize,
    v_off: usize,
    seqs: &SeqTable,
    heads: usize,
    head_dim: usize,
    causal: bool,
) -> Option<Result<Tensor>> {
    if !applies([q, kv]) || head_dim == 0 || head_dim > 128 || seqs.table.dim(0).ok()? > 65_535 {
        return None;
    }
    #[cfg(feature = "cuda")]
    {
        Some(imp::attention(
            q, kv, k_off, v_off, seqs, heads, head_dim, causal,
        ))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (k_off, v_off, heads, causal);
        None
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{
        bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, InplaceOp2,
        InplaceOp3, Layout, Result, Shape, Tensor,
    };
    use half::{bf16, f16};

    use super::{Act, SeqTable};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cuda_kernels.ptx"));
    const MODULE: &str = "clipft_kernels";

    /// `S::F32($launch)` etc. for operands whose storages are all of that float dtype, with
    /// `$v` bound to each one's slice: each arm instantiates the generic launch for its
    /// element type; other dtypes or a mix fail with `$msg`.
    macro_rules! same_float {
        ($msg:literal, ($($s:expr),+), |$($v:ident),+| $launch:expr) => {
            // (Tuples even of one operand: the trailing commas.)
            match ($(&$s.slice,)+) {
                ($(S::F32($v),)+) => S::F32($launch),
                ($(S::F16($v),)+) => S::F16($launch),
                ($(S::BF16($v),)+) => S::BF16($launch),
                _ => bail!($msg),
            }
        };
    }

    /// The view of a contiguous operand from its layout's start.
    fn view<'a, T>(s: &'a CudaSlice<T>, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
        if !l.is_contiguous() {
            bail!("clipft CUDA kernel: {what} must be contiguous")
        }
        Ok(s.slice(l.start_offset()..))
    }

    /// The element types the kernels come in, by their names' suffix.
    trait Elem: DeviceRepr {
        const SUFFIX: &'static str;
    }
    impl Elem for f32 {
        const SUFFIX: &'static str = "f32";
    }
    impl Elem for f16 {
        const SUFFIX: &'static str = "f16";
    }
    impl Elem for bf16 {
        const SUFFIX: &'static str = "bf16";
    }

    pub(super) fn dense(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        residual: Option<&Tensor>,
        act: Act,
    ) -> Result<Tensor> {
        // A fresh contiguous [M, N] output that nothing else holds: finished in place.
        let y = x.matmul(&w.t()?)?;
        let op = BiasAct { act };
        let b = b.contiguous()?;
        match residual {
            Some(r) => y.inplace_op3(&b, &r.contiguous()?, &op)?,
            None => y.inplace_op2(&b, &op)?,
        }
        Ok(y)
    }

    struct BiasAct {
        act: Act,
    }

    impl BiasAct {
        fn launch<T: Elem>(
            &self,
            dev: &CudaDevice,
            y: &mut CudaSlice<T>,
            yl: &Layout,
            b: &CudaSlice<T>,
            bl: &Layout,
            r: Option<(&CudaSlice<T>, &Layout)>,
        ) -> Result<()> {
            let (rows, cols) = yl.shape().dims2()?;
            if bl.shape().elem_count() != cols
                || r.is_some_and(|(_, rl)| rl.shape().dims() != yl.shape().dims())
                || !yl.is_contiguous()
            {
                bail!("clipft bias_act: operand shapes or layout do not fit")
            }
            let func =
                dev.get_or_load_custom_func(&format!("bias_act_{}", T::SUFFIX), MODULE, PTX)?;
            let b = view(b, bl, "bias")?;
            let r = r.map(|(r, rl)| view(r, rl, "residual")).transpose()?;
            let mut y = y.slice_mut(yl.start_offset()..);
            let null: u64 = 0;
            let (rows_u, cols_u, act) = (rows as u32, cols as u32, self.act as u32);
            // A block per row (blocks stride over rows beyond the cap), threads over columns.
            let blocks = rows.clamp(1, 1 << 20) as u32;
            let cfg = LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut builder = func.builder();
            builder.arg(&mut y);
            builder.arg(&b);
            match &r {
                Some(r) => builder.arg(r),
                None => builder.arg(&null),
            };
            builder.arg(&rows_u);
            builder.arg(&cols_u);
            builder.arg(&act);
            // SAFETY: the arguments match the kernel's signature; sizes checked above.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(())
        }

        fn run(
            &self,
            y: &mut CudaStorage,
            yl: &Layout,
            b: &CudaStorage,
            bl: &Layout,
            r: Option<(&CudaStorage, &Layout)>,
        ) -> Result<()> {
            let dev = y.device.clone();
            match (&mut y.slice, &b.slice, r.map(|(r, l)| (&r.slice, l))) {
                (S::F32(y), S::F32(b), None) => self.launch(&dev, y, yl, b, bl, None),
                (S::F32(y), S::F32(b), Some((S::F32(r), rl))) => {
                    self.launch(&dev, y, yl, b, bl, Some((r, rl)))
                }
                (S::F16(y), S::F16(b), None) => self.launch(&dev, y, yl, b, bl, None),
                (S::F16(y), S::F16(b), Some((S::F16(r), rl))) => {
                    self.launch(&dev, y, yl, b, bl, Some((r, rl)))
                }
                (S::BF16(y), S::BF16(b), None) => self.launch(&dev, y, yl, b, bl, None),
                (S::BF16(y), S::BF16(b), Some((S::BF16(r), rl))) => {
                    self.launch(&dev, y, yl, b, bl, Some((r, rl)))
                }
                _ => bail!("clipft bias_act: f32, f16 or bf16 operands of one dtype"),
            }
        }
    }

    impl InplaceOp2 for BiasAct {
        fn name(&self) -> &'static str {
            "clipft-bias-act"
        }

        fn cpu_fwd(
            &self,
            _: &mut CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<()> {
            bail!("clipft-bias-act runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            y: &mut CudaStorage,
            yl: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> Result<()> {
            self.run(y, yl, b, bl, None)
        }
    }

    impl InplaceOp3 for BiasAct {
        fn name(&self) -> &'static str {
            "clipft-bias-act-residual"
        }

        fn cpu_fwd(
            &self,
            _: &mut CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<()> {
            bail!("clipft-bias-act-residual runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            y: &mut CudaStorage,
            yl: &Layout,
            b: &CudaStorage,
            bl: &Layout,
            r: &CudaStorage,
            rl: &Layout,
        ) -> Result<()> {
            self.run(y, yl, b, bl, Some((r, rl)))
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention(
        q: &Tensor,
        kv: &Tensor,
        k_off: usize,
        v_off: usize,
        seqs: &SeqTable,
        heads: usize,
        head_dim: usize,
        causal: bool,
    ) -> Result<Tensor> {
        let (q, kv) = (q.contiguous()?, kv.contiguous()?);
        let h = heads * head_dim;
        let (q_rows, q_cols) = q.dims2()?;
        let kv_cols = kv.dim(1)?;
        if q_rows < seqs.items || q_cols < h || k_off + h > kv_cols || v_off + h > kv_cols {
            bail!(
                "clipft attention: query/key/value columns do not fit {heads} heads of {head_dim}"
            )
        }
        q.apply_op3_no_bwd(
            &kv,
            &seqs.table,
            &Attention {
                k_off,
                v_off,
                heads,
                head_dim,
                causal,
                items: seqs.items,
                max_items: seqs.max_items,
            },
        )
    }

    struct Attention {
        k_off: usize,
        v_off: usize,
        heads: usize,
        head_dim: usize,
        causal: bool,
        items: usize,
        max_items: usize,
    }

    impl Attention {
        #[allow(clippy::too_many_arguments)]
        fn launch<T: Elem>(
            &self,
            dev: &CudaDevice,
            q: &CudaSlice<T>,
            ql: &Layout,
            kv: &CudaSlice<T>,
            kvl: &Layout,
            table: &CudaSlice<u32>,
            tl: &Layout,
        ) -> Result<CudaSlice<T>> {
            let r = self.head_dim.div_ceil(32);
            let func =
                dev.get_or_load_custom_func(&format!("attention_{}_r{r}", T::SUFFIX), MODULE, PTX)?;
            let h = self.heads * self.head_dim;
            let n_seqs = tl.shape().dims2()?.0;
            let (q_stride, kv_stride) = (ql.dims()[1] as u32, kvl.dims()[1] as u32);
            let (q, kv, table) = (
                view(q, ql, "q")?,
                view(kv, kvl, "kv")?,
                view(table, tl, "seqs")?,
            );
            // SAFETY: every row of the output is written by the kernel (each item, each head).
            let out = unsafe { dev.alloc::<T>(self.items * h)? };
            let warps = self.max_items.clamp(1, 8) as u32;
            let cfg = LaunchConfig {
                grid_dim: (
                    (self.max_items.max(1) as u32).div_ceil(warps),
                    self.heads as u32,
                    n_seqs as u32,
                ),
                block_dim: (32 * warps, 1, 1),
                shared_mem_bytes: 0,
            };
            let (k_off, v_off, out_stride) = (self.k_off as u32, self.v_off as u32, h as u32);
            let (head_dim, causal) = (self.head_dim as u32, self.causal as u32);
            let mut builder = func.builder();
            builder.arg(&q);
            builder.arg(&q_stride);
            builder.arg(&kv);
            builder.arg(&kv_stride);
            builder.arg(&k_off);
            builder.arg(&v_off);
            builder.arg(&out);
            builder.arg(&out_stride);
            builder.arg(&table);
            builder.arg(&head_dim);
            builder.arg(&causal);
            // SAFETY: the arguments match the kernel's signature; the table's rows lie within
            // q, kv and out (built by the caller from the same rows).
            unsafe { builder.launch(cfg) }.w()?;
            Ok(out)
        }
    }

    impl CustomOp3 for Attention {
        fn name(&self) -> &'static str {
            "clipft-attention"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("clipft-attention runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            ql: &Layout,
            kv: &CudaStorage,
            kvl: &Layout,
            table: &CudaStorage,
            tl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = q.device.clone();
            let S::U32(table) = &table.slice else {
                bail!("clipft attention: the sequence table must be u32")
            };
            let slice = same_float!(
                "clipft attention: f32, f16 or bf16 operands of one dtype",
                (q, kv),
                |q, kv| self.launch(&dev, q, ql, kv, kvl, table, tl)?
            );
            let shape = Shape::from((self.items, self.heads * self.head_dim));
            Ok((CudaStorage { slice, device: dev }, shape))
        }
    }

    pub(super) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            LayerNorm { eps: eps as f32 },
        )
    }

    /// Columns per thread of `layer_norm_grad` (`LN_COLS` in cuda_kernels.cu).
    const LN_COLS: usize = 4;

    /// Threads per block for rows of `h`: at most `LN_COLS` columns each.
    fn ln_threads(h: usize) -> u32 {
        (h.div_ceil(LN_COLS).next_multiple_of(32)).clamp(128, 1024) as u32
    }

    /// Rows and width of a layer norm's `[.., h]` input, checked against its `[h]` parameters.
    fn ln_rows(xl: &Layout, pl: &Layout, what: &str) -> Result<(usize, usize)> {
        let h = pl.shape().elem_count();
        if h == 0 || h > super::LN_MAX_WIDTH || xl.dims().last() != Some(&h) {
            bail!(
                "clipft {what}: rows of {:?} do not fit parameters of {h}",
                xl.dims()
            )
        }
        Ok((xl.shape().elem_count() / h, h))
    }

    /// Layer norm, `(x − μ)/√(σ² + ε)·w + b` over the last dimension.
    struct LayerNorm {
        eps: f32,
    }

    impl LayerNorm {
        #[allow(clippy::too_many_arguments)]
        fn launch<T: Elem>(
            &self,
            dev: &CudaDevice,
            x: &CudaSlice<T>,
            xl: &Layout,
            w: &CudaSlice<T>,
            wl: &Layout,
            b: &CudaSlice<T>,
            bl: &Layout,
        ) -> Result<CudaSlice<T>> {
            let (rows, h) = ln_rows(xl, wl, "layer_norm")?;
            if bl.shape().elem_count() != h {
                bail!("clipft layer_norm: bias of {:?} for rows of {h}", bl.dims())
            }
            let func =
                dev.get_or_load_custom_func(&format!("layer_norm_{}", T::SUFFIX), MODULE, PTX)?;
            let (x, w, b) = (
                view(x, xl, "x")?,
                view(w, wl, "weight")?,
                view(b, bl, "bias")?,
            );
            // SAFETY: every row is written by the kernel.
            let y = unsafe { dev.alloc::<T>(rows * h)? };
            let cfg = LaunchConfig {
                grid_dim: (rows.clamp(1, 1 << 20) as u32, 1, 1),
                block_dim: (ln_threads(h), 1, 1),
                shared_mem_bytes: 0,
            };
            let (rows_u, h_u) = (rows as u32, h as u32);
            let mut builder = func.builder();
            builder.arg(&x);
            builder.arg(&w);
            builder.arg(&b);
            builder.arg(&y);
            builder.arg(&rows_u);
            builder.arg(&h_u);
            builder.arg(&self.eps);
            // SAFETY: the arguments match the kernel's signature; sizes checked above.
            unsafe { builder.launch(cfg) }.w()?;
            Ok(y)
        }
    }

    impl CustomOp3 for LayerNorm {
        fn name(&self) -> &'static str {
            "clipft-layer-norm"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("clipft-layer-norm runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
            b: &CudaStorage,
            bl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = x.device.clone();
            let slice = same_float!(
                "clipft layer_norm: f32, f16 or bf16 operands of one dtype",
                (x, w, b),
                |x, w, b| self.launch(&dev, x, xl, w, wl, b, bl)?
            );
            Ok((CudaStorage { slice, device: dev }, xl.shape().clone()))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            _b: &Tensor,
            _res: &Tensor,
            g: &Tensor,
        ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            // One op gives the rows of dx, then dw and db.
            let h = w.elem_count();
            let rows = x.elem_count() / h;
            let all = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormGrad { eps: self.eps })?;
            Ok((
                Some(all.narrow(0, 0, rows)?.reshape(x.shape())?),
                Some(all.get(rows)?),
                Some(all.get(rows + 1)?),
            ))
        }
    }

    /// Layer norm's backward pass for `(x, w, g)`: `[rows + 2, h]`, the rows of dx, then dw and
    /// db (per-block partial sums in f32, summed over blocks by a second kernel).
    struct LayerNormGrad {
        eps: f32,
    }

    /// Blocks of the backward pass: each sums its rows' weight and bias gradients, so fewer
    /// blocks than rows keep the partial sums (blocks × 2h floats) small.
    const LN_GRAD_BLOCKS: usize = 512;

    impl LayerNormGrad {
        #[allow(clippy::too_many_arguments)]
        fn launch<T: Elem>(
            &self,
            dev: &CudaDevice,
            x: &CudaSlice<T>,
            xl: &Layout,
            w: &CudaSlice<T>,
            wl: &Layout,
            g: &CudaSlice<T>,
            gl: &Layout,
        ) -> Result<CudaSlice<T>> {
            let (rows, h) = ln_rows(xl, wl, "layer_norm_grad")?;
            if gl.shape().elem_count() != rows * h {
                bail!(
                    "clipft layer_norm_grad: gradient of {:?} for {:?}",
                    gl.dims(),
                    xl.dims()
                )
            }
            let grad = dev.get_or_load_custom_func(
                &format!("layer_norm_grad_{}", T::SUFFIX),
                MODULE,
                PTX,
            )?;
            let sums =
                dev.get_or_load_custom_func(&format!("column_sums_{}", T::SUFFIX), MODULE, PTX)?;
            let (x, w, g) = (
                view(x, xl, "x")?,
                view(w, wl, "weight")?,
                view(g, gl, "gradient")?,
            );
            let blocks = rows.clamp(1, LN_GRAD_BLOCKS);
            // SAFETY: the first kernel writes every row of dx and every block's partial sums,
            // the second the last two rows from them.
            let mut out = unsafe { dev.alloc::<T>((rows + 2) * h)? };
            let partial = unsafe { dev.alloc::<f32>(blocks * 2 * h)? };
            let (rows_u, h_u, blocks_u, n_u) = (rows as u32, h as u32, blocks as u32, 2 * h as u32);
            {
                let mut dx = out.slice_mut(..rows * h);
                let cfg = LaunchConfig {
                    grid_dim: (blocks_u, 1, 1),
                    block_dim: (ln_threads(h), 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut builder = grad.builder();
                builder.arg(&x);
                builder.arg(&w);
                builder.arg(&g);
                builder.arg(&mut dx);
                builder.arg(&partial);
                builder.arg(&rows_u);
                builder.arg(&h_u);
                builder.arg(&self.eps);
                // SAFETY: the arguments match the kernel's signature; sizes checked above.
                unsafe { builder.launch(cfg) }.w()?;
            }
            {
                let mut params = out.slice_mut(rows * h..);
                let cfg = LaunchConfig {
                    grid_dim: ((2 * h).div_ceil(256) as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                let mut builder = sums.builder();
                builder.arg(&partial);
                builder.arg(&blocks_u);
                builder.arg(&n_u);
                builder.arg(&mut params);
                // SAFETY: as above; `params` holds the 2h values summed.
                unsafe { builder.launch(cfg) }.w()?;
            }
            Ok(out)
        }
    }

    impl CustomOp3 for LayerNormGrad {
        fn name(&self) -> &'static str {
            "clipft-layer-norm-grad"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("clipft-layer-norm-grad runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            w: &CudaStorage,
            wl: &Layout,
            g: &CudaStorage,
            gl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = x.device.clone();
            let (rows, h) = ln_rows(xl, wl, "layer_norm_grad")?;
            let slice = same_float!(
                "clipft layer_norm_grad: f32, f16 or bf16 operands of one dtype",
                (x, w, g),
                |x, w, g| self.launch(&dev, x, xl, w, wl, g, gl)?
            );
            Ok((
                CudaStorage { slice, device: dev },
                Shape::from((rows + 2, h)),
            ))
        }
    }

    /// Launch shape of an elementwise kernel over `n` elements (grid-stride loops).
    fn elementwise(n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(super) struct QuickGelu;

    impl QuickGelu {
        fn launch<T: Elem>(
            dev: &CudaDevice,
            x: &CudaSlice<T>,
            xl: &Layout,
        ) -> Result<CudaSlice<T>> {
            let n = xl.shape().elem_count();
            let func =
                dev.get_or_load_custom_func(&format!("quick_gelu_{}", T::SUFFIX), MODULE, PTX)?;
            let x = view(x, xl, "x")?;
            // SAFETY: every element is written by the kernel.
            let y = unsafe { dev.alloc::<T>(n)? };
            let n_u = n as u64;
            let mut builder = func.builder();
            builder.arg(&x);
            builder.arg(&y);
            builder.arg(&n_u);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { builder.launch(elementwise(n)) }.w()?;
            Ok(y)
        }
    }

    impl CustomOp1 for QuickGelu {
        fn name(&self) -> &'static str {
            "clipft-quick-gelu"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("clipft-quick-gelu runs on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
            let dev = x.device.clone();
            let slice = same_float!("clipft quick_gelu: f32, f16 or bf16 input", (x), |x| {
                Self::launch(&dev, x, xl)?
            });
            Ok((CudaStorage { slice, device: dev }, xl.shape().clone()))
        }

        fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
            Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &QuickGeluGrad)?))
        }
    }

    /// `g·σ(ax)·(1 + a·x·(1 − σ(ax)))` for `(x, g)`.
    struct QuickGeluGrad;

    impl QuickGeluGrad {
        fn launch<T: Elem>(
            dev: &CudaDevice,
            x: &CudaSlice<T>,
            xl: &Layout,
            g: &CudaSlice<T>,
            gl: &Layout,
        ) -> Result<CudaSlice<T>> {
            let n = xl.shape().elem_count();
            if gl.shape().elem_count() != n {
                bail!(
                    "clipft quick_gelu_grad: gradient of {:?} for {:?}",
                    gl.dims(),
                    xl.dims()
                )
            }
            let func = dev.get_or_load_custom_func(
                &format!("quick_gelu_grad_{}", T::SUFFIX),
                MODULE,
                PTX,
            )?;
            let (x, g) = (view(x, xl, "x")?, view(g, gl, "gradient")?);
            // SAFETY: every element is written by the kernel.
            let dx = unsafe { dev.alloc::<T>(n)? };
            let n_u = n as u64;
            let mut builder = func.builder();
            builder.arg(&x);
            builder.arg(&g);
            builder.arg(&dx);
            builder.arg(&n_u);
            // SAFETY: the arguments match the kernel's signature; sizes checked above.
            unsafe { builder.launch(elementwise(n)) }.w()?;
            Ok(dx)
        }
    }

    impl CustomOp2 for QuickGeluGrad {
        fn name(&self) -> &'static str {
            "clipft-quick-gelu-grad"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("clipft-quick-gelu-grad runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            x: &CudaStorage,
            xl: &Layout,
            g: &CudaStorage,
            gl: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dev = x.device.clone();
            let slice = same_float!(
                "clipft quick_gelu_grad: f32, f16 or bf16 operands of one dtype",
                (x, g),
                |x, g| Self::launch(&dev, x, xl, g, gl)?
            );
            Ok((CudaStorage { slice, device: dev }, xl.shape().clone()))
        }
    }
}

//! Dense layers with bf16 products on the CPU: `y = x·Wᵀ + b` for f32 `x` and `y`, with `W`
//! stored in bf16 and `x` rounded to bf16 (to nearest, ties to even) as it is packed, products
//! summed in f32. That is what PyTorch's bf16 autocast does inside a linear layer, here with f32
//! activations kept between layers (layer norm, softmax, residuals).
//!
//! candle 0.11 has no bf16 matmul on the CPU. CPUs with AVX512-BF16 (AMD Zen 4 and later, Intel
//! Cooper Lake and Sapphire Rapids and later) multiply bf16 pairs with `vdpbf16ps`; the
//! micro-kernel below is built on that instruction where it does twice the flops of f32 FMAs
//! (AMD), and on f32 FMAs of the same bf16 values where it does half (Intel's cores; their AMX
//! tiles are far faster than either). A portable kernel with the same layout and rounding runs
//! elsewhere (correct, but no faster than f32, so the loader only offers bf16 where the
//! instruction exists) and is the reference the fast ones are tested against. CPUs with AMX
//! (Intel Sapphire Rapids and later) multiply the same packed operands as whole tiles
//! ([`amx`]).

use std::mem::MaybeUninit;
use std::sync::{Arc, OnceLock};

use half::bf16;
use rayon::prelude::*;

/// Output columns per panel: two 16-lane f32 registers.
const NR: usize = 32;
/// Rows per micro-tile: 12 × 2 accumulators leave registers for two weight vectors and a
/// broadcast input pair.
const MR: usize = 12;
/// k pairs per cache block: a panel's block is then 16 KiB and stays in L1 across all row tiles.
const KC: usize = 128;

mod amx;

use amx::TileUnit;

/// Whether this CPU has the bf16 dot-product instruction.
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which kernel the dense layers run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Plain Rust, any CPU: the reference the others are tested against.
    Portable,
    /// `vdpbf16ps` micro-tiles (AVX512-BF16).
    Avx512Bf16,
    /// The same micro-tiles on f32 FMAs of the bf16 values: Intel's cores without AMX, where
    /// `vdpbf16ps` does half the FMAs' flops per cycle.
    Avx512Fma,
    /// AMX tiles, for layers whose k pairs fill whole tile rows (k of 32·j or 32·j − 1: every
    /// CLIP layer); others run on AVX512-BF16.
    Amx,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx512Bf16 => "AVX512-BF16",
            Kernel::Avx512Fma => "AVX-512 FMA on bf16 values",
            Kernel::Amx => "AMX",
        }
    }
}

/// The fastest kernel this CPU runs correctly, chosen once per process. AMX is used only after
/// its products have matched the portable kernel's here (its instructions cannot be tested on
/// CPUs without it); `CLIPFT_NO_AMX=1` keeps it off, to compare the two.
pub fn kernel() -> Kernel {
    static KERNEL: OnceLock<Kernel> = OnceLock::new();
    *KERNEL.get_or_init(|| {
        if !native() {
            Kernel::Portable
        } else if std::env::var_os("CLIPFT_NO_AMX").is_some_and(|v| v != "0") || !amx::available() {
            vector_kernel()
        } else if tiles_match_portable::<amx::Amx>() {
            Kernel::Amx
        } else {
            let k = vector_kernel();
            crate::say!(
                "warning: this CPU's AMX products did not match the reference; bf16 layers use \
                 {} instead",
                k.name()
            );
            k
        }
    })
}

/// The register micro-tiles' kernel on a CPU with AVX512-BF16: `vdpbf16ps` where it is the
/// faster (AMD), FMAs on Intel's cores, where `vdpbf16ps` issues once every two cycles (1.3
/// against 5.3 billion FMAs a second on one core of a Xeon with AVX512-BF16, 2026-11-29), so it
/// does half the flops of two FMA units. `CLIPFT_BF16_KERNEL=dpbf16|fma|auto` chooses, to
/// compare.
fn vector_kernel() -> Kernel {
    let auto = if intel() {
        Kernel::Avx512Fma
    } else {
        Kernel::Avx512Bf16
    };
    match std::env::var("CLIPFT_BF16_KERNEL") {
        Err(std::env::VarError::NotPresent) => auto,
        Ok(v) => match v.to_ascii_lowercase().trim() {
            "dpbf16" => Kernel::Avx512Bf16,
            "fma" => Kernel::Avx512Fma,
            "" | "auto" => auto,
            _ => {
                crate::say!(
                    "warning: CLIPFT_BF16_KERNEL={v:?} is not `dpbf16`, `fma` or `auto`; \
                     using {}",
                    auto.name()
                );
                auto
            }
        },
        Err(_) => {
            crate::say!(
                "warning: CLIPFT_BF16_KERNEL is not UTF-8; using {}",
                auto.name()
            );
            auto
        }
    }
}

/// Whether the CPU is Intel's (its CPUID vendor string).
fn intel() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let id = std::arch::x86_64::__cpuid(0);
        [id.ebx, id.edx, id.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .eq(*b"GenuineIntel")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A layer with a partial row block, two panels (one partial) and several tile steps, on the
/// tile unit against the portable kernel.
fn tiles_match_portable<T: TileUnit>() -> bool {
    let (m, n, k) = (45, 40, 96);
    // Small exact-in-bf16 values, so both kernels' sums are exact and must agree bit for bit.
    let value = |i: usize| ((i * 7919 + 13) % 17) as f32 / 8.0 - 1.0;
    let x: Vec<f32> = (0..m * k).map(value).collect();
    let w: Vec<f32> = (0..n * k).map(|i| value(i + 5)).collect();
    let b: Vec<f32> = (0..n).map(|i| value(i + 3)).collect();
    let packed = PackedView::new(PackedWeight::new(&w, n, k, Some(&b)));
    let x = Pairs::new(&x, m, k);
    run_on::<T>(&x, &packed, Epilogue::None, Kernel::Amx, Dest::F32).0
        == dense_with(&x, &packed, Epilogue::None, Kernel::Portable)
}

/// Two values as bf16 in one u32, as `vdpbf16ps` reads them: the even k in the low half.
fn pair(lo: f32, hi: f32) -> u32 {
    u32::from(bf16::from_f32(lo).to_bits()) | u32::from(bf16::from_f32(hi).to_bits()) << 16
}

fn unpair(p: u32) -> (f32, f32) {
    (
        bf16::from_bits(p as u16).to_f32(),
        bf16::from_bits((p >> 16) as u16).to_f32(),
    )
}

/// `W` `[N, K]` and its bias in the micro-kernel's layout: panels of [`NR`] output columns;
/// in each panel, for every pair of k, the panel's columns' (k, k+1) pairs side by side.
#[derive(Debug)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    pairs: usize,
    data: Vec<u32>,
    /// Padded to whole panels; zeros when the layer has no bias.
    bias: Vec<f32>,
}

impl PackedWeight {
    /// Packs a row-major `[n, k]` f32 weight (rounded to bf16) and an optional `[n]` bias
    /// (kept in f32: it is added, not multiplied).
    pub fn new(w: &[f32], n: usize, k: usize, bias: Option<&[f32]>) -> Self {
        assert_eq!(w.len(), n * k, "weight of shape [{n}, {k}]");
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * pairs * NR];
        data.par_chunks_mut(pairs * NR)
            .enumerate()
            .for_each(|(panel, dst)| {
                for c in 0..NR.min(n - panel * NR) {
                    let row = &w[(panel * NR + c) * k..][..k];
                    for p in 0..pairs {
                        let hi = if 2 * p + 1 < k { row[2 * p + 1] } else { 0.0 };
                        dst[p * NR + c] = pair(row[2 * p], hi);
                    }
                }
            });
        let mut padded = vec![0f32; panels * NR];
        if let Some(b) = bias {
            assert_eq!(b.len(), n, "bias of length {n}");
            padded[..n].copy_from_slice(b);
        }
        Self {
            n,
            k,
            pairs,
            data,
            bias: padded,
        }
    }
}

/// Output columns `[first_panel·NR, first_panel·NR + n)` of a packed weight: a whole layer, or
/// the query or key-value rows of the fused QKV projection.
#[derive(Debug, Clone)]
pub struct PackedView {
    w: Arc<PackedWeight>,
    first_panel: usize,
    n: usize,
}

impl PackedView {
    pub fn new(w: PackedWeight) -> Self {
        let n = w.n;
        Self {
            w: Arc::new(w),
            first_panel: 0,
            n,
        }
    }

    /// Columns `[from, from + n)` of this view, when `from` starts a panel (every CLIP width
    /// is a multiple of 32).
    pub fn narrow(&self, from: usize, n: usize) -> Option<Self> {
        (from.is_multiple_of(NR) && from + n <= self.n).then(|| Self {
            w: self.w.clone(),
            first_panel: self.first_panel + from / NR,
            n,
        })
    }

    pub fn in_dim(&self) -> usize {
        self.w.k
    }

    pub fn out_dim(&self) -> usize {
        self.n
    }
}

/// What happens to the output tile after its last k block, while it is still in registers: one
/// pass over memory saved per fused step.
#[derive(Debug, Clone, Copy)]
pub enum Epilogue<'a> {
    None,
    /// QuickGELU `y·σ(1.702·y)`: the MLP's first layer.
    QuickGelu,
    /// `y + r` for a row-major `[m, n]` `r`: the residual connection after a layer.
    Add(&'a [f32]),
}

impl<'a> Epilogue<'a> {
    /// The epilogue of the output tile at offset `at` of the output: a residual starts there.
    fn from(self, at: usize) -> Epilogue<'a> {
        match self {
            Epilogue::Add(r) => Epilogue::Add(&r[at..]),
            e => e,
        }
    }

    /// The epilogue of one output `y` at offset `at` from the tile start (residual row stride
    /// included), in plain Rust.
    fn scalar(self, y: f32, at: usize) -> f32 {
        match self {
            Epilogue::None => y,
            Epilogue::QuickGelu => y / (1.0 + (-1.702 * y).exp()),
            Epilogue::Add(res) => y + res[at],
        }
    }
}

/// A layer's output, shared by threads that write disjoint columns: f32 rows (`n` apart), or
/// [`Pairs`] rows (the given number of pairs apart).
#[derive(Clone, Copy)]
enum Out {
    F32(*mut f32),
    Pairs(*mut u32, usize),
}
// SAFETY: each thread writes only its own panels' columns of the output.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// Activations rounded to bf16 as the kernels read them: `m` rows of `pairs` (k, k+1) pairs
/// (the odd last k paired with zero), then zero rows up to a multiple of [`ROW_ALIGN`]. A layer
/// whose output only feeds another writes it in this form ([`dense_to_pairs`]), which saves
/// the next layer a pass over twice as many bytes of f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Pairs {
    data: Vec<u32>,
    m: usize,
    pairs: usize,
}

/// Rows of [`Pairs`] come in multiples of this: whole row tiles of both kernels.
const ROW_ALIGN: usize = 96;
const _: () = assert!(ROW_ALIGN.is_multiple_of(MR) && ROW_ALIGN.is_multiple_of(amx::ROWS));

impl Pairs {
    /// A row-major `[m, k]` f32 `x`, rounded to bf16 (to nearest, ties to even).
    pub fn new(x: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(x.len(), m * k, "input of shape [{m}, {k}]");
        let simd = native();
        Self::filled(
            m,
            k,
            || (),
            |_, i, dst| to_pairs(&x[i * k..][..k], dst, simd),
        )
    }

    /// `m` rows of `k` values, each written into a scratch row by `row(i, scratch)` and rounded
    /// from there: a row-wise op (layer norm) feeding a layer writes no f32 copy of its output.
    pub fn from_rows(m: usize, k: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        let simd = native();
        Self::filled(
            m,
            k,
            || vec![0f32; k],
            |scratch, i, dst| {
                row(i, scratch);
                to_pairs(scratch, dst, simd);
            },
        )
    }

    /// `m` rows of `k` values, row `i`'s pairs written by `write(state, i, dst)` in parallel,
    /// each thread with a `state` from `init`; the padding rows zero.
    fn filled<S>(
        m: usize,
        k: usize,
        init: impl Fn() -> S + Sync + Send,
        write: impl Fn(&mut S, usize, &mut [MaybeUninit<u32>]) + Sync + Send,
    ) -> Self {
        let mut out = Self::uninit(m, k.div_ceil(2));
        let pairs = out.pairs;
        if pairs > 0 {
            out.data.spare_capacity_mut()[..m * pairs]
                .par_chunks_mut(pairs)
                .enumerate()
                .for_each_init(init, |state, (i, dst)| write(state, i, dst));
        }
        // SAFETY: rows up to `m` were written just above, the padding rows by `uninit`.
        unsafe { out.assume_written() };
        out
    }

    /// Room for `m` rows of `pairs` pairs plus padding; the padding rows already zero, the rows
    /// themselves to be written before [`Pairs::assume_written`].
    fn uninit(m: usize, pairs: usize) -> Self {
        let mut data: Vec<u32> = Vec::with_capacity(Self::len(m, pairs));
        data.spare_capacity_mut()[m * pairs..Self::len(m, pairs)].fill(MaybeUninit::new(0));
        Self { data, m, pairs }
    }

    fn len(m: usize, pairs: usize) -> usize {
        m.div_ceil(ROW_ALIGN) * ROW_ALIGN * pairs
    }

    /// # Safety
    /// All `m` rows have been written since [`Pairs::uninit`].
    unsafe fn assume_written(&mut self) {
        self.data.set_len(Self::len(self.m, self.pairs));
    }
}

/// `epilogue(x·Wᵀ + b)` for a row-major `[m, k]` f32 `x`: `[m, n]` row-major f32.
pub fn dense(x: &[f32], m: usize, w: &PackedView, epilogue: Epilogue) -> Vec<f32> {
    dense_pairs(&Pairs::new(x, m, w.w.k), w, epilogue)
}

/// [`dense`] for an input already in bf16 pairs.
pub fn dense_pairs(x: &Pairs, w: &PackedView, epilogue: Epilogue) -> Vec<f32> {
    dense_with(x, w, epilogue, kernel())
}

/// `epilogue(x·Wᵀ + b)` rounded to bf16 pairs, for a layer whose output is only the next
/// layer's input (the MLP's first layer): the values that layer would round it to.
///
/// # Panics
/// With [`Epilogue::Add`]: a residual belongs to the f32 stream.
pub fn dense_to_pairs(x: &Pairs, w: &PackedView, epilogue: Epilogue) -> Pairs {
    run_on::<amx::Amx>(x, w, epilogue, kernel(), Dest::Pairs).1
}

fn dense_with(x: &Pairs, w: &PackedView, epilogue: Epilogue, kernel: Kernel) -> Vec<f32> {
    run_on::<amx::Amx>(x, w, epilogue, kernel, Dest::F32).0
}

/// What a layer's outputs are written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dest {
    F32,
    Pairs,
}

/// The layer into `dest`: f32 rows, or [`Pairs`] (the other of the two comes back empty);
/// `T` is the tile unit of [`Kernel::Amx`] (AMX itself, or a software model in tests).
fn run_on<T: TileUnit>(
    x: &Pairs,
    w: &PackedView,
    epilogue: Epilogue,
    kernel: Kernel,
    dest: Dest,
) -> (Vec<f32>, Pairs) {
    let (m, n) = (x.m, w.n);
    assert_eq!(
        x.pairs, w.w.pairs,
        "input of {} pairs for a layer of {} inputs",
        x.pairs, w.w.k
    );
    if let Epilogue::Add(r) = epilogue {
        assert_eq!(dest, Dest::F32, "a residual is added to f32 outputs only");
        assert_eq!(r.len(), m * n, "residual of shape [{m}, {n}]");
    }
    let (mut y, mut paired) = match dest {
        Dest::F32 => (Vec::with_capacity(m * n), Pairs::uninit(0, 0)),
        Dest::Pairs => (Vec::new(), Pairs::uninit(m, n.div_ceil(2))),
    };
    let out = match dest {
        Dest::F32 => Out::F32(y.as_mut_ptr()),
        Dest::Pairs => Out::Pairs(paired.data.as_mut_ptr(), paired.pairs),
    };
    if m > 0 && n > 0 {
        match kernel {
            Kernel::Amx if w.w.pairs.is_multiple_of(amx::STEP) => {
                dense_tiles::<T>(x, w, epilogue, out)
            }
            Kernel::Portable => dense_micro(x, w, epilogue, out, Micro::Portable),
            // (Checked: tests run the tile unit's model on any CPU.)
            _ if !native() => dense_micro(x, w, epilogue, out, Micro::Portable),
            Kernel::Avx512Fma => dense_micro(x, w, epilogue, out, Micro::Fma),
            _ => dense_micro(x, w, epilogue, out, Micro::Dpbf16),
        }
    }
    // SAFETY: the kernels wrote all `n` columns (or all pairs) of every row into the chosen
    // destination.
    unsafe {
        match dest {
            Dest::F32 => y.set_len(m * n),
            Dest::Pairs => paired.assume_written(),
        }
    }
    (y, paired)
}

/// Row blocks per pass over a thread's panels (see [`dense_tiles`]).
const BLOCKS_PER_PASS: usize = 4;

/// The dense layer on a tile unit: each thread a run of panels; for each panel and block of
/// [`amx::ROWS`] rows, the whole k in tiles, then bias and epilogue on the way out.
fn dense_tiles<T: TileUnit>(a: &Pairs, w: &PackedView, epilogue: Epilogue, out: Out) {
    let (m, pairs, n) = (a.m, w.w.pairs, w.n);
    debug_assert!(pairs.is_multiple_of(amx::STEP));
    // AMX CPUs have AVX512-BF16; the emulated unit in tests may run anywhere.
    let simd = native();
    let blocks = m.div_ceil(amx::ROWS);
    let panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads().clamp(1, panels);
    (0..threads).into_par_iter().for_each(|t| {
        let mut block = [0f32; amx::ROWS * NR];
        // A paired output's block, with bias, before its epilogue and rounding.
        let mut sums = [0f32; amx::ROWS * NR];
        // SAFETY: `kernel` chose the hardware unit only where `amx::available`.
        let _tiles = unsafe { amx::Configured::<T>::new() };
        // A few row blocks at a time against all of the thread's panels: their input rows
        // (≤ 0.8 MB for k = 3072) stay in L2 while the panels stream past, and each panel
        // (≤ 0.2 MB) stays in L2 across the few row blocks.
        for first in (0..blocks).step_by(BLOCKS_PER_PASS) {
            for j in panels * t / threads..panels * (t + 1) / threads {
                let panel = w.first_panel + j;
                let b = &w.w.data[panel * pairs * NR..][..pairs * NR];
                let bias = &w.w.bias[panel * NR..][..NR];
                let cols = NR.min(n - j * NR);
                for i in first..blocks.min(first + BLOCKS_PER_PASS) {
                    // SAFETY: `a` has whole blocks of `ROWS` rows of `pairs` pairs (`Pairs`
                    // pads them), `b` a panel's `pairs` rows, `block` ROWS × NR floats; the
                    // tiles are configured on this thread.
                    unsafe {
                        T::block(
                            a.data[i * amx::ROWS * pairs..].as_ptr(),
                            pairs,
                            b.as_ptr(),
                            pairs / amx::STEP,
                            block.as_mut_ptr(),
                        )
                    };
                    let row = i * amx::ROWS;
                    let mut tile = Tile {
                        a: &[],
                        lda: 0,
                        b: &[],
                        c: sums.as_mut_ptr(),
                        ldc: NR,
                        rows: amx::ROWS.min(m - row),
                        cols,
                        bias: Some(bias),
                        epilogue: Epilogue::None,
                    };
                    match out {
                        Out::F32(y) => {
                            let at = row * n + j * NR;
                            tile.c = y.wrapping_add(at);
                            tile.ldc = n;
                            tile.epilogue = epilogue.from(at);
                            // SAFETY: row i·ROWS + r < m and column j·NR + c < n for the
                            // tile's rows and columns: this thread's panel of the output.
                            unsafe { tile.store_sums(&block, simd) };
                        }
                        Out::Pairs(p, stride) => {
                            // SAFETY: `sums` holds the tile; the paired output has `stride`
                            // pairs per row, of which this panel's NR / 2 are this thread's.
                            unsafe {
                                tile.store_sums(&block, simd);
                                tile.epilogue = epilogue;
                                tile.store_pairs(
                                    p.wrapping_add(row * stride + j * NR / 2),
                                    stride,
                                    simd,
                                );
                            }
                        }
                    }
                }
            }
        }
    });
}

/// A row tile's inputs for [`Micro::Fma`], per row: the even k of a block of [`KC`] pairs as
/// f32, then the odd k.
type Unpacked = [[f32; KC]; 2];

/// Panels per unpacking of a row tile's inputs by the FMA kernel: their blocks of weights
/// (16 KiB each) are read from L2 in turn.
const FMA_PANELS: usize = 8;

/// Unpacks [`MR`] rows of `kn` pairs (rows `lda` pairs apart, from `a`) into `xs`: each bf16
/// moved to the top of an f32 lane, which makes it that f32 exactly.
///
/// # Safety
/// `a` holds [`MR`] rows of `lda` pairs, `kn ≤ lda` and `kn ≤ KC`; the CPU has AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn unpack(a: &[u32], lda: usize, kn: usize, xs: &mut [Unpacked; MR]) {
    use std::arch::x86_64::*;
    debug_assert!(kn <= KC && a.len() >= (MR - 1) * lda + kn);
    let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
    for (r, row) in xs.iter_mut().enumerate() {
        let a = a.as_ptr().add(r * lda);
        for p in (0..kn).step_by(16) {
            let v = _mm512_maskz_loadu_epi32(masks(kn - p).0, a.add(p) as *const i32);
            let (lo, hi) = (_mm512_slli_epi32::<16>(v), _mm512_and_si512(v, high));
            _mm512_storeu_si512(row[0].as_mut_ptr().add(p) as *mut _, lo);
            _mm512_storeu_si512(row[1].as_mut_ptr().add(p) as *mut _, hi);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn unpack(_: &[u32], _: usize, _: usize, _: &mut [Unpacked; MR]) {
    unreachable!("the FMA kernel runs on x86-64 only")
}

/// How a register micro-tile multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Micro {
    Portable,
    /// `vdpbf16ps`.
    Dpbf16,
    /// f32 FMAs of the unpacked bf16 values.
    Fma,
}

/// The dense layer on register micro-tiles.
fn dense_micro(a: &Pairs, w: &PackedView, epilogue: Epilogue, out: Out, micro: Micro) {
    let simd = micro != Micro::Portable;
    let (m, pairs, n) = (a.m, w.w.pairs, w.n);
    let tiles = m.div_ceil(MR);
    let panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads().clamp(1, panels);
    // The FMA kernel unpacks a row tile's inputs once for a group of panels.
    let group = if micro == Micro::Fma { FMA_PANELS } else { 1 };
    // Each thread a run of panels (columns), reading all of `a`.
    (0..threads).into_par_iter().for_each(|t| {
        // A paired output's panels are summed here over the k blocks (rows NR apart, in L2),
        // then rounded tile by tile after their last block.
        let mut scratch: Vec<f32> = match out {
            Out::F32(_) => Vec::new(),
            Out::Pairs(..) => Vec::with_capacity(group * tiles * MR * NR),
        };
        // (Only the FMA kernel reads the unpacked inputs.)
        let mut xs: Option<Box<[Unpacked; MR]>> =
            (micro == Micro::Fma).then(|| Box::new([[[0.0; KC]; 2]; MR]));
        let (first, end) = (panels * t / threads, panels * (t + 1) / threads);
        for g in (first..end).step_by(group) {
            let js = g..(g + group).min(end);
            for kc in (0..pairs).step_by(KC) {
                let kn = KC.min(pairs - kc);
                let last = kc + kn == pairs;
                for i in 0..tiles {
                    let row = i * MR;
                    let a = &a.data[row * pairs + kc..];
                    if let Some(xs) = xs.as_deref_mut() {
                        // SAFETY: `a` holds MR rows of `pairs` pairs from the tile's start
                        // (`Pairs` pads whole tiles), `kn` of them from `kc`; the CPU has
                        // AVX-512 (the kernel is chosen only where it does).
                        unsafe { unpack(a, pairs, kn, xs) }
                    }
                    for j in js.clone() {
                        let panel = w.first_panel + j;
                        let (c, ldc, tile_epilogue) = match out {
                            Out::F32(y) => {
                                let at = row * n + j * NR;
                                let e = if last {
                                    epilogue.from(at)
                                } else {
                                    Epilogue::None
                                };
                                (y.wrapping_add(at), n, e)
                            }
                            Out::Pairs(..) => (
                                scratch
                                    .as_mut_ptr()
                                    .wrapping_add(((j - g) * tiles * MR + row) * NR),
                                NR,
                                Epilogue::None,
                            ),
                        };
                        let mut tile = Tile {
                            a,
                            lda: pairs,
                            b: &w.w.data[(panel * pairs + kc) * NR..][..kn * NR],
                            c,
                            ldc,
                            rows: MR.min(m - row),
                            cols: NR.min(n - j * NR),
                            bias: (kc == 0).then_some(&w.w.bias[panel * NR..][..NR]),
                            epilogue: tile_epilogue,
                        };
                        // SAFETY: the tile's rows and columns lie inside the output (or this
                        // thread's scratch panels), which no other thread writes there; `a`
                        // holds MR rows of `lda` pairs from the tile's start (`Pairs` pads
                        // whole tiles); `xs` holds them unpacked for the FMA kernel.
                        unsafe { tile.run(micro, xs.as_deref()) }
                        if let (true, Out::Pairs(p, stride)) = (last, out) {
                            tile.epilogue = epilogue;
                            // SAFETY: the tile was just stored; the paired output has `stride`
                            // pairs per row, of which this panel's NR / 2 are this thread's.
                            unsafe {
                                tile.store_pairs(
                                    p.wrapping_add(row * stride + j * NR / 2),
                                    stride,
                                    simd,
                                )
                            };
                        }
                    }
                }
            }
        }
    });
}

/// One `rows × cols` block of the output over one block of k pairs: initialised with the bias
/// (first k block) or accumulated onto what earlier blocks stored; the epilogue (last k block)
/// reads a residual, if any, with the output's row stride from its tile start.
struct Tile<'a> {
    a: &'a [u32],
    lda: usize,
    b: &'a [u32],
    c: *mut f32,
    ldc: usize,
    rows: usize,
    cols: usize,
    bias: Option<&'a [f32]>,
    epilogue: Epilogue<'a>,
}

impl Tile<'_> {
    /// # Safety
    /// As for [`Tile`]'s fields; for [`Micro::Fma`], `xs` holds the tile's inputs unpacked
    /// ([`unpack`]).
    unsafe fn run(&self, micro: Micro, xs: Option<&[Unpacked; MR]>) {
        #[cfg(target_arch = "x86_64")]
        match (micro, xs) {
            (Micro::Dpbf16, _) => return self.avx512(None),
            (Micro::Fma, Some(xs)) => return self.avx512(Some(xs)),
            (Micro::Fma, None) => unreachable!("the FMA kernel's tile without its inputs"),
            (Micro::Portable, _) => {}
        }
        let _ = (micro, xs);
        self.portable()
    }

    unsafe fn portable(&self) {
        let kn = self.b.len() / NR;
        for r in 0..self.rows {
            let c = self.c.add(r * self.ldc);
            for col in 0..self.cols {
                let mut acc = match self.bias {
                    Some(b) => b[col],
                    None => *c.add(col),
                };
                for p in 0..kn {
                    let (a0, a1) = unpair(self.a[r * self.lda + p]);
                    let (b0, b1) = unpair(self.b[p * NR + col]);
                    acc += a1 * b1 + a0 * b0;
                }
                *c.add(col) = self.epilogue.scalar(acc, r * self.ldc + col);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    /// With `xs` (the tile's inputs unpacked), on f32 FMAs; else on `vdpbf16ps`.
    unsafe fn avx512(&self, xs: Option<&[Unpacked; MR]>) {
        use std::arch::x86_64::*;
        let kn = self.b.len() / NR;
        let (a, b, c) = (self.a.as_ptr(), self.b.as_ptr(), self.c);
        let (m0, m1) = masks(self.cols);
        // The residual's rows are 32 floats out of each long row of a large array, which the
        // hardware prefetchers miss: the epilogue waited on those loads (perf). Asked for now,
        // they arrive during the k loop.
        if let Epilogue::Add(res) = self.epilogue {
            for r in 0..self.rows {
                // (Wrapping: a partial last tile's row may end before the 32nd float; a
                // prefetch never faults.)
                let row = res.as_ptr().wrapping_add(r * self.ldc);
                _mm_prefetch::<_MM_HINT_T0>(row as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(31) as *const i8);
            }
        }
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        match self.bias {
            Some(bias) => {
                let b0 = _mm512_loadu_ps(bias.as_ptr());
                let b1 = _mm512_loadu_ps(bias.as_ptr().add(16));
                for row in acc.iter_mut() {
                    *row = [b0, b1];
                }
            }
            None => {
                for (r, row) in acc.iter_mut().enumerate() {
                    if r < self.rows {
                        let c = c.add(r * self.ldc);
                        *row = [
                            _mm512_maskz_loadu_ps(m0, c),
                            _mm512_maskz_loadu_ps(m1, c.add(16)),
                        ];
                    }
                }
            }
        }
        if let Some(xs) = xs {
            self.fma_loop(&mut acc, xs);
        } else {
            for p in 0..kn {
                let b0: __m512bh =
                    std::mem::transmute(_mm512_loadu_ps(b.add(p * NR) as *const f32));
                let b1: __m512bh =
                    std::mem::transmute(_mm512_loadu_ps(b.add(p * NR + 16) as *const f32));
                for (r, row) in acc.iter_mut().enumerate() {
                    let x: __m512bh =
                        std::mem::transmute(_mm512_set1_epi32(*a.add(r * self.lda + p) as i32));
                    row[0] = _mm512_dpbf16_ps(row[0], x, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], x, b1);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            if r < self.rows {
                let c = c.add(r * self.ldc);
                _mm512_mask_storeu_ps(c, m0, row[0]);
                _mm512_mask_storeu_ps(c.add(16), m1, row[1]);
            }
        }
        // A second pass over the tile just stored (still in L1): kept out of the loop above,
        // whose 24 accumulators must stay in registers.
        if !matches!(self.epilogue, Epilogue::None) {
            self.epilogue_avx512(m0, m1);
        }
    }

    /// The tile's products as f32 FMAs of the bf16 values: where `vdpbf16ps` issues at half
    /// the rate of FMAs per flop (Intel's cores: 0.5 per cycle against 2 FMAs), two FMAs per
    /// pair do the same work in fewer cycles. Each input pair is exact in f32 once its bf16
    /// halves are moved to the top of a lane, and so is each product; the sums differ from
    /// `vdpbf16ps`'s only in f32 rounding.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn fma_loop(&self, acc: &mut [[std::arch::x86_64::__m512; 2]; MR], xs: &[Unpacked; MR]) {
        use std::arch::x86_64::*;
        let kn = self.b.len() / NR;
        debug_assert!(kn <= KC);
        let high = _mm512_set1_epi32(0xffff_0000u32 as i32);
        let b = self.b.as_ptr();
        for p in 0..kn {
            let v0 = _mm512_loadu_si512(b.add(p * NR) as *const _);
            let v1 = _mm512_loadu_si512(b.add(p * NR + 16) as *const _);
            let (b0, b1) = (
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v0)),
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v1)),
            );
            let (c0, c1) = (
                _mm512_castsi512_ps(_mm512_and_si512(v0, high)),
                _mm512_castsi512_ps(_mm512_and_si512(v1, high)),
            );
            for (row, x) in acc.iter_mut().zip(xs) {
                let (lo, hi) = (_mm512_set1_ps(x[0][p]), _mm512_set1_ps(x[1][p]));
                row[0] = _mm512_fmadd_ps(hi, c0, _mm512_fmadd_ps(lo, b0, row[0]));
                row[1] = _mm512_fmadd_ps(hi, c1, _mm512_fmadd_ps(lo, b1, row[1]));
            }
        }
    }

    /// Writes a tile unit's block of sums (rows [`NR`] apart) plus the bias through the
    /// epilogue into the tile, in one pass from the block to the output.
    unsafe fn store_sums(&self, sums: &[f32], simd: bool) {
        let bias = self.bias.expect("the tile unit's tiles carry their bias");
        debug_assert!(sums.len() >= self.rows * NR && bias.len() >= NR);
        #[cfg(target_arch = "x86_64")]
        if simd {
            let (m0, m1) = masks(self.cols);
            return self.store_sums_avx512(sums, bias, m0, m1);
        }
        let _ = simd;
        for r in 0..self.rows {
            let c = self.c.add(r * self.ldc);
            for col in 0..self.cols {
                let y = sums[r * NR + col] + bias[col];
                *c.add(col) = self.epilogue.scalar(y, r * self.ldc + col);
            }
        }
    }

    /// Rounds the tile (at `c`, rows `ldc` apart) through the epilogue to bf16 pairs at `dst`,
    /// rows `stride` pairs apart: ⌈cols / 2⌉ pairs per row, an odd last column paired with zero.
    unsafe fn store_pairs(&self, dst: *mut u32, stride: usize, simd: bool) {
        debug_assert!(!matches!(self.epilogue, Epilogue::Add(_)));
        #[cfg(target_arch = "x86_64")]
        if simd {
            return self.store_pairs_avx512(dst, stride);
        }
        let _ = simd;
        for r in 0..self.rows {
            let c = self.c.add(r * self.ldc);
            let y = |col: usize| {
                if col < self.cols {
                    self.epilogue.scalar(*c.add(col), 0)
                } else {
                    0.0
                }
            };
            for q in 0..self.cols.div_ceil(2) {
                *dst.add(r * stride + q) = pair(y(2 * q), y(2 * q + 1));
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn store_pairs_avx512(&self, dst: *mut u32, stride: usize) {
        use std::arch::x86_64::*;
        let (m0, m1) = masks(self.cols);
        let in_use = masks(self.cols.div_ceil(2)).0;
        for r in 0..self.rows {
            let c = self.c.add(r * self.ldc);
            // Unused columns load as zero, which every epilogue here keeps zero.
            let lo = self.epilogue16(_mm512_maskz_loadu_ps(m0, c), 0, m0);
            let hi = self.epilogue16(_mm512_maskz_loadu_ps(m1, c.add(16)), 0, m1);
            // The low 16 bf16 come from the second operand: pair q is columns 2q and 2q + 1.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            _mm512_mask_storeu_epi32(dst.add(r * stride) as *mut i32, in_use, v);
        }
    }

    /// [`Tile::store_sums`] on 16 lanes: on the tile unit's path a plain loop here stayed
    /// scalar (one output per iteration, its pointer reloaded each time), about as long per
    /// block as the tile products of a k = 768 layer.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_sums_avx512(&self, sums: &[f32], bias: &[f32], m0: u16, m1: u16) {
        use std::arch::x86_64::*;
        let b = [
            _mm512_loadu_ps(bias.as_ptr()),
            _mm512_loadu_ps(bias.as_ptr().add(16)),
        ];
        for r in 0..self.rows {
            let c = self.c.add(r * self.ldc);
            for (h, (half, mask)) in [(0, m0), (16, m1)].into_iter().enumerate() {
                let y = _mm512_add_ps(_mm512_loadu_ps(sums.as_ptr().add(r * NR + half)), b[h]);
                let y = self.epilogue16(y, r * self.ldc + half, mask);
                _mm512_mask_storeu_ps(c.add(half), mask, y);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline(never)]
    unsafe fn epilogue_avx512(&self, m0: u16, m1: u16) {
        use std::arch::x86_64::*;
        for r in 0..self.rows {
            let c = self.c.add(r * self.ldc);
            for (half, mask) in [(0, m0), (16, m1)] {
                let y = _mm512_maskz_loadu_ps(mask, c.add(half));
                let y = self.epilogue16(y, r * self.ldc + half, mask);
                _mm512_mask_storeu_ps(c.add(half), mask, y);
            }
        }
    }

    /// The epilogue of the 16 outputs (`mask`: those in use) at offset `at` from the tile
    /// start, residual row stride included.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn epilogue16(
        &self,
        y: std::arch::x86_64::__m512,
        at: usize,
        mask: u16,
    ) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        match self.epilogue {
            Epilogue::None => y,
            Epilogue::QuickGelu => super::vmath::quick_gelu16(y),
            Epilogue::Add(res) => {
                _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, res.as_ptr().add(at)))
            }
        }
    }
}

/// Lane masks of a panel's two 16-column halves with `cols` columns in use.
fn masks(cols: usize) -> (u16, u16) {
    let mask = |from: usize| -> u16 {
        match cols.saturating_sub(from) {
            n if n >= 16 => 0xffff,
            n => (1u16 << n) - 1,
        }
    };
    (mask(0), mask(16))
}

/// One row of f32 to bf16 pairs (the odd last k paired with zero).
fn to_pairs(src: &[f32], dst: &mut [MaybeUninit<u32>], simd: bool) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: the CPU has AVX512-BF16 (`simd`); 32 floats read and 16 pairs written per step,
        // all in bounds.
        unsafe { done = to_pairs_avx512(src, dst) };
    }
    let _ = simd;
    for (p, d) in dst.iter_mut().enumerate().skip(done) {
        let hi = src.get(2 * p + 1).copied().unwrap_or(0.0);
        d.write(pair(src[2 * p], hi));
    }
}

/// Converts whole 32-float blocks; returns how many pairs it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn to_pairs_avx512(src: &[f32], dst: &mut [MaybeUninit<u32>]) -> usize {
    use std::arch::x86_64::*;
    let blocks = src.len() / 32;
    for i in 0..blocks {
        let lo = _mm512_loadu_ps(src.as_ptr().add(32 * i));
        let hi = _mm512_loadu_ps(src.as_ptr().add(32 * i + 16));
        // The low 16 bf16 come from the second operand.
        let v: __m512 = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_ps(dst.as_mut_ptr().add(16 * i) as *mut f32, v);
    }
    blocks * 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn round(x: f32) -> f32 {
        bf16::from_f32(x).to_f32()
    }

    /// `x·Wᵀ + b` in f64 from the bf16-rounded operands.
    fn reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize, b: &[f32]) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|t| f64::from(round(x[i * k + t])) * f64::from(round(w[j * k + t])))
                    .sum();
                y[i * n + j] = (dot + f64::from(b[j])) as f32;
            }
        }
        y
    }

    /// Test case `s` of shape `m×n×k`: input, weight, bias, and the packed weight.
    fn layer(s: usize, m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, PackedView) {
        let (x, w, b) = (random(m * k, s as u64), random(n * k, 100), random(n, 7));
        let packed = PackedView::new(PackedWeight::new(&w, n, k, Some(&b)));
        (x, w, b, packed)
    }

    /// The layer on `kernel`, from f32 inputs.
    fn with(x: &[f32], m: usize, w: &PackedView, epilogue: Epilogue, kernel: Kernel) -> Vec<f32> {
        dense_with(&Pairs::new(x, m, w.in_dim()), w, epilogue, kernel)
    }

    /// The layer on the software model of the tile unit.
    fn emulated(x: &[f32], m: usize, w: &PackedView, epilogue: Epilogue) -> Vec<f32> {
        on(
            &Pairs::new(x, m, w.in_dim()),
            w,
            epilogue,
            Kernel::Amx,
            Dest::F32,
        )
        .0
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    /// Shapes with partial tiles, partial panels, odd k, k past one cache block, and more
    /// panels per thread than the FMA kernel's group (a partial group last).
    const SHAPES: [(usize, usize, usize); 6] = [
        (1, 1, 1),
        (13, 33, 7),
        (25, 70, 300),
        (12, 32, 256),
        (50, 96, 513),
        (37, 610, 260),
    ];

    /// The vector kernels this CPU runs.
    fn vector_kernels() -> &'static [Kernel] {
        if native() {
            &[Kernel::Avx512Bf16, Kernel::Avx512Fma]
        } else {
            &[]
        }
    }

    #[test]
    fn portable_kernel_is_the_bf16_product() {
        for (s, &(m, n, k)) in SHAPES.iter().enumerate() {
            let (x, w, b, packed) = layer(s, m, n, k);
            let y = with(&x, m, &packed, Epilogue::None, Kernel::Portable);
            let diff = max_diff(&y, &reference(&x, m, &w, n, k, &b));
            assert!(diff < 1e-4 * (k as f32).sqrt(), "{m}×{n}×{k}: {diff}");
        }
    }

    #[test]
    fn native_kernel_equals_the_portable_one() {
        if !native() {
            eprintln!("this CPU has no AVX512-BF16; only the portable kernel was checked");
            return;
        }
        for (s, &(m, n, k)) in SHAPES.iter().enumerate() {
            let (x, w, b, packed) = layer(s, m, n, k);
            let slow = with(&x, m, &packed, Epilogue::None, Kernel::Portable);
            let exact = reference(&x, m, &w, n, k, &b);
            for &kernel in vector_kernels() {
                let fast = with(&x, m, &packed, Epilogue::None, kernel);
                let diff = max_diff(&fast, &slow);
                assert!(
                    diff < 1e-4 * (k as f32).sqrt(),
                    "{kernel:?} {m}×{n}×{k}: {diff}"
                );
                let diff = max_diff(&fast, &exact);
                assert!(
                    diff < 1e-4 * (k as f32).sqrt(),
                    "{kernel:?} {m}×{n}×{k}: {diff}"
                );
            }
        }
    }

    /// Shapes for the tile unit (k a multiple of 32): partial and whole row blocks, partial
    /// panels, one and many tile steps, one and several passes.
    const TILE_SHAPES: [(usize, usize, usize); 6] = [
        (1, 1, 32),
        (45, 40, 96),
        (32, 32, 64),
        (70, 100, 544),
        (3, 64, 768),
        // More row blocks than one pass over the panels takes.
        (150, 64, 64),
    ];

    #[test]
    fn tile_loops_give_the_portable_products() {
        for (s, &(m, n, k)) in TILE_SHAPES.iter().enumerate() {
            let (x, w, b, packed) = layer(s, m, n, k);
            let tiles = emulated(&x, m, &packed, Epilogue::None);
            let portable = with(&x, m, &packed, Epilogue::None, Kernel::Portable);
            let diff = max_diff(&tiles, &portable);
            assert!(diff < 1e-4 * (k as f32).sqrt(), "{m}×{n}×{k}: {diff}");
            // And the same against the f64 product, so a common layout slip cannot hide.
            let diff = max_diff(&tiles, &reference(&x, m, &w, n, k, &b));
            assert!(diff < 1e-4 * (k as f32).sqrt(), "{m}×{n}×{k}: {diff}");
        }
    }

    #[test]
    fn start_up_check_is_exact_whatever_the_summation_order() {
        // Passes on the model of the tile instructions, so on hardware only a wrong product
        // can fail it.
        assert!(tiles_match_portable::<amx::Emulated>());
    }

    #[test]
    fn tile_loops_apply_epilogues_and_views() {
        let (m, n, k) = (40, 96, 64);
        let (x, w, b, res) = (
            random(m * k, 8),
            random(n * k, 9),
            random(n, 10),
            random(m * 64, 11),
        );
        let full = PackedView::new(PackedWeight::new(&w, n, k, Some(&b)));
        let part = full.narrow(32, 64).unwrap();
        for epilogue in [Epilogue::None, Epilogue::QuickGelu, Epilogue::Add(&res)] {
            let tiles = emulated(&x, m, &part, epilogue);
            let portable = with(&x, m, &part, epilogue, Kernel::Portable);
            let diff = max_diff(&tiles, &portable);
            assert!(diff < 1e-5, "{epilogue:?}: {diff}");
        }
    }

    #[test]
    fn hardware_tiles_equal_the_portable_kernel() {
        if !amx::available() {
            eprintln!("this CPU (or OS) has no AMX; only the emulated tile unit was checked");
            return;
        }
        assert!(tiles_match_portable::<amx::Amx>(), "the start-up check");
        for (s, &(m, n, k)) in TILE_SHAPES.iter().enumerate() {
            let (x, _, _, packed) = layer(s, m, n, k);
            let res = random(m * n, 3);
            for epilogue in [Epilogue::None, Epilogue::QuickGelu, Epilogue::Add(&res)] {
                let fast = with(&x, m, &packed, epilogue, Kernel::Amx);
                let slow = with(&x, m, &packed, epilogue, Kernel::Portable);
                let diff = max_diff(&fast, &slow);
                assert!(diff < 1e-4 * (k as f32).sqrt(), "{m}×{n}×{k}: {diff}");
            }
        }
        if std::env::var_os("CLIPFT_NO_AMX").is_none() {
            assert_eq!(kernel(), Kernel::Amx, "AMX available but not chosen");
        }
    }

    #[test]
    fn narrowed_view_is_the_column_range() {
        let (m, n, k) = (5, 96, 40);
        let (x, w, b) = (random(m * k, 1), random(n * k, 2), random(n, 3));
        let full = PackedView::new(PackedWeight::new(&w, n, k, Some(&b)));
        let y = dense(&x, m, &full, Epilogue::None);
        let part = full.narrow(32, 64).unwrap();
        assert_eq!((part.in_dim(), part.out_dim()), (k, 64));
        let yp = dense(&x, m, &part, Epilogue::None);
        for i in 0..m {
            assert_eq!(&yp[i * 64..][..64], &y[i * n + 32..][..64]);
        }
        assert!(full.narrow(16, 32).is_none(), "not at a panel start");
    }

    #[test]
    fn no_bias_is_zero_bias() {
        let (m, n, k) = (3, 10, 9);
        let (x, w) = (random(m * k, 4), random(n * k, 5));
        let a = dense(
            &x,
            m,
            &PackedView::new(PackedWeight::new(&w, n, k, None)),
            Epilogue::None,
        );
        let b = dense(
            &x,
            m,
            &PackedView::new(PackedWeight::new(&w, n, k, Some(&vec![0.0; n]))),
            Epilogue::None,
        );
        assert_eq!(a, b);
    }

    #[test]
    fn epilogues_are_gelu_and_residual_on_both_kernels() {
        let (m, n, k) = (14, 40, 300);
        let (x, w, b, res) = (
            random(m * k, 8),
            random(n * k, 9),
            random(n, 10),
            random(m * n, 11),
        );
        let packed = PackedView::new(PackedWeight::new(&w, n, k, Some(&b)));
        for &kernel in [Kernel::Portable].iter().chain(vector_kernels()) {
            let plain = with(&x, m, &packed, Epilogue::None, kernel);
            let gelu = with(&x, m, &packed, Epilogue::QuickGelu, kernel);
            let added = with(&x, m, &packed, Epilogue::Add(&res), kernel);
            for i in 0..m * n {
                let y = plain[i];
                let want = y / (1.0 + (-1.702 * y).exp());
                assert!(
                    (gelu[i] - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{kernel:?} {i}: {} vs {want}",
                    gelu[i]
                );
                assert!((added[i] - (y + res[i])).abs() <= 1e-6, "{kernel:?} {i}");
            }
        }
    }

    /// Every kernel this machine can run, with the tile unit's software model.
    fn kernels_here() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Portable, Kernel::Amx];
        kernels.extend(vector_kernels());
        kernels
    }

    /// The layer on `kernel` into `dest`, the tile unit's software model standing in for AMX.
    fn on(x: &Pairs, w: &PackedView, e: Epilogue, kernel: Kernel, dest: Dest) -> (Vec<f32>, Pairs) {
        run_on::<amx::Emulated>(x, w, e, kernel, dest)
    }

    #[test]
    fn paired_outputs_are_the_f32_outputs_rounded() {
        // An odd width (a pair half empty), partial tiles and panels, tile-unit k (multiple of
        // 32) and not; more panels than the FMA kernel's group, which it sums side by side,
        // over more than one block of k.
        for (s, &(m, n, k)) in [
            (13, 33, 64),
            (45, 70, 96),
            (1, 1, 32),
            (30, 96, 100),
            (25, 620, 300),
        ]
        .iter()
        .enumerate()
        {
            let (x, _, _, packed) = layer(s, m, n, k);
            let x = Pairs::new(&x, m, k);
            for kernel in kernels_here() {
                for e in [Epilogue::None, Epilogue::QuickGelu] {
                    let y = on(&x, &packed, e, kernel, Dest::F32).0;
                    let paired = on(&x, &packed, e, kernel, Dest::Pairs).1;
                    let want = Pairs::new(&y, m, n);
                    assert_eq!(paired, want, "{kernel:?} {e:?} {m}×{n}×{k}");
                    let padding = &paired.data[m * paired.pairs..];
                    assert!(padding.iter().all(|&p| p == 0), "padding rows are zero");
                }
            }
        }
    }

    #[test]
    fn chained_layers_in_pairs_equal_the_f32_chain() {
        // The MLP: QuickGELU(x·W1ᵀ + b1) in pairs straight into the second layer, residual added.
        let (m, h, k) = (40, 64, 96);
        let (x, w1, b1) = (random(m * k, 1), random(h * k, 2), random(h, 3));
        let (w2, b2, res) = (random(k * h, 4), random(k, 5), random(m * k, 6));
        let fc1 = PackedView::new(PackedWeight::new(&w1, h, k, Some(&b1)));
        let fc2 = PackedView::new(PackedWeight::new(&w2, k, h, Some(&b2)));
        for kernel in kernels_here() {
            let x = Pairs::new(&x, m, k);
            let hidden = on(&x, &fc1, Epilogue::QuickGelu, kernel, Dest::Pairs).1;
            let fused = on(&hidden, &fc2, Epilogue::Add(&res), kernel, Dest::F32).0;
            let f32_hidden = on(&x, &fc1, Epilogue::QuickGelu, kernel, Dest::F32).0;
            let plain = on(
                &Pairs::new(&f32_hidden, m, h),
                &fc2,
                Epilogue::Add(&res),
                kernel,
                Dest::F32,
            )
            .0;
            assert_eq!(fused, plain, "{kernel:?}");
        }
    }
}

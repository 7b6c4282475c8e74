//! Dense layers with bf16 products on the CPU: `y = x·Wᵀ + b` for f32 `x` and `y`, with `W`
//! stored in bf16 and `x` rounded to bf16 (to nearest, ties to even) as it is packed, products
//! summed in f32. That is what PyTorch's bf16 autocast does inside a linear layer, here with f32
//! activations kept between layers (layer norm, softmax, residuals).
//!
//! candle 0.11 has no bf16 matmul on the CPU. CPUs with AVX512-BF16 (AMD Zen 4 and later, Intel
//! Cooper Lake and Sapphire Rapids and later) multiply bf16 pairs at twice the rate of f32 FMAs
//! (`vdpbf16ps`); the micro-kernel below is built on that instruction. A portable kernel with the
//! same layout and rounding runs elsewhere (correct, but no faster than f32, so the loader only
//! offers bf16 where the instruction exists) and is the reference the fast one is tested against.
//! CPUs with AMX (Intel Sapphire Rapids and later) multiply the same packed operands as whole
//! tiles ([`amx`]).

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
    /// AMX tiles, for layers whose k pairs fill whole tile rows (k of 32·j or 32·j − 1: every
    /// CLIP layer); others run on AVX512-BF16.
    Amx,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Portable => "portable",
            Kernel::Avx512Bf16 => "AVX512-BF16",
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
            Kernel::Avx512Bf16
        } else if tiles_match_portable::<amx::Amx>() {
            Kernel::Amx
        } else {
            eprintln!(
                "warning: this CPU's AMX products did not match the reference; bf16 layers use \
                 AVX512-BF16 instead"
            );
            Kernel::Avx512Bf16
        }
    })
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
    dense_tiles::<T>(&x, m, &packed, Epilogue::None)
        == dense_with(&x, m, &packed, Epilogue::None, Kernel::Portable)
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

impl Epilogue<'_> {
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

/// A raw output pointer shared by threads that write disjoint columns.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each thread writes only its own panels' columns of the output.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The output at element `i` (a method, so closures capture the `Sync` wrapper).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `epilogue(x·Wᵀ + b)` for a row-major `[m, k]` f32 `x`: `[m, n]` row-major f32.
pub fn dense(x: &[f32], m: usize, w: &PackedView, epilogue: Epilogue) -> Vec<f32> {
    dense_with(x, m, w, epilogue, kernel())
}

fn dense_with(x: &[f32], m: usize, w: &PackedView, epilogue: Epilogue, kernel: Kernel) -> Vec<f32> {
    let (k, n) = (w.w.k, w.n);
    assert_eq!(x.len(), m * k, "input of shape [{m}, {k}]");
    if let Epilogue::Add(r) = epilogue {
        assert_eq!(r.len(), m * n, "residual of shape [{m}, {n}]");
    }
    if m == 0 || n == 0 {
        return Vec::new();
    }
    match kernel {
        Kernel::Amx if w.w.pairs.is_multiple_of(amx::STEP) => {
            dense_tiles::<amx::Amx>(x, m, w, epilogue)
        }
        Kernel::Portable => dense_micro(x, m, w, epilogue, false),
        _ => dense_micro(x, m, w, epilogue, true),
    }
}

/// `x` `[m, k]` as rows of bf16 pairs, padded with zero rows to a multiple of `rows`.
fn pack_input(x: &[f32], m: usize, k: usize, pairs: usize, rows: usize, simd: bool) -> Vec<u32> {
    let padded = m.div_ceil(rows) * rows;
    let mut a: Vec<u32> = Vec::with_capacity(padded * pairs);
    let spare = &mut a.spare_capacity_mut()[..padded * pairs];
    let (data, pad) = spare.split_at_mut(m * pairs);
    data.par_chunks_mut(pairs)
        .zip(x.par_chunks(k))
        .for_each(|(dst, src)| to_pairs(src, dst, simd));
    pad.fill(MaybeUninit::new(0));
    // SAFETY: every element up to this length was written just above.
    unsafe { a.set_len(padded * pairs) };
    a
}

/// Row blocks per pass over a thread's panels (see [`dense_tiles`]).
const BLOCKS_PER_PASS: usize = 4;

/// The dense layer on a tile unit: each thread a run of panels; for each panel and block of
/// [`amx::ROWS`] rows, the whole k in tiles, then bias and epilogue on the way out.
fn dense_tiles<T: TileUnit>(x: &[f32], m: usize, w: &PackedView, epilogue: Epilogue) -> Vec<f32> {
    let (k, pairs, n) = (w.w.k, w.w.pairs, w.n);
    debug_assert!(pairs.is_multiple_of(amx::STEP));
    // AMX CPUs have AVX512-BF16; the emulated unit in tests may run anywhere.
    let simd = native();
    let a = pack_input(x, m, k, pairs, amx::ROWS, simd);
    let blocks = m.div_ceil(amx::ROWS);
    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let out = Out(y.as_mut_ptr());
    let panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads().clamp(1, panels);
    (0..threads).into_par_iter().for_each(|t| {
        let mut block = [0f32; amx::ROWS * NR];
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
                    // SAFETY: `a` has `blocks · ROWS` rows of `pairs` pairs, `b` a panel's `pairs`
                    // rows, `block` ROWS × NR floats; the tiles are configured on this thread.
                    unsafe {
                        T::block(
                            a[i * amx::ROWS * pairs..].as_ptr(),
                            pairs,
                            b.as_ptr(),
                            pairs / amx::STEP,
                            block.as_mut_ptr(),
                        )
                    };
                    let at = i * amx::ROWS * n + j * NR;
                    let tile = Tile {
                        a: &[],
                        lda: 0,
                        b: &[],
                        c: out.at(at),
                        ldc: n,
                        rows: amx::ROWS.min(m - i * amx::ROWS),
                        cols,
                        bias: Some(bias),
                        epilogue: match epilogue {
                            Epilogue::Add(r) => Epilogue::Add(&r[at..]),
                            e => e,
                        },
                    };
                    // SAFETY: row i·ROWS + r < m and column j·NR + c < n for the tile's rows
                    // and columns: this thread's panel of the output.
                    unsafe { tile.store_sums(&block, simd) };
                }
            }
        }
    });
    // SAFETY: the panels cover all n columns, the blocks all m rows, each row of each block
    // stored its panel's columns.
    unsafe { y.set_len(m * n) };
    y
}

/// The dense layer on register micro-tiles (`vdpbf16ps` with `simd`, else the portable kernel).
fn dense_micro(x: &[f32], m: usize, w: &PackedView, epilogue: Epilogue, simd: bool) -> Vec<f32> {
    let (k, pairs, n) = (w.w.k, w.w.pairs, w.n);
    // x in bf16 pairs, rows padded to whole tiles with zeros.
    let tiles = m.div_ceil(MR);
    let a = pack_input(x, m, k, pairs, MR, simd);

    let mut y: Vec<f32> = Vec::with_capacity(m * n);
    let out = Out(y.as_mut_ptr());
    let panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads().clamp(1, panels);
    // Each thread a run of panels (columns), reading all of `a`.
    (0..threads).into_par_iter().for_each(|t| {
        for j in panels * t / threads..panels * (t + 1) / threads {
            let panel = w.first_panel + j;
            let b = &w.w.data[panel * pairs * NR..][..pairs * NR];
            let bias = &w.w.bias[panel * NR..][..NR];
            let cols = NR.min(n - j * NR);
            for kc in (0..pairs).step_by(KC) {
                let kn = KC.min(pairs - kc);
                for i in 0..tiles {
                    let at = i * MR * n + j * NR;
                    let tile = Tile {
                        a: &a[i * MR * pairs + kc..],
                        lda: pairs,
                        b: &b[kc * NR..][..kn * NR],
                        // Row i·MR, column j·NR of the m×n output.
                        c: out.at(at),
                        ldc: n,
                        rows: MR.min(m - i * MR),
                        cols,
                        bias: (kc == 0).then_some(bias),
                        epilogue: match epilogue {
                            _ if kc + kn < pairs => Epilogue::None,
                            Epilogue::Add(r) => Epilogue::Add(&r[at..]),
                            e => e,
                        },
                    };
                    // SAFETY: the tile's rows and columns lie inside the output, which no other
                    // thread writes there; `a` holds MR rows of `lda` pairs from the tile's start.
                    unsafe { tile.run(simd) }
                }
            }
        }
    });
    // SAFETY: the panels cover all n columns, the tiles all m rows, and each tile stored all of
    // its rows' columns.
    unsafe { y.set_len(m * n) };
    y
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
    unsafe fn run(&self, simd: bool) {
        #[cfg(target_arch = "x86_64")]
        if simd {
            return self.avx512();
        }
        let _ = simd;
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
    unsafe fn avx512(&self) {
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
        for p in 0..kn {
            let b0: __m512bh = std::mem::transmute(_mm512_loadu_ps(b.add(p * NR) as *const f32));
            let b1: __m512bh =
                std::mem::transmute(_mm512_loadu_ps(b.add(p * NR + 16) as *const f32));
            for (r, row) in acc.iter_mut().enumerate() {
                let x: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*a.add(r * self.lda + p) as i32));
                row[0] = _mm512_dpbf16_ps(row[0], x, b0);
                row[1] = _mm512_dpbf16_ps(row[1], x, b1);
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

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

    /// Shapes with partial tiles, partial panels, odd k, and k past one cache block.
    const SHAPES: [(usize, usize, usize); 5] = [
        (1, 1, 1),
        (13, 33, 7),
        (25, 70, 300),
        (12, 32, 256),
        (50, 96, 513),
    ];

    #[test]
    fn portable_kernel_is_the_bf16_product() {
        for (s, &(m, n, k)) in SHAPES.iter().enumerate() {
            let (x, w, b, packed) = layer(s, m, n, k);
            let y = dense_with(&x, m, &packed, Epilogue::None, Kernel::Portable);
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
            let (x, _, _, packed) = layer(s, m, n, k);
            let fast = dense_with(&x, m, &packed, Epilogue::None, Kernel::Avx512Bf16);
            let slow = dense_with(&x, m, &packed, Epilogue::None, Kernel::Portable);
            let diff = max_diff(&fast, &slow);
            assert!(diff < 1e-4 * (k as f32).sqrt(), "{m}×{n}×{k}: {diff}");
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
            let tiles = dense_tiles::<amx::Emulated>(&x, m, &packed, Epilogue::None);
            let portable = dense_with(&x, m, &packed, Epilogue::None, Kernel::Portable);
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
            let tiles = dense_tiles::<amx::Emulated>(&x, m, &part, epilogue);
            let portable = dense_with(&x, m, &part, epilogue, Kernel::Portable);
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
                let fast = dense_with(&x, m, &packed, epilogue, Kernel::Amx);
                let slow = dense_with(&x, m, &packed, epilogue, Kernel::Portable);
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
        let kernels: &[Kernel] = if native() {
            &[Kernel::Portable, Kernel::Avx512Bf16]
        } else {
            &[Kernel::Portable]
        };
        for &kernel in kernels {
            let plain = dense_with(&x, m, &packed, Epilogue::None, kernel);
            let gelu = dense_with(&x, m, &packed, Epilogue::QuickGelu, kernel);
            let added = dense_with(&x, m, &packed, Epilogue::Add(&res), kernel);
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
}

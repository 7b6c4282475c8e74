//! An optional external BLAS for the f32 dense layers on the CPU, loaded at run time.
//!
//! By default the dense layers multiply with the `gemm` crate, candle's own CPU GEMM (pure Rust,
//! nothing to install). On the ViT-B/32 shapes it reaches 200–275 GFLOP/s on two AVX-512 cores
//! where Intel MKL (what PyTorch links) reaches 250–300. `CLIPFT_BLAS=/path/to/libmkl_rt.so.3`
//! (or OpenBLAS's `libopenblas.so`, or any library exporting `cblas_sgemm`) makes the dense
//! layers, forward and backward, call that library instead. Nothing is linked at build time: a
//! missing or unsuitable library is reported once and the `gemm` crate is used.
//!
//! The library runs single-threaded (MKL's sequential layer, OpenBLAS with one thread): clipft
//! splits each product into column blocks over its own rayon threads, so the BLAS's threads never
//! compete with the decoding and pipeline threads that share the cores.

use std::ffi::c_int;
use std::path::PathBuf;
use std::sync::OnceLock;

use rayon::prelude::*;

/// `cblas_sgemm` (CBLAS, LP64 integers).
type Sgemm = unsafe extern "C" fn(
    layout: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// A loaded BLAS.
pub struct Blas {
    cblas_sgemm: Sgemm,
    path: PathBuf,
    // Kept loaded for the process's life (`sgemm` points into it).
    _lib: libloading::Library,
}

/// The environment variable naming the library.
pub const ENV: &str = "CLIPFT_BLAS";

/// The BLAS `CLIPFT_BLAS` names, loaded on first use; `None` when unset, or when it cannot be
/// loaded (said once, on stderr).
pub fn get() -> Option<&'static Blas> {
    static BLAS: OnceLock<Option<Blas>> = OnceLock::new();
    BLAS.get_or_init(|| {
        let path = PathBuf::from(std::env::var_os(ENV).filter(|v| !v.is_empty())?);
        match Blas::load(path.clone()) {
            Ok(blas) => Some(blas),
            Err(e) => {
                crate::say!(
                    "warning: {ENV}={}: {e:#}; dense layers use the built-in GEMM",
                    path.display()
                );
                None
            }
        }
    })
    .as_ref()
}

impl Blas {
    /// Loads `path` and checks `cblas_sgemm` on a small product before it is trusted.
    pub fn load(path: PathBuf) -> anyhow::Result<Self> {
        use anyhow::Context;
        // A path is loaded only if it is a file: opening a named pipe would wait forever (for a
        // writer), with signals caught. A bare name is looked up in the system's library
        // folders, as the dynamic loader does.
        if path.components().count() > 1 || path.is_absolute() {
            let meta = std::fs::metadata(&path).context("cannot load it")?;
            anyhow::ensure!(meta.is_file(), "cannot load it: not a file");
        }
        // SAFETY: loading a shared library runs its initialisers; the user named it as a BLAS.
        let lib = unsafe { libloading::Library::new(&path) }.context("cannot load it")?;
        // SAFETY: the CBLAS signature of `cblas_sgemm`, which every CBLAS exports.
        let cblas_sgemm = *unsafe { lib.get::<Sgemm>(b"cblas_sgemm\0") }
            .context("it has no `cblas_sgemm` (not a CBLAS library)")?;
        // One thread per call: clipft runs the calls on its own threads.
        // SAFETY: these MKL / OpenBLAS calls take and return plain integers.
        unsafe {
            if let Ok(set) =
                lib.get::<unsafe extern "C" fn(c_int) -> c_int>(b"MKL_Set_Threading_Layer\0")
            {
                // MKL_THREADING_SEQUENTIAL
                set(1);
            }
            if let Ok(set) = lib.get::<unsafe extern "C" fn(c_int)>(b"openblas_set_num_threads\0") {
                set(1);
            }
        }
        // SAFETY: OpenBLAS's `openblas_get_corename` returns a static C string.
        let core = unsafe {
            lib.get::<unsafe extern "C" fn() -> *const std::ffi::c_char>(b"openblas_get_corename\0")
                .ok()
                .map(|f| f())
                .filter(|p| !p.is_null())
                .map(|p| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
        };
        if let Some(core) = core {
            // clipft's own kernels need AVX2 and FMA (or AVX-512) too.
            if pre_avx2_openblas_core(&core, super::vmath::isa().is_some()) {
                // Either OpenBLAS did not know the CPU, or the user's OPENBLAS_CORETYPE chose them.
                let why = match std::env::var("OPENBLAS_CORETYPE") {
                    Ok(set) if !set.is_empty() => format!("chosen by OPENBLAS_CORETYPE={set}"),
                    _ => "an OpenBLAS older than the CPU model falls back to them".to_string(),
                };
                anyhow::bail!(
                    "OpenBLAS runs its `{core}` kernels on this CPU ({why}): pre-AVX2 code, about \
                     4× slower than the built-in GEMM; set OPENBLAS_CORETYPE to the CPU's family \
                     (SkylakeX for AVX-512, Haswell for AVX2) to choose its kernels"
                );
            }
        }
        let blas = Self {
            cblas_sgemm,
            path,
            _lib: lib,
        };
        blas.check()
            .context("its `cblas_sgemm` gives wrong products")?;
        Ok(blas)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Products whose every entry is exact in f32, against the plain loops: a small one
    /// straight through `cblas_sgemm` into a buffer with guard space on both sides (a library
    /// that ignores the row-major layout or the leading dimensions writes outside the output),
    /// then an odd-sized one through [`Blas::dense`]'s blocks. An ILP64 library, whose integers
    /// are 64-bit, fails here too.
    fn check(&self) -> anyhow::Result<()> {
        const GUARD: usize = 4096;
        let value = |i: usize, m: usize| (i % m) as f32 - (m / 2) as f32;
        let want = |a: &[f32], w: &[f32], k: usize, i: usize, j: usize| {
            1.0 + (0..k).map(|t| a[i * k + t] * w[j * k + t]).sum::<f32>()
        };
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| value(i, 5)).collect();
        let w: Vec<f32> = (0..n * k).map(|i| value(i, 3)).collect();
        let mut c = vec![1f32; GUARD + m * n + GUARD];
        // SAFETY: the operands are as declared; a wrong library may write anywhere in `c`,
        // whose guard space is 4,096 floats on each side of the output.
        unsafe {
            self.sgemm(
                (m, n, k),
                Operand::rows(a.as_ptr(), k),
                Operand::transposed(w.as_ptr(), k),
                1.0,
                c.as_mut_ptr().add(GUARD),
                n,
            )
        };
        let (before, rest) = c.split_at(GUARD);
        let (out, after) = rest.split_at(m * n);
        anyhow::ensure!(
            before.iter().chain(after).all(|&v| v == 1.0),
            "it wrote outside the output"
        );
        for i in 0..m {
            for j in 0..n {
                anyhow::ensure!(out[i * n + j] == want(&a, &w, k, i, j), "entry ({i}, {j})");
            }
        }
        // Odd sizes past one block of any thread split; sums of 131 products of integers of at
        // most 3 and 2 in size stay exact.
        let (m, n, k) = (37, 150, 131);
        let a: Vec<f32> = (0..m * k).map(|i| value(i * 31 + i / 7, 7)).collect();
        let w: Vec<f32> = (0..n * k).map(|i| value(i * 17 + i / 5, 5)).collect();
        let mut c = vec![1f32; m * n];
        self.dense(&a, m, k, &w, n, &mut c);
        for i in 0..m {
            for j in 0..n {
                anyhow::ensure!(
                    c[i * n + j] == want(&a, &w, k, i, j),
                    "entry ({i}, {j}) of {m}×{n}"
                );
            }
        }
        Ok(())
    }

    /// `c += x·Wᵀ` for row-major `x` `[m, k]`, `w` `[n, k]`, `c` `[m, n]`: a dense layer's
    /// output started from its bias.
    pub fn dense(&self, x: &[f32], m: usize, k: usize, w: &[f32], n: usize, c: &mut [f32]) {
        assert!(x.len() == m * k && w.len() == n * k && c.len() == m * n);
        // SAFETY: each block's operands lie in `x`, `w` and its columns of `c`.
        blocks(m, n, c, |rows, cols, c| unsafe {
            self.sgemm(
                (rows.len(), cols.len(), k),
                Operand::rows(x.as_ptr().add(rows.start * k), k),
                Operand::transposed(w.as_ptr().add(cols.start * k), k),
                1.0,
                c,
                n,
            )
        });
    }

    /// `a·b` for row-major `a` `[m, k]` and `b` `[k, n]` (`a` read transposed from a row-major
    /// `[k, m]` when `a_t`): the products of a dense layer's backward pass (`g·W`, `gᵀ·x`).
    pub fn matmul(
        &self,
        a: &[f32],
        a_t: bool,
        b: &[f32],
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f32> {
        assert!(a.len() == m * k && b.len() == k * n);
        let mut c = vec![0f32; m * n];
        // SAFETY: each block's operands lie in `a`, `b` and its columns of `c`.
        blocks(m, n, &mut c, |rows, cols, c| unsafe {
            let a = if a_t {
                Operand::transposed(a.as_ptr().add(rows.start), m)
            } else {
                Operand::rows(a.as_ptr().add(rows.start * k), k)
            };
            let b = Operand::rows(b.as_ptr().add(cols.start), n);
            self.sgemm((rows.len(), cols.len(), k), a, b, 0.0, c, n)
        });
        c
    }

    /// `c = a·b + beta·c` for an `[m, n]` block at `c` (rows `ldc` apart), `a` `[m, k]` and `b`
    /// `[k, n]` as their operands describe them: the one call into the library.
    ///
    /// # Safety
    /// The operands and `c` hold every element these sizes and strides reach.
    unsafe fn sgemm(
        &self,
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b: Operand,
        beta: f32,
        c: *mut f32,
        ldc: usize,
    ) {
        (self.cblas_sgemm)(
            ROW_MAJOR,
            a.trans,
            b.trans,
            dim(m),
            dim(n),
            dim(k),
            1.0,
            a.at,
            dim(a.ld.max(1)),
            b.at,
            dim(b.ld.max(1)),
            beta,
            c,
            dim(ldc.max(1)),
        )
    }
}

/// Whether OpenBLAS's kernels `core` (its `openblas_get_corename`) predate AVX2 on a CPU that has
/// it. OpenBLAS picks its kernels by CPU model, and a release older than the CPU falls back to
/// SSE3 ones (`Prescott`): Debian 12's 0.3.21 does so on current Xeons, at 30 GFLOP/s a core
/// where its `SkylakeX` kernels reach 130–150 and the built-in GEMM 110–140.
fn pre_avx2_openblas_core(core: &str, cpu_avx2: bool) -> bool {
    // OpenBLAS's x86-64 kernel sets that use AVX2 and FMA.
    const AVX2: [&str; 6] = [
        "haswell",
        "zen",
        "skylakex",
        "cooperlake",
        "sapphirerapids",
        "excavator",
    ];
    cpu_avx2 && !AVX2.contains(&core.trim().to_ascii_lowercase().as_str())
}

/// A row-major operand of `cblas_sgemm`: its first element, its row stride, and whether the
/// product reads it transposed.
#[derive(Clone, Copy)]
struct Operand {
    at: *const f32,
    ld: usize,
    trans: c_int,
}

impl Operand {
    /// The matrix as stored, rows `ld` apart.
    fn rows(at: *const f32, ld: usize) -> Self {
        Self {
            at,
            ld,
            trans: NO_TRANS,
        }
    }

    /// The transpose of the matrix stored with rows `ld` apart.
    fn transposed(at: *const f32, ld: usize) -> Self {
        Self {
            at,
            ld,
            trans: TRANS,
        }
    }
}

/// Runs `f(rows, cols, c_block)` over blocks of the `[m, n]` output `c` on the rayon
/// threads: column blocks (each thread multiplies its own part of the weights), or row
/// blocks when there are too few columns to share.
fn blocks(
    m: usize,
    n: usize,
    c: &mut [f32],
    f: impl Fn(std::ops::Range<usize>, std::ops::Range<usize>, *mut f32) + Sync,
) {
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let out = Out(c.as_mut_ptr());
    // Column blocks of a multiple of 64 (whole cache lines and micro-panels).
    let by_cols = n.div_ceil(64) >= threads;
    let parts = if by_cols {
        threads.min(n.div_ceil(64))
    } else {
        threads.min(m)
    };
    (0..parts).into_par_iter().for_each(|p| {
        if by_cols {
            let units = n.div_ceil(64);
            let cols = (units * p / parts * 64).min(n)..(units * (p + 1) / parts * 64).min(n);
            f(0..m, cols.clone(), out.at(cols.start));
        } else {
            let rows = m * p / parts..m * (p + 1) / parts;
            f(rows.clone(), 0..n, out.at(rows.start * n));
        }
    });
}

/// The output, shared by threads that write disjoint blocks of it.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: each block is written by one thread only.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The output from element `at` on (a method, so that closures capture the `Send` wrapper,
    /// not its bare pointer).
    fn at(self, at: usize) -> *mut f32 {
        self.0.wrapping_add(at)
    }
}

fn dim(x: usize) -> c_int {
    c_int::try_from(x).expect("a matrix dimension over 2³¹ (LP64 BLAS)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unset variable means the built-in GEMM; a library that is not a BLAS is refused with
    /// a reason.
    #[test]
    fn libraries_without_cblas_sgemm_are_refused() {
        let e = Blas::load(PathBuf::from("/nonexistent/libblas.so"))
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("cannot load it"), "{e:#}");
        // A named pipe is refused, not opened (opening one waits for a writer, forever).
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("libblas.so");
        if std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .is_ok_and(|s| s.success())
        {
            let e = Blas::load(fifo).err().unwrap();
            assert!(format!("{e:#}").contains("not a file"), "{e:#}");
        }
        // libc is a shared library without `cblas_sgemm`.
        if let Some(libc) = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib64/libc.so.6"]
            .iter()
            .find(|p| std::path::Path::new(p).exists())
        {
            let e = Blas::load(PathBuf::from(libc)).err().unwrap();
            assert!(format!("{e:#}").contains("no `cblas_sgemm`"), "{e:#}");
        }
    }

    /// OpenBLAS's SSE-era kernels on an AVX2 CPU are refused; its AVX2 and AVX-512 ones, and
    /// any kernels on a CPU without AVX2, are used.
    #[test]
    fn openblas_kernels_older_than_the_cpu_are_refused() {
        for core in [
            "Prescott",
            "Core2",
            "Nehalem",
            "Sandybridge",
            "Katmai",
            "Barcelona",
        ] {
            assert!(pre_avx2_openblas_core(core, true), "{core}");
            assert!(!pre_avx2_openblas_core(core, false), "{core}");
        }
        for core in [
            "Haswell",
            "SkylakeX",
            "Cooperlake",
            "SapphireRapids",
            "Zen",
            "EXCAVATOR",
        ] {
            assert!(!pre_avx2_openblas_core(core, true), "{core}");
        }
    }

    /// With `CLIPFT_BLAS` set (a run with MKL or OpenBLAS), the library's products equal the
    /// plain loops, in every block split.
    #[test]
    fn the_loaded_blas_multiplies_like_the_loops() {
        let Some(blas) = get() else {
            eprintln!("skipped: {ENV} not set");
            return;
        };
        for &(m, k, n) in &[(1, 1, 1), (13, 7, 33), (50, 300, 200), (3, 64, 700)] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 9) as f32 - 4.0) / 8.0)
                .collect();
            let mut c = vec![0.5f32; m * n];
            blas.dense(&x, m, k, &w, n, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = 0.5
                        + (0..k)
                            .map(|t| f64::from(x[i * k + t]) * f64::from(w[j * k + t]))
                            .sum::<f64>();
                    assert!((f64::from(c[i * n + j]) - want).abs() < 1e-3, "{m}×{k}×{n}");
                }
            }
            // g·W and gᵀ·x, as the backward pass takes them.
            let g = &x; // [m, k]
            let b: Vec<f32> = w[..k * n].to_vec(); // [k, n]
            let y = blas.matmul(g, false, &b, m, k, n);
            let gt: Vec<f32> = (0..k * m).map(|i| x[(i % m) * k + i / m]).collect(); // [k, m]
            let yt = blas.matmul(&gt, true, &b, m, k, n);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k)
                        .map(|t| f64::from(g[i * k + t]) * f64::from(b[t * n + j]))
                        .sum();
                    assert!((f64::from(y[i * n + j]) - want).abs() < 1e-3);
                    assert!((f64::from(yt[i * n + j]) - want).abs() < 1e-3);
                }
            }
        }
    }
}

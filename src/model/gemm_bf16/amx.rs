//! The dense layers on Intel AMX (Sapphire Rapids and later): `TDPBF16PS` multiplies a 16-row
//! tile of bf16 pairs by a 16-pair tile in one instruction, several times the `vdpbf16ps` rate
//! (PyTorch's bf16 reaches it through oneDNN). The operands are the same packed layout the
//! AVX-512 kernel reads: a weight panel's k pair rows are 128 bytes (32 columns' pairs), so its
//! left and right 16 columns are two B tiles 128 bytes apart; the input is rows of pairs, so
//! 16 rows × 16 pairs is an A tile with the row length as stride.
//!
//! Rust has no stable AMX intrinsics, so the tile instructions are inline assembly. They cannot
//! run on a CPU without AMX, so the loops around them are tested with a software model of the
//! instructions ([`Emulated`]), and the hardware kernel is used only after it has reproduced the
//! portable kernel's products on this machine ([`super::kernel`]).

use std::sync::OnceLock;

use super::NR;

/// Output rows per block: two 16-row tiles.
pub(super) const ROWS: usize = 32;
/// k pairs per tile product (64-byte tile rows).
pub(super) const STEP: usize = 16;

/// The tile unit as the block loop uses it: configure the tiles on this thread, multiply one
/// `ROWS × NR` block, release the tiles.
pub(super) trait TileUnit {
    /// # Safety
    /// The CPU has AMX and the process may use it ([`available`]), for the hardware unit.
    unsafe fn configure();
    /// # Safety
    /// After [`TileUnit::configure`] on this thread.
    unsafe fn release();
    /// `c = Σ A·B` over `steps` × [`STEP`] k pairs, for the `ROWS × NR` block whose input rows
    /// start at `a` (`lda` pairs apart) and whose weight panel rows start at `b` (`NR` pairs
    /// apart); `c` is `ROWS × NR` f32, row-major.
    ///
    /// # Safety
    /// `a` holds `ROWS` rows of `steps · STEP` pairs, `lda` apart; `b` holds `steps · STEP`
    /// rows of `NR` pairs; `c` holds `ROWS · NR` floats; the tiles are configured.
    unsafe fn block(a: *const u32, lda: usize, b: *const u32, steps: usize, c: *mut f32);
}

/// Whether the CPU has AMX-TILE and AMX-BF16 and the OS lets this process use the tile
/// registers (Linux asks each process to request them).
pub(super) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| cpu_has_amx() && request_tile_data())
}

#[cfg(target_arch = "x86_64")]
fn cpu_has_amx() -> bool {
    // `__cpuid_count` is a safe function in recent Rust, unsafe in older ones.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86_64 CPU.
    let cpuid = |leaf, sub| unsafe { std::arch::x86_64::__cpuid_count(leaf, sub) };
    let max_leaf = cpuid(0, 0).eax;
    if max_leaf < 0x1d {
        return false;
    }
    // Leaf 7, EDX bit 22: AMX-BF16, bit 24: AMX-TILE.
    let edx = cpuid(7, 0).edx;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
        return false;
    }
    // Leaf 0x1D.1, palette 1: the 8 tiles of 16 rows × 64 bytes that `CONFIG` asks for.
    let palette = cpuid(0x1d, 1);
    let (bytes_per_row, names, rows) = (
        palette.ebx & 0xffff,
        palette.ebx >> 16,
        palette.ecx & 0xffff,
    );
    bytes_per_row >= 64 && names >= 8 && rows >= 16
}

#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_amx() -> bool {
    false
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: without it the first tile instruction
/// raises SIGILL. It fails on kernels without AMX support (before 5.16), which then count as no
/// AMX.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_tile_data() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: this request only widens the register state the kernel saves for this process.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_tile_data() -> bool {
    false
}

/// `LDTILECFG`'s 64-byte operand: palette 1, tiles 0–7 of 16 rows × 64 bytes (C: 0–3, A: 4–5,
/// B: 6–7).
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    bytes_per_row: [u16; 16],
    rows: [u8; 16],
}

#[cfg(target_arch = "x86_64")]
static CONFIG: TileConfig = TileConfig {
    palette: 1,
    start_row: 0,
    reserved: [0; 14],
    bytes_per_row: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
    rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
};

/// The tiles configured on this thread until dropped (released even if a panic unwinds). Not
/// `Send`: the configuration belongs to the thread.
pub(super) struct Configured<T: TileUnit>(std::marker::PhantomData<*const T>);

impl<T: TileUnit> Configured<T> {
    /// # Safety
    /// As [`TileUnit::configure`].
    pub(super) unsafe fn new() -> Self {
        T::configure();
        Self(std::marker::PhantomData)
    }
}

impl<T: TileUnit> Drop for Configured<T> {
    fn drop(&mut self) {
        // SAFETY: configured in `new`, on this thread (the guard cannot move to another).
        unsafe { T::release() }
    }
}

/// The hardware tile unit.
pub(super) struct Amx;

#[cfg(target_arch = "x86_64")]
impl TileUnit for Amx {
    unsafe fn configure() {
        std::arch::asm!(
            "ldtilecfg [{cfg}]",
            cfg = in(reg) &CONFIG,
            options(nostack, readonly, preserves_flags)
        );
    }

    unsafe fn release() {
        std::arch::asm!("tilerelease", options(nostack, nomem, preserves_flags));
    }

    unsafe fn block(a: *const u32, lda: usize, b: *const u32, steps: usize, c: *mut f32) {
        use std::arch::asm;
        // Tile strides are in bytes.
        let (lda_bytes, ldb_bytes, ldc_bytes) = (lda * 4, NR * 4, NR * 4);
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem, preserves_flags)
        );
        for s in 0..steps {
            let a0 = a.add(s * STEP);
            let b0 = b.add(s * STEP * NR);
            // C[rows 0–15 | 16–31][cols 0–15 | 16–31] += A[rows] · B[cols].
            asm!(
                "tileloadd tmm4, [{a0} + {lda}*1]",
                "tileloadd tmm5, [{a1} + {lda}*1]",
                "tileloadd tmm6, [{b0} + {ldb}*1]",
                "tileloadd tmm7, [{b1} + {ldb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0,
                a1 = in(reg) a0.add(16 * lda),
                lda = in(reg) lda_bytes,
                b0 = in(reg) b0,
                b1 = in(reg) b0.add(16),
                ldb = in(reg) ldb_bytes,
                options(nostack, readonly, preserves_flags)
            );
        }
        asm!(
            "tilestored [{c0} + {ldc}*1], tmm0",
            "tilestored [{c1} + {ldc}*1], tmm1",
            "tilestored [{c2} + {ldc}*1], tmm2",
            "tilestored [{c3} + {ldc}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c.add(16),
            c2 = in(reg) c.add(16 * NR),
            c3 = in(reg) c.add(16 * NR + 16),
            ldc = in(reg) ldc_bytes,
            options(nostack, preserves_flags)
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
impl TileUnit for Amx {
    unsafe fn configure() {
        unreachable!("AMX is x86_64 only")
    }
    unsafe fn release() {}
    unsafe fn block(_: *const u32, _: usize, _: *const u32, _: usize, _: *mut f32) {
        unreachable!("AMX is x86_64 only")
    }
}

/// A software model of the block above, instruction by instruction (`TILELOADD`, `TDPBF16PS`,
/// `TILESTORED`), so the loops around the tile unit are tested on any CPU. Its products are
/// exact f32 products of the bf16 pairs; the hardware sums them in another order, so results
/// on inexact data agree within rounding (the tests' tolerance), exactly on exact data.
#[cfg(test)]
pub(super) struct Emulated;

#[cfg(test)]
impl TileUnit for Emulated {
    unsafe fn configure() {}
    unsafe fn release() {}

    unsafe fn block(a: *const u32, lda: usize, b: *const u32, steps: usize, c: *mut f32) {
        let bf = |bits: u32| f32::from_bits(bits << 16);
        // Four 16×16 accumulator tiles: [row half][column half].
        let mut acc = [[[[0f32; 16]; 16]; 2]; 2];
        for s in 0..steps {
            for (h, rows) in acc.iter_mut().enumerate() {
                // tileloadd tmm4/tmm5: 16 rows of 16 pairs, lda pairs apart.
                let tile_a = |m: usize, k: usize| *a.add(s * STEP + (16 * h + m) * lda + k);
                for (v, tile_c) in rows.iter_mut().enumerate() {
                    // tileloadd tmm6/tmm7: 16 k pair rows of 16 columns, NR pairs apart.
                    let tile_b = |k: usize, n: usize| *b.add((s * STEP + k) * NR + 16 * v + n);
                    for (m, row) in tile_c.iter_mut().enumerate() {
                        for k in 0..STEP {
                            let x = tile_a(m, k);
                            for (n, out) in row.iter_mut().enumerate() {
                                let w = tile_b(k, n);
                                *out += bf(x & 0xffff) * bf(w & 0xffff);
                                *out += bf(x >> 16) * bf(w >> 16);
                            }
                        }
                    }
                }
            }
        }
        for (h, rows) in acc.iter().enumerate() {
            for (v, tile_c) in rows.iter().enumerate() {
                for (m, row) in tile_c.iter().enumerate() {
                    for (n, &value) in row.iter().enumerate() {
                        *c.add((16 * h + m) * NR + 16 * v + n) = value;
                    }
                }
            }
        }
    }
}

//! Vectorised elementwise math for the CPU kernels: `e^x` and QuickGELU on AVX-512 and AVX2
//! lanes, QuickGELU and its gradient over slices (AVX-512 or AVX2 + FMA where the CPU has them,
//! libm otherwise), and the softmax's `e^x` written for the compiler to vectorise.
//!
//! libm's scalar `expf` made QuickGELU one of the costliest passes of an f32 layer (about 5%
//! of a ViT-B/32 layer, more than its layer norms and softmax together).

/// `x·σ(1.702·x)` over `x` into `out`.
pub fn quick_gelu(out: &mut [f32], x: &[f32]) {
    quick_gelu_on(isa(), out, x)
}

fn quick_gelu_on(isa: Option<Isa>, out: &mut [f32], x: &[f32]) {
    assert_eq!(out.len(), x.len());
    // SAFETY: `isa` was detected on this CPU; the lengths are equal (checked above).
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        Some(Isa::Avx512) => unsafe { quick_gelu_avx512(out, x) },
        #[cfg(target_arch = "x86_64")]
        Some(Isa::Avx2) => unsafe { quick_gelu_avx2(out, x) },
        _ => 0,
    };
    for (o, &x) in out[done..].iter_mut().zip(&x[done..]) {
        *o = x / (1.0 + (-1.702 * x).exp());
    }
}

/// QuickGELU's backward pass `g·σ(ax)·(1 + a·x·(1 − σ(ax)))` (a = 1.702) into `out`.
pub fn quick_gelu_grad(out: &mut [f32], x: &[f32], g: &[f32]) {
    quick_gelu_grad_on(isa(), out, x, g)
}

fn quick_gelu_grad_on(isa: Option<Isa>, out: &mut [f32], x: &[f32], g: &[f32]) {
    assert!(out.len() == x.len() && x.len() == g.len());
    // SAFETY: `isa` was detected on this CPU; the lengths are equal (checked above).
    let done = match isa {
        #[cfg(target_arch = "x86_64")]
        Some(Isa::Avx512) => unsafe { quick_gelu_grad_avx512(out, x, g) },
        #[cfg(target_arch = "x86_64")]
        Some(Isa::Avx2) => unsafe { quick_gelu_grad_avx2(out, x, g) },
        _ => 0,
    };
    for ((o, &x), &g) in out[done..].iter_mut().zip(&x[done..]).zip(&g[done..]) {
        let s = 1.0 / (1.0 + (-1.702 * x).exp());
        *o = g * s * (1.0 + 1.702 * x * (1.0 - s));
    }
}

/// The vector instructions the CPU kernels choose between at run time (here and in
/// [`super::attention_cpu`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx512,
    /// AVX2 with FMA (AMD Zen 1–3, Intel Haswell and later client CPUs).
    Avx2,
}

/// The widest of [`Isa`] this CPU has, if any.
pub(crate) fn isa() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Some(Isa::Avx512);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Some(Isa::Avx2);
        }
    }
    None
}

/// Whole 8-float blocks of [`quick_gelu`] with AVX2; returns how many floats it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quick_gelu_avx2(out: &mut [f32], x: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let n = x.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        let v = _mm256_loadu_ps(x.as_ptr().add(i));
        let e = exp8(_mm256_mul_ps(v, _mm256_set1_ps(-1.702)));
        let y = _mm256_div_ps(v, _mm256_add_ps(_mm256_set1_ps(1.0), e));
        _mm256_storeu_ps(out.as_mut_ptr().add(i), y);
    }
    n
}

/// Whole 8-float blocks of [`quick_gelu_grad`] with AVX2; returns how many floats it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quick_gelu_grad_avx2(out: &mut [f32], x: &[f32], g: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let one = _mm256_set1_ps(1.0);
    let a = _mm256_set1_ps(1.702);
    let n = x.len() / 8 * 8;
    for i in (0..n).step_by(8) {
        let x = _mm256_loadu_ps(x.as_ptr().add(i));
        let g = _mm256_loadu_ps(g.as_ptr().add(i));
        let e = exp8(_mm256_mul_ps(x, _mm256_set1_ps(-1.702)));
        let s = _mm256_div_ps(one, _mm256_add_ps(one, e));
        // 1 + a·x·(1 − s)
        let d = _mm256_fmadd_ps(_mm256_mul_ps(a, x), _mm256_sub_ps(one, s), one);
        _mm256_storeu_ps(
            out.as_mut_ptr().add(i),
            _mm256_mul_ps(_mm256_mul_ps(g, s), d),
        );
    }
    n
}

/// `e^x` on 8 lanes, within 2 ulp of libm for −87 ≤ x ≤ 88 ([`exp16`]'s reduction and
/// polynomial, `2^n` built in the exponent bits); 0 below that range and +∞ above it (where
/// libm's result is still finite up to 88.72: QuickGELU, the one user, gives the same either
/// way). NaN lanes give +∞, as [`exp16`] does; QuickGELU's `x` carries the NaN through.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn exp8(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let (lo, hi) = (_mm256_set1_ps(-87.0), _mm256_set1_ps(88.0));
    let below = _mm256_cmp_ps::<_CMP_LT_OQ>(x, lo);
    // Not x ≤ 88: above, NaN included (unordered).
    let above = _mm256_cmp_ps::<_CMP_NLE_UQ>(x, hi);
    let xc = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        xc,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    // ln2 in two parts so that n·ln2_hi is exact.
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), xc);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    // n ∈ [−126, 127] here: a normal power of two.
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    )));
    let y = _mm256_mul_ps(p, scale);
    let y = _mm256_andnot_ps(below, y);
    _mm256_blendv_ps(y, _mm256_set1_ps(f32::INFINITY), above)
}

/// Whole 16-float blocks of [`quick_gelu`]; returns how many floats it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quick_gelu_avx512(out: &mut [f32], x: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let n = x.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        let v = _mm512_loadu_ps(x.as_ptr().add(i));
        _mm512_storeu_ps(out.as_mut_ptr().add(i), quick_gelu16(v));
    }
    n
}

/// Whole 16-float blocks of [`quick_gelu_grad`]; returns how many floats it wrote.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn quick_gelu_grad_avx512(out: &mut [f32], x: &[f32], g: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let one = _mm512_set1_ps(1.0);
    let a = _mm512_set1_ps(1.702);
    let n = x.len() / 16 * 16;
    for i in (0..n).step_by(16) {
        let x = _mm512_loadu_ps(x.as_ptr().add(i));
        let g = _mm512_loadu_ps(g.as_ptr().add(i));
        let e = exp16(_mm512_mul_ps(x, _mm512_set1_ps(-1.702)));
        let s = _mm512_div_ps(one, _mm512_add_ps(one, e));
        // 1 + a·x·(1 − s)
        let d = _mm512_fmadd_ps(_mm512_mul_ps(a, x), _mm512_sub_ps(one, s), one);
        _mm512_storeu_ps(
            out.as_mut_ptr().add(i),
            _mm512_mul_ps(_mm512_mul_ps(g, s), d),
        );
    }
    n
}

/// QuickGELU `x / (1 + e^(−1.702·x))` on 16 lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn quick_gelu16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let e = exp16(_mm512_mul_ps(x, _mm512_set1_ps(-1.702)));
    _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e))
}

/// `e^x` on 16 lanes, within 2 ulp of libm: `x = n·ln2 + r` with |r| ≤ ln2/2, a degree-6
/// polynomial for `e^r` and `scalef` for the `2^n` (which also gives 0 and ∞ out of range).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp16(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // `min`/`max` return their second operand when one is NaN: `x` second keeps a NaN lane NaN
    // (a NaN attention score must reach the softmax's sum, not become e^100).
    let x = _mm512_max_ps(
        _mm512_set1_ps(-110.0),
        _mm512_min_ps(_mm512_set1_ps(100.0), x),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
    );
    // ln2 in two parts so that n·ln2_hi is exact.
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.0 / 720.0);
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// `e^x` for `x ≤ 0` (softmax scores minus their maximum) within a few ulp, written so the
/// compiler vectorises it on any SIMD width (the attention core's softmax):
/// `x = n·ln2 + r`, a degree-6 polynomial for `e^r`, `2^n` built in the exponent bits; below
/// the normal range (masked scores, −∞ included) it is 0.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    let below = x < -87.0;
    // Not `x.max(-87.0)`, which turns NaN into −87: a NaN score must reach the softmax's sum.
    let x = if below { -87.0 } else { x };
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    // ln2 in two parts so that n·ln2_hi is exact.
    let r = n.mul_add(-0.693_359_4, x);
    let r = n.mul_add(2.121_944_4e-4, r);
    let mut p: f32 = 1.0 / 720.0;
    for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = p.mul_add(r, c);
    }
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if below {
        0.0
    } else {
        p * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_and_zero_below_range() {
        let mut worst = 0f32;
        let mut x = -86.9f32;
        while x <= 0.0 {
            let want = x.exp();
            worst = worst.max(((exp_nonpositive(x) - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4.0 * f32::EPSILON, "relative error {worst}");
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            let lanes: [f32; 16] = unsafe {
                use std::arch::x86_64::*;
                let mut v = [0.5f32; 16];
                v[3] = f32::NAN;
                std::mem::transmute(exp16(_mm512_loadu_ps(v.as_ptr())))
            };
            assert!(lanes[3].is_nan() && lanes[0].is_finite(), "{lanes:?}");
        }
    }

    /// The vector paths this CPU can run, the scalar one (`None`) first.
    fn paths() -> Vec<Option<Isa>> {
        let mut v = vec![None];
        if isa() == Some(Isa::Avx512) {
            v.push(Some(Isa::Avx512));
        }
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            v.push(Some(Isa::Avx2));
        }
        v
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_exp_matches_libm() {
        if !paths().contains(&Some(Isa::Avx2)) {
            eprintln!("this CPU has no AVX2 + FMA; exp8 not checked");
            return;
        }
        use std::arch::x86_64::*;
        let exp8_of = |xs: [f32; 8]| {
            let mut got = [0f32; 8];
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(xs.as_ptr()))) };
            got
        };
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let xs: [f32; 8] = std::array::from_fn(|i| (x + i as f32 * 1e-3).min(88.0));
            for (g, x) in exp8_of(xs).iter().zip(xs) {
                let want = x.exp();
                worst = worst.max(((g - want) / want).abs());
            }
            x += 0.37;
        }
        assert!(worst < 4.0 * f32::EPSILON, "relative error {worst}");
        assert_eq!(exp8_of([0.0; 8])[0], 1.0);
        // Out of range: 0 below, ∞ above and for NaN (as exp16).
        let edge = exp8_of([
            -87.5,
            -200.0,
            f32::NEG_INFINITY,
            88.5,
            200.0,
            f32::INFINITY,
            f32::NAN,
            88.0,
        ]);
        assert_eq!(edge[..3], [0.0; 3]);
        assert_eq!(edge[3..7], [f32::INFINITY; 4]);
        assert!(edge[7].is_finite() && edge[7] > 1.6e38, "{}", edge[7]);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_matches_libm() {
        if isa() != Some(Isa::Avx512) {
            return;
        }
        use std::arch::x86_64::*;
        let mut worst = 0f32;
        let mut x = -104.0f32;
        while x < 88.0 {
            let xs: [f32; 16] = std::array::from_fn(|i| x + i as f32 * 1e-3);
            let mut got = [0f32; 16];
            // SAFETY: the CPU has AVX-512.
            unsafe { _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_loadu_ps(xs.as_ptr()))) };
            for (g, x) in got.iter().zip(xs) {
                let want = x.exp();
                if want.is_normal() {
                    worst = worst.max(((g - want) / want).abs());
                }
            }
            x += 0.37;
        }
        assert!(worst < 4.0 * f32::EPSILON, "relative error {worst}");
        // Out of range: 0 and ∞ as libm gives, and QuickGELU of large |x| stays finite.
        // SAFETY: the CPU has AVX-512.
        unsafe {
            let mut got = [0f32; 16];
            _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_set1_ps(-200.0)));
            assert_eq!(got[0], 0.0);
            _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_set1_ps(200.0)));
            assert_eq!(got[0], f32::INFINITY);
            _mm512_storeu_ps(got.as_mut_ptr(), quick_gelu16(_mm512_set1_ps(-500.0)));
            assert_eq!(got[0], 0.0);
            _mm512_storeu_ps(got.as_mut_ptr(), quick_gelu16(_mm512_set1_ps(500.0)));
            assert_eq!(got[0], 500.0);
        }
    }

    /// Both slice functions on every path this CPU runs against libm in f64, over lengths with
    /// and without a tail (the vector blocks and the scalar remainder), and over the range
    /// activations take; very large |x| and NaN as the scalar code gives them.
    #[test]
    fn slices_match_libm_with_tails() {
        for path in paths() {
            let quick_gelu = |y: &mut [f32], x: &[f32]| quick_gelu_on(path, y, x);
            let quick_gelu_grad =
                |dx: &mut [f32], x: &[f32], g: &[f32]| quick_gelu_grad_on(path, dx, x, g);
            let x = [-1e4, -500.0, -60.0, 60.0, 500.0, 1e4, f32::NAN, 0.0];
            let (mut y, mut dx) = ([0f32; 8], [0f32; 8]);
            quick_gelu(&mut y, &x);
            quick_gelu_grad(&mut dx, &x, &[1.0; 8]);
            let (mut y1, mut dx1) = ([0f32; 8], [0f32; 8]);
            quick_gelu_on(None, &mut y1, &x);
            quick_gelu_grad_on(None, &mut dx1, &x, &[1.0; 8]);
            assert_eq!(y[..6], y1[..6], "{path:?}");
            assert_eq!(dx[..6], dx1[..6], "{path:?}");
            assert!(y[6].is_nan() && dx[6].is_nan(), "{path:?}");
            slices_match_libm(quick_gelu, quick_gelu_grad);
        }
    }

    fn slices_match_libm(
        quick_gelu: impl Fn(&mut [f32], &[f32]),
        quick_gelu_grad: impl Fn(&mut [f32], &[f32], &[f32]),
    ) {
        for len in [0, 5, 16, 37, 1000] {
            let x: Vec<f32> = (0..len)
                .map(|i| -30.0 + 60.0 * ((i * 7919) % 1000) as f32 / 1000.0)
                .collect();
            let g: Vec<f32> = (0..len).map(|i| ((i % 13) as f32 - 6.0) / 3.0).collect();
            let (mut y, mut dx) = (vec![f32::NAN; len], vec![f32::NAN; len]);
            quick_gelu(&mut y, &x);
            quick_gelu_grad(&mut dx, &x, &g);
            for i in 0..len {
                let (xd, gd) = (x[i] as f64, g[i] as f64);
                let s = 1.0 / (1.0 + (-1.702 * xd).exp());
                let want_y = xd * s;
                let want_dx = gd * s * (1.0 + 1.702 * xd * (1.0 - s));
                assert!(
                    (y[i] as f64 - want_y).abs() <= 1e-6 * (1.0 + want_y.abs()),
                    "len {len}, x {}: {} vs {want_y}",
                    x[i],
                    y[i]
                );
                assert!(
                    (dx[i] as f64 - want_dx).abs() <= 1e-6 * (1.0 + want_dx.abs()),
                    "len {len}, x {}: {} vs {want_dx}",
                    x[i],
                    dx[i]
                );
            }
        }
    }
}

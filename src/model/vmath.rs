//! Vectorised elementwise math for the CPU kernels: `e^x` and QuickGELU on AVX-512 lanes,
//! QuickGELU and its gradient over slices (AVX-512 where the CPU has it, libm otherwise), and
//! the softmax's `e^x` written for the compiler to vectorise.
//!
//! libm's scalar `expf` made QuickGELU one of the costliest passes of an f32 layer (about 5%
//! of a ViT-B/32 layer, more than its layer norms and softmax together).

/// `x·σ(1.702·x)` over `x` into `out`.
pub fn quick_gelu(out: &mut [f32], x: &[f32]) {
    assert_eq!(out.len(), x.len());
    // SAFETY: the CPU has AVX-512F; the lengths are equal (checked above).
    let done = if avx512() {
        unsafe { quick_gelu_avx512(out, x) }
    } else {
        0
    };
    for (o, &x) in out[done..].iter_mut().zip(&x[done..]) {
        *o = x / (1.0 + (-1.702 * x).exp());
    }
}

/// QuickGELU's backward pass `g·σ(ax)·(1 + a·x·(1 − σ(ax)))` (a = 1.702) into `out`.
pub fn quick_gelu_grad(out: &mut [f32], x: &[f32], g: &[f32]) {
    assert!(out.len() == x.len() && x.len() == g.len());
    // SAFETY: the CPU has AVX-512F; the lengths are equal (checked above).
    let done = if avx512() {
        unsafe { quick_gelu_grad_avx512(out, x, g) }
    } else {
        0
    };
    for ((o, &x), &g) in out[done..].iter_mut().zip(&x[done..]).zip(&g[done..]) {
        let s = 1.0 / (1.0 + (-1.702 * x).exp());
        *o = g * s * (1.0 + 1.702 * x * (1.0 - s));
    }
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    return is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    false
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

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quick_gelu_avx512(_: &mut [f32], _: &[f32]) -> usize {
    unreachable!("AVX-512 is x86_64 only")
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn quick_gelu_grad_avx512(_: &mut [f32], _: &[f32], _: &[f32]) -> usize {
    unreachable!("AVX-512 is x86_64 only")
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
    let x = _mm512_max_ps(
        _mm512_min_ps(x, _mm512_set1_ps(100.0)),
        _mm512_set1_ps(-110.0),
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
    let x = x.max(-87.0);
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
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_matches_libm() {
        if !avx512() {
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

    /// Both slice functions against libm in f64, over lengths with and without a tail (the
    /// vector blocks and the scalar remainder), and over the range activations take.
    #[test]
    fn slices_match_libm_with_tails() {
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

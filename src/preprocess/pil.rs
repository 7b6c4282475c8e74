//! Pillow's resampling (`Image.resize`, libImaging/Resample.c), ported operation for operation:
//! filter weights in f64, normalised per output pixel, rounded to 22-bit fixed point, a horizontal
//! pass into 8-bit rows, then a vertical pass, each rounding and clipping to 8 bits. Matching it
//! exactly (not just closely) is what makes pixels equal to `CLIPImageProcessor`'s.

use image::RgbImage;

use super::Resample;

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

fn box_filter(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 {
        1.0
    } else {
        0.0
    }
}

fn hamming(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        1.0
    } else if x >= 1.0 {
        0.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x * (0.54 + 0.46 * x.cos())
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// `(filter, support)` of a Pillow convolution filter.
fn filter_of(r: Resample) -> (fn(f64) -> f64, f64) {
    match r {
        Resample::Bicubic => (bicubic, 2.0),
        Resample::Bilinear => (bilinear, 1.0),
        Resample::Box => (box_filter, 0.5),
        Resample::Hamming => (hamming, 1.0),
        Resample::Lanczos => (lanczos, 3.0),
        Resample::Nearest => unreachable!("nearest is not a convolution"),
    }
}

/// Per output pixel: first input index, number of taps, fixed-point weights (`ksize` each).
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` for the full input range `[0, in_size)`.
fn coeffs(in_size: usize, out_size: usize, filter: fn(f64) -> f64, support: f64) -> Coeffs {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero; clamping to 0 afterwards makes that a floor here.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for x in 0..n {
            let v = if ww != 0.0 { k[x] / ww } else { k[x] };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if v < 0.0 {
                (-0.5 + f) as i32
            } else {
                (0.5 + f) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs {
        bounds,
        ksize,
        weights,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes like `PIL.Image.resize((w, h), resample)` on an RGB image.
pub fn resize(img: &RgbImage, w: u32, h: u32, resample: Resample) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (w as usize, h as usize);
    if resample == Resample::Nearest {
        return nearest(img, out_w, out_h);
    }
    let (filter, support) = filter_of(resample);
    let horiz = coeffs(in_w, out_w, filter, support);
    let vert = coeffs(in_h, out_h, filter, support);
    let src = img.as_raw();
    let need_h = out_w != in_w;
    let need_v = out_h != in_h;

    // Horizontal pass over only the rows the vertical pass reads.
    let (first_row, rows, tmp_w, tmp): (usize, usize, usize, std::borrow::Cow<[u8]>) = if need_h {
        let first = vert.bounds[0].0;
        let last = vert.bounds[out_h - 1].0 + vert.bounds[out_h - 1].1;
        let rows = last - first;
        let mut tmp = vec![0u8; rows * out_w * 3];
        for (r, out_row) in tmp.chunks_exact_mut(out_w * 3).enumerate() {
            let in_row = &src[(first + r) * in_w * 3..(first + r + 1) * in_w * 3];
            for xx in 0..out_w {
                let (xmin, n) = horiz.bounds[xx];
                let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + n];
                let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
                for (x, &kx) in k.iter().enumerate() {
                    let p = &in_row[(x + xmin) * 3..(x + xmin) * 3 + 3];
                    ss[0] += p[0] as i32 * kx;
                    ss[1] += p[1] as i32 * kx;
                    ss[2] += p[2] as i32 * kx;
                }
                out_row[xx * 3] = clip8(ss[0]);
                out_row[xx * 3 + 1] = clip8(ss[1]);
                out_row[xx * 3 + 2] = clip8(ss[2]);
            }
        }
        (first, rows, out_w, std::borrow::Cow::Owned(tmp))
    } else {
        (0, in_h, in_w, std::borrow::Cow::Borrowed(src.as_slice()))
    };
    if !need_v {
        let out = tmp[..out_h * tmp_w * 3].to_vec();
        return RgbImage::from_raw(out_w as u32, out_h as u32, out).expect("size matches");
    }
    debug_assert!(rows >= 1);
    let mut out = vec![0u8; out_w * out_h * 3];
    for (yy, out_row) in out.chunks_exact_mut(out_w * 3).enumerate() {
        let (ymin, n) = vert.bounds[yy];
        let ymin = ymin - first_row;
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + n];
        for (i, o) in out_row.iter_mut().enumerate() {
            let mut ss = 1i32 << (PRECISION_BITS - 1);
            for (y, &ky) in k.iter().enumerate() {
                ss += tmp[(y + ymin) * tmp_w * 3 + i] as i32 * ky;
            }
            *o = clip8(ss);
        }
    }
    RgbImage::from_raw(out_w as u32, out_h as u32, out).expect("size matches")
}

/// Pillow's NEAREST resize: source pixel `floor((x + 0.5) * in / out)`.
fn nearest(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let mut out = RgbImage::new(out_w as u32, out_h as u32);
    for (x, y, p) in out.enumerate_pixels_mut() {
        let sx = (((x as f64 + 0.5) * in_w as f64 / out_w as f64) as usize).min(in_w - 1);
        let sy = (((y as f64 + 0.5) * in_h as f64 / out_h as f64) as usize).min(in_h - 1);
        *p = *img.get_pixel(sx as u32, sy as u32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values: Pillow's BICUBIC resize of a 7×5 gradient, horizontal pass then vertical
    /// (each pass a single-axis `Image.resize`, so independent of Pillow's pass order).
    #[test]
    fn matches_pillow_on_small_gradients() {
        let img = RgbImage::from_fn(7, 5, |x, y| {
            image::Rgb([(x * 36) as u8, (y * 60) as u8, ((x * y * 9) % 256) as u8])
        });
        let down = resize(&img, 4, 3, Resample::Bicubic);
        #[rustfmt::skip]
        let expected_down = [14, 21, 1, 75, 21, 7, 141, 21, 12, 202, 21, 18, 14, 120, 7, 75, 120, 37, 141, 120, 71, 202, 120, 101, 14, 219, 13, 75, 219, 68, 141, 219, 129, 202, 219, 184];
        assert_eq!(down.as_raw().as_slice(), expected_down.as_slice());
        let up = resize(&img, 11, 9, Resample::Bicubic);
        let picks: Vec<u8> = [0u32, 4, 8]
            .iter()
            .flat_map(|&y| [0u32, 5, 10].map(|x| up.get_pixel(x, y).0))
            .flatten()
            .collect();
        #[rustfmt::skip]
        let expected_up = [0, 0, 0, 108, 0, 0, 219, 0, 0, 0, 120, 0, 108, 120, 54, 219, 120, 109, 0, 245, 0, 108, 245, 110, 219, 245, 223];
        assert_eq!(picks, expected_up);
        // A constant image stays constant under every filter (weights are normalised).
        let flat = RgbImage::from_pixel(13, 9, image::Rgb([77, 128, 201]));
        for r in [
            Resample::Bicubic,
            Resample::Bilinear,
            Resample::Lanczos,
            Resample::Box,
            Resample::Hamming,
            Resample::Nearest,
        ] {
            let out = resize(&flat, 5, 17, r);
            assert!(out.pixels().all(|p| p.0 == [77, 128, 201]), "{r:?}");
        }
    }
}

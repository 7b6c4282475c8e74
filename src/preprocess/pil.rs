//! Pillow's resampling (`Image.resize`, libImaging/Resample.c), ported operation for operation:
//! filter weights in f64, normalised per output pixel, rounded to 22-bit fixed point, a horizontal
//! pass into 8-bit rows, then a vertical pass, each rounding and clipping to 8 bits. Matching it
//! exactly (not just closely) is what makes pixels equal to `CLIPImageProcessor`'s.
//!
//! The pass order is Pillow 13's: the vertical pass first when the height shrinks by more than
//! twice as many pixels as the width does (tall images; Pillow ≤ 12 always went horizontal
//! first). The 8-bit rounding between the passes makes the order visible in the pixels.

use std::cell::RefCell;
use std::rc::Rc;

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
        // Pillow's constants are C floats (`0.54f + 0.46f * cos(x)`): their f32 values matter
        // to the 22-bit weights.
        x.sin() / x * (0.54f32 as f64 + 0.46f32 as f64 * x.cos())
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

/// Coefficient tables recently used on this thread, most recent first: a dataset's images
/// come in a few sizes, and a table costs about as much as 2% of decoding and resizing an image.
const COEFFS_CACHED: usize = 16;

type CoeffsKey = (usize, usize, Resample);

thread_local! {
    static COEFFS: RefCell<Vec<(CoeffsKey, Rc<Coeffs>)>> = const { RefCell::new(Vec::new()) };
}

/// [`coeffs`] for `resample`, from this thread's cache when it was computed recently.
fn cached_coeffs(in_size: usize, out_size: usize, resample: Resample) -> Rc<Coeffs> {
    let key = (in_size, out_size, resample);
    COEFFS.with(|cache| {
        let mut cache = cache.borrow_mut();
        let entry = match cache.iter().position(|(k, _)| *k == key) {
            Some(i) => cache.remove(i),
            None => {
                let (filter, support) = filter_of(resample);
                (key, Rc::new(coeffs(in_size, out_size, filter, support)))
            }
        };
        let table = Rc::clone(&entry.1);
        cache.insert(0, entry);
        cache.truncate(COEFFS_CACHED);
        table
    })
}

/// Intermediate buffers of the two passes, kept per thread: fresh ones would be zeroed for
/// every image (about 0.7 MB for a 500×375 photo). Every byte the passes read is written
/// first for the current image, so what earlier images left behind is never used.
#[derive(Default)]
struct Scratch {
    /// The source window, transposed.
    src_t: Vec<u8>,
    /// One filtered column.
    col: Vec<u8>,
    /// The horizontal pass's output.
    tmp: Vec<u8>,
    /// The vertical pass's output when it runs first.
    mid: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's [`Scratch`] (taken out for the call, so the hot loops are not
/// compiled inside a closure, which would not get the caller's target features).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    let mut bufs = SCRATCH.with(RefCell::take);
    let r = f(&mut bufs);
    // A very large photo's buffers are not worth keeping for the images after it.
    for buf in [&mut bufs.src_t, &mut bufs.col, &mut bufs.tmp, &mut bufs.mid] {
        if buf.capacity() > SCRATCH_KEEP_MAX {
            *buf = Vec::new();
        }
    }
    SCRATCH.with(|s| *s.borrow_mut() = bufs);
    r
}

/// Largest scratch buffer kept for the next image (a 4000×3000 photo's transposed source is
/// about 36 MB; a 500×375 one's 0.4 MB).
const SCRATCH_KEEP_MAX: usize = 16 << 20;

/// `buf` with at least `len` bytes, the first `len` of them to be overwritten by the caller.
fn scratch(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len {
        buf.resize(len, 0);
    }
    &mut buf[..len]
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes like `PIL.Image.resize((w, h), resample)` on an RGB image.
pub fn resize(img: &RgbImage, w: u32, h: u32, resample: Resample) -> RgbImage {
    resize_region(img, w, h, resample, (0, 0, w, h))
}

/// The `(x, y, width, height)` window of `resize(img, w, h, resample)`, computing only the pixels
/// inside it (each output pixel is computed independently, so they are the same values). A centre
/// crop after a shortest-edge resize skips a quarter of the work on 4:3 images this way.
pub fn resize_region(
    img: &RgbImage,
    w: u32,
    h: u32,
    resample: Resample,
    (x0, y0, rw, rh): (u32, u32, u32, u32),
) -> RgbImage {
    assert!(
        x0 + rw <= w && y0 + rh <= h,
        "window outside the resized image"
    );
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (w as usize, h as usize);
    let (x0, y0, rw, rh) = (x0 as usize, y0 as usize, rw as usize, rh as usize);
    if resample == Resample::Nearest {
        return nearest(img, out_w, out_h, (x0, y0, rw, rh));
    }
    let horiz = (out_w != in_w).then(|| cached_coeffs(in_w, out_w, resample));
    let vert = (out_h != in_h).then(|| cached_coeffs(in_h, out_h, resample));
    let args = Passes {
        src: img.as_raw(),
        in_w,
        horiz: horiz.as_deref(),
        vert: vert.as_deref(),
        window: (x0, y0, rw, rh),
        vertical_first: vertical_first(in_w, in_h, out_w, out_h),
    };
    let out = with_scratch(|bufs| {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { passes_avx2(&args, bufs) };
        }
        passes(&args, bufs)
    });
    RgbImage::from_raw(rw as u32, rh as u32, out).expect("size matches")
}

/// Pillow 13's pass order (`ImagingResampleInner`): vertical first when the height shrinks by
/// more than twice as many pixels as the width (which may grow) does.
fn vertical_first(in_w: usize, in_h: usize, out_w: usize, out_h: usize) -> bool {
    let dh = in_h as i64 - out_h as i64;
    let dw = in_w as i64 - out_w as i64;
    dh > 0 && dh > dw * 2
}

/// The inputs of the two resampling passes.
struct Passes<'a> {
    src: &'a [u8],
    in_w: usize,
    /// `None` when the width does not change (Pillow then skips the pass).
    horiz: Option<&'a Coeffs>,
    vert: Option<&'a Coeffs>,
    window: (usize, usize, usize, usize),
    /// Run the vertical pass first ([`vertical_first`]).
    vertical_first: bool,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn passes_avx2(a: &Passes, bufs: &mut Scratch) -> Vec<u8> {
    passes(a, bufs)
}

/// One output line of either pass: `out[i] = clip8(init + Σ_t src[t * stride + i] · k[t])`, the
/// taps' source lines `stride` bytes apart. Integer sums are exact, so any order gives Pillow's
/// value; 16 outputs at a time are summed over all taps in registers (this vectorises).
#[inline(always)]
fn filter_line(out: &mut [u8], src: &[u8], stride: usize, k: &[i32]) {
    const W: usize = 32;
    let init = 1i32 << (PRECISION_BITS - 1);
    let len = out.len();
    assert!(
        k.is_empty() || (k.len() - 1) * stride + len <= src.len(),
        "taps inside src"
    );
    let whole = len / W * W;
    for i in (0..whole).step_by(W) {
        let mut acc = [init; W];
        for (t, &kt) in k.iter().enumerate() {
            let line: &[u8; W] = src[t * stride + i..][..W].try_into().expect("W bytes");
            for (a, &p) in acc.iter_mut().zip(line) {
                *a += p as i32 * kt;
            }
        }
        for (o, &a) in out[i..i + W].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    for i in whole..len {
        let sum = k
            .iter()
            .enumerate()
            .fold(init, |a, (t, &kt)| a + src[t * stride + i] as i32 * kt);
        out[i] = clip8(sum);
    }
}

/// Both passes over the window, returning its `rw × rh × 3` bytes. Integer sums are exact, so
/// accumulating a whole row (or column) tap by tap, which vectorises, gives Pillow's per-pixel
/// values.
#[inline(always)]
fn passes(a: &Passes, bufs: &mut Scratch) -> Vec<u8> {
    let (x0, y0, rw, rh) = a.window;
    let (src, in_w) = (a.src, a.in_w);
    let row_len = rw * 3;
    let row_stride = row_len + 1;
    let Scratch {
        src_t,
        col,
        tmp,
        mid,
    } = bufs;

    if let (true, Some(v), Some(_)) = (a.vertical_first, a.vert, a.horiz) {
        // Vertical pass over whole source rows (the crop of a tall image keeps about its full
        // width anyway), then the horizontal pass over its output.
        let line = in_w * 3;
        let mid = scratch(mid, rh * line);
        for (yy, mid_row) in mid.chunks_exact_mut(line).enumerate() {
            let (ymin, n) = v.bounds[y0 + yy];
            let k = &v.weights[(y0 + yy) * v.ksize..][..n];
            filter_line(mid_row, &src[ymin * line..], line, k);
        }
        let tmp = scratch(tmp, rh * row_stride);
        let rows = Rows {
            src: mid,
            in_w,
            first: 0,
            count: rh,
        };
        horizontal(&rows, (x0, rw), a.horiz, tmp, src_t, col);
        return unpad(tmp, row_stride, row_len);
    }

    // Source rows the vertical pass reads (the window's own rows when there is no vertical pass).
    let (first, count) = match a.vert {
        Some(v) if rh > 0 => {
            let first = v.bounds[y0].0;
            let (lmin, ln) = v.bounds[y0 + rh - 1];
            (first, lmin + ln - first)
        }
        _ => (y0, rh),
    };
    let tmp = scratch(tmp, count * row_stride);
    let rows = Rows {
        src,
        in_w,
        first,
        count,
    };
    horizontal(&rows, (x0, rw), a.horiz, tmp, src_t, col);
    let Some(v) = a.vert else {
        return unpad(tmp, row_stride, row_len);
    };

    // Vertical pass, a whole output row at a time.
    let mut out = vec![0u8; rw * rh * 3];
    for (yy, out_row) in out.chunks_exact_mut(row_len.max(1)).enumerate().take(rh) {
        let (ymin, n) = v.bounds[y0 + yy];
        let k = &v.weights[(y0 + yy) * v.ksize..][..n];
        filter_line(out_row, &tmp[(ymin - first) * row_stride..], row_stride, k);
    }
    out
}

/// Rows `first..first + count` of an RGB image `in_w` pixels wide.
struct Rows<'a> {
    src: &'a [u8],
    in_w: usize,
    first: usize,
    count: usize,
}

/// Horizontal pass of `rows` over output columns `x0..x0 + rw` into `tmp`: `rows.count` lines of
/// `rw` pixels, `rw * 3 + 1` bytes apart (a copy when `h` is `None`: the width does not change).
/// Done on the transposed image, so that each output column is a sum of whole source columns
/// (contiguous after the transpose). Both transposes move pixels as 4-byte words (one load, one
/// store instead of a 2- and a 1-byte copy): each word's fourth byte lands on the next pixel's
/// first, which is written after it, or on a spare byte at the end of a line.
#[inline(always)]
fn horizontal(
    rows: &Rows,
    (x0, rw): (usize, usize),
    h: Option<&Coeffs>,
    tmp: &mut [u8],
    src_t: &mut Vec<u8>,
    col: &mut Vec<u8>,
) {
    let Rows {
        src,
        in_w,
        first,
        count,
    } = *rows;
    let row_len = rw * 3;
    let row_stride = row_len + 1;
    match h {
        None => {
            for (r, line) in tmp.chunks_exact_mut(row_stride).enumerate() {
                let start = ((first + r) * in_w + x0) * 3;
                line[..row_len].copy_from_slice(&src[start..start + row_len]);
            }
        }
        Some(h) if rw > 0 && count > 0 => {
            let cx0 = h.bounds[x0].0;
            let (lx, ln) = h.bounds[x0 + rw - 1];
            let cols = lx + ln - cx0;
            let col_len = count * 3;
            let col_stride = col_len + 1;
            let src_t = scratch(src_t, cols * col_stride);
            for r in 0..count {
                // With the byte after the window where there is one, for the last word.
                let start = ((first + r) * in_w + cx0) * 3;
                let row = &src[start..(start + cols * 3 + 1).min(src.len())];
                transpose_row(row, &mut src_t[r * 3..], col_stride);
            }
            let col = scratch(col, col_len + 1);
            for xx in 0..rw {
                let (xmin, n) = h.bounds[x0 + xx];
                let k = &h.weights[(x0 + xx) * h.ksize..][..n];
                filter_line(
                    &mut col[..col_len],
                    &src_t[(xmin - cx0) * col_stride..],
                    col_stride,
                    k,
                );
                transpose_row(col, &mut tmp[xx * 3..], row_stride);
            }
        }
        Some(_) => {}
    }
}

/// The `row_len` bytes of each `row_stride`-byte line of `tmp`, packed.
fn unpad(tmp: &[u8], row_stride: usize, row_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(tmp.len() / row_stride * row_len);
    for line in tmp.chunks_exact(row_stride) {
        out.extend_from_slice(&line[..row_len]);
    }
    out
}

/// Writes the pixels of `line` (3 bytes each) `stride` bytes apart into `out`: pixel `i` to
/// `out[i * stride..][..3]`, clobbering `out[i * stride + 3]`. The last pixel is copied as 3
/// bytes when `line` has no fourth byte to read after it.
#[inline(always)]
fn transpose_row(line: &[u8], out: &mut [u8], stride: usize) {
    let n = line.len() / 3;
    let whole = if line.len() > 3 * n {
        n
    } else {
        n.saturating_sub(1)
    };
    assert!(
        n == 0 || (n - 1) * stride + 4 <= out.len(),
        "room for every word"
    );
    for i in 0..whole {
        // SAFETY: `3i + 4 <= line.len()` (i < whole) and `i * stride + 4 <= out.len()` (asserted
        // for the last i); unaligned 4-byte moves.
        unsafe {
            let word = std::ptr::read_unaligned(line.as_ptr().add(3 * i) as *const u32);
            std::ptr::write_unaligned(out.as_mut_ptr().add(i * stride) as *mut u32, word);
        }
    }
    for i in whole..n {
        out[i * stride..][..3].copy_from_slice(&line[3 * i..][..3]);
    }
}

/// Pillow's NEAREST resize (`ImagingScaleAffine`), over a window.
fn nearest(
    img: &RgbImage,
    out_w: usize,
    out_h: usize,
    (x0, y0, rw, rh): (usize, usize, usize, usize),
) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (xs, ys) = (nearest_table(in_w, out_w), nearest_table(in_h, out_h));
    let mut out = RgbImage::new(rw as u32, rh as u32);
    for (x, y, p) in out.enumerate_pixels_mut() {
        let (sx, sy) = (xs[x as usize + x0], ys[y as usize + y0]);
        *p = *img.get_pixel(sx as u32, sy as u32);
    }
    out
}

/// Source index of each output position as `ImagingScaleAffine` finds it: a running f64 sum
/// starting at half a step and adding the step once per position, truncated. Not
/// `floor((x + 0.5) · in / out)`: where that is a whole number the running sum can land just
/// below it and pick the previous pixel (500 → 42, column 10: 124, not 125).
fn nearest_table(in_size: usize, out_size: usize) -> Vec<usize> {
    let step = in_size as f64 / out_size as f64;
    let mut pos = step * 0.5;
    (0..out_size)
        .map(|_| {
            let i = (pos as usize).min(in_size - 1);
            pos += step;
            i
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Resample; 6] = [
        Resample::Bicubic,
        Resample::Bilinear,
        Resample::Lanczos,
        Resample::Box,
        Resample::Hamming,
        Resample::Nearest,
    ];

    #[test]
    fn transpose_row_places_every_pixel_and_stays_in_bounds() {
        for (n, spare) in [(1, 0), (1, 1), (5, 0), (5, 1), (5, 2)] {
            let line: Vec<u8> = (1..=(3 * n + spare) as u8).collect();
            let stride = 7;
            // Exactly the room the last word needs: out of bounds would panic.
            let mut out = vec![0u8; (n - 1) * stride + 4];
            transpose_row(&line, &mut out, stride);
            for i in 0..n {
                assert_eq!(
                    out[i * stride..][..3],
                    line[3 * i..][..3],
                    "n {n} pixel {i}"
                );
            }
        }
    }

    /// Pillow 13.0's NEAREST source columns where `floor((x + 0.5) · in / out)` picks the next
    /// one (read back from `Image.resize(..., NEAREST)` of an image whose pixels encode their
    /// column).
    #[test]
    fn nearest_picks_pillows_source_pixels() {
        assert_eq!(nearest_table(500, 42)[10], 124);
        let t = nearest_table(1024, 224);
        for (x, want) in [(3, 15), (10, 47), (24, 111), (80, 367), (220, 1007)] {
            assert_eq!(t[x], want, "1024 → 224, column {x}");
        }
        let t = nearest_table(768, 224);
        for (x, want) in [(45, 155), (52, 179), (94, 323)] {
            assert_eq!(t[x], want, "768 → 224, column {x}");
        }
        assert_eq!(nearest_table(375, 224)[223], 374);
    }

    /// Pillow 13.0's HAMMING resize of 448×448 hashed noise to 64×64, as two checksums of its
    /// bytes (`Σ v` and `Σ i·v`). Pillow's filter constants are C floats; with their f64 values
    /// 62 of the 64 outputs' fixed-point weights move by one unit (and a few pixels of other
    /// images by one level).
    #[test]
    fn hamming_matches_pillow() {
        let noise = |x: u32, y: u32, c: u64| {
            let v = (x as u64 * 2_654_435_761 + y as u64 * 40_503 + c * 977)
                .wrapping_mul(2_246_822_519);
            ((v >> 13) & 255) as u8
        };
        let img = RgbImage::from_fn(448, 448, |x, y| {
            image::Rgb([noise(x, y, 0), noise(x, y, 1), noise(x, y, 2)])
        });
        let out = resize(&img, 64, 64, Resample::Hamming);
        let sum: u64 = out.as_raw().iter().map(|&v| v as u64).sum();
        let weighted: u64 = out
            .as_raw()
            .iter()
            .enumerate()
            .map(|(i, &v)| i as u64 * v as u64)
            .sum();
        assert_eq!((sum, weighted), (1_566_763, 9_625_378_578));
        // Those pixels round alike either way; the weights do not: output 1's first tap is
        // 14362 with Pillow's float constants (libImaging/Resample.c transcribed), 14361 with
        // 0.54 and 0.46 as f64.
        let c = coeffs(448, 64, hamming, 1.0);
        assert_eq!(c.weights[c.ksize], 14362);
    }

    /// Expected values: Pillow 13.0's BICUBIC resize of a 7×15 pattern to 6×7 and to 9×4, where it
    /// runs the vertical pass first (the height shrinks by more than twice what the width does);
    /// horizontal first, as Pillow ≤ 12 did, gives other bytes.
    #[test]
    fn tall_images_take_pillow_13s_vertical_pass_first() {
        let img = RgbImage::from_fn(7, 15, |x, y| {
            image::Rgb([(x * 36) as u8, (y * 17) as u8, ((x * y * 9) % 256) as u8])
        });
        #[rustfmt::skip]
        let cases: [(u32, u32, &[u8]); 2] = [
            (6, 7, &[3, 11, 1, 44, 11, 7, 87, 11, 13, 129, 11, 20, 172, 11, 27, 213, 11, 33, 3, 45, 2, 44, 45, 30, 87, 45, 58, 129, 45, 86, 172, 45, 120, 213, 45, 153, 3, 83, 4, 44, 83, 54, 87, 83, 104, 129, 83, 165, 172, 83, 174, 213, 83, 100, 3, 119, 6, 44, 119, 77, 87, 119, 161, 129, 119, 202, 172, 119, 85, 213, 119, 109, 3, 155, 7, 44, 155, 106, 87, 155, 175, 129, 155, 100, 172, 155, 135, 213, 155, 158, 3, 193, 9, 44, 193, 140, 87, 193, 134, 129, 193, 95, 172, 193, 159, 213, 193, 97, 3, 227, 11, 44, 227, 162, 87, 227, 184, 129, 227, 175, 172, 227, 119, 213, 227, 189]),
            (9, 4, &[0, 25, 0, 22, 25, 8, 52, 25, 19, 80, 25, 29, 108, 25, 39, 136, 25, 50, 164, 25, 67, 194, 25, 82, 218, 25, 90, 0, 86, 0, 22, 86, 27, 52, 86, 65, 80, 86, 103, 108, 86, 146, 136, 86, 177, 164, 86, 152, 194, 86, 119, 218, 86, 113, 0, 152, 0, 22, 152, 49, 52, 152, 121, 80, 152, 166, 108, 152, 154, 136, 152, 114, 164, 152, 121, 194, 152, 135, 218, 152, 130, 0, 213, 0, 22, 213, 69, 52, 213, 178, 80, 213, 205, 108, 213, 73, 136, 213, 171, 164, 213, 149, 194, 213, 120, 218, 213, 157]),
        ];
        for (w, h, expected) in cases {
            assert!(vertical_first(7, 15, w as usize, h as usize));
            let out = resize(&img, w, h, Resample::Bicubic);
            assert_eq!(out.as_raw().as_slice(), expected, "{w}x{h}");
            let (f, sup) = filter_of(Resample::Bicubic);
            let (hc, vc) = (
                coeffs(7, w as usize, f, sup),
                coeffs(15, h as usize, f, sup),
            );
            let horizontal_first = passes(
                &Passes {
                    src: img.as_raw(),
                    in_w: 7,
                    horiz: Some(&hc),
                    vert: Some(&vc),
                    window: (0, 0, w as usize, h as usize),
                    vertical_first: false,
                },
                &mut Scratch::default(),
            );
            assert_ne!(
                horizontal_first.as_slice(),
                expected,
                "{w}x{h}: the order matters"
            );
        }
    }

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
        // A window is the same pixels as cropping the full resize, for every filter and for
        // windows touching each border.
        let photo = RgbImage::from_fn(23, 17, |x, y| {
            image::Rgb([
                (x * 11 + y * 3) as u8,
                (x * y * 7 % 256) as u8,
                (200 - x * 5) as u8,
            ])
        });
        let mut bufs = Scratch::default();
        for r in ALL {
            // (22, 9) and (30, 5): the vertical pass first (the second with the width growing).
            for (w, h) in [(11, 9), (23, 9), (11, 17), (40, 30), (22, 9), (30, 5)] {
                let full = resize(&photo, w, h, r);
                for win in [
                    (0, 0, w, h),
                    (1, 2, w - 3, h - 4),
                    (w - 5, h - 3, 5, 3),
                    (2, 0, 4, h),
                ] {
                    let part = resize_region(&photo, w, h, r, win);
                    if r != Resample::Nearest {
                        // The portable build of the passes (the AVX2 one runs above where the
                        // CPU has it): same bytes.
                        let (f, sup) = filter_of(r);
                        let hc = (w != 23).then(|| coeffs(23, w as usize, f, sup));
                        let vc = (h != 17).then(|| coeffs(17, h as usize, f, sup));
                        // Scratch buffers left over from every earlier size: what they hold
                        // must not matter.
                        let portable = passes(
                            &Passes {
                                src: photo.as_raw(),
                                in_w: 23,
                                horiz: hc.as_ref(),
                                vert: vc.as_ref(),
                                window: (
                                    win.0 as usize,
                                    win.1 as usize,
                                    win.2 as usize,
                                    win.3 as usize,
                                ),
                                vertical_first: vertical_first(23, 17, w as usize, h as usize),
                            },
                            &mut bufs,
                        );
                        assert_eq!(portable.as_slice(), part.as_raw().as_slice());
                    }
                    let crop =
                        image::imageops::crop_imm(&full, win.0, win.1, win.2, win.3).to_image();
                    assert_eq!(part, crop, "{r:?} {w}x{h} {win:?}");
                }
            }
        }
        assert!(vertical_first(23, 17, 22, 9) && vertical_first(23, 17, 30, 5));
        assert!(!vertical_first(23, 17, 11, 9) && !vertical_first(23, 17, 40, 30));
        // A constant image stays constant under every filter (weights are normalised).
        let flat = RgbImage::from_pixel(13, 9, image::Rgb([77, 128, 201]));
        for r in ALL {
            let out = resize(&flat, 5, 17, r);
            assert!(out.pixels().all(|p| p.0 == [77, 128, 201]), "{r:?}");
        }
    }
}

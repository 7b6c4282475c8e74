//! Image preprocessing identical to `transformers`' `CLIPImageProcessor`: convert to RGB, resize
//! the shortest edge with Pillow's antialiased filters (ported bit-exact in [`pil`]), centre-crop,
//! rescale, normalise.

pub mod pil;

use std::path::{Path, PathBuf};

use image::RgbImage;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

pub const OPENAI_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const OPENAI_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Pillow's resampling filters, by their `PIL.Image.Resampling` number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Resample {
    Nearest,
    Lanczos,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
}

impl Resample {
    pub fn from_pil(n: u64) -> Option<Self> {
        Some(match n {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => return None,
        })
    }
}

/// How the first resize is sized (`size` in `preprocessor_config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeTo {
    /// Shortest edge to this many pixels, aspect ratio kept (long edge truncated).
    ShortestEdge(u32),
    /// Exactly `(height, width)`.
    Exact(u32, u32),
}

/// The settings of a `CLIPImageProcessor`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessConfig {
    pub resize: Option<ResizeTo>,
    pub resample: Resample,
    /// `(height, width)` of the centre crop; equal to the vision tower's image size.
    pub crop: (u32, u32),
    pub do_center_crop: bool,
    pub rescale_factor: Option<f64>,
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
}

impl PreprocessConfig {
    /// `CLIPImageProcessor()` defaults for a tower of the given input size.
    pub fn openai(image_size: u32) -> Self {
        Self {
            resize: Some(ResizeTo::ShortestEdge(image_size)),
            resample: Resample::Bicubic,
            crop: (image_size, image_size),
            do_center_crop: true,
            rescale_factor: Some(1.0 / 255.0),
            mean: Some(OPENAI_MEAN),
            std: Some(OPENAI_STD),
        }
    }

    /// Parses `preprocessor_config.json`; missing keys take the `CLIPImageProcessor` defaults.
    pub fn from_json(text: &str, image_size: usize) -> Result<Self, String> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let obj = v.as_object().ok_or("expected a JSON object")?;
        let flag = |k: &str| obj.get(k).and_then(|x| x.as_bool()).unwrap_or(true);
        let size_of = |k: &str| -> Result<Option<ResizeTo>, String> {
            match obj.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(x) if x.is_u64() => {
                    Ok(Some(ResizeTo::ShortestEdge(x.as_u64().unwrap() as u32)))
                }
                Some(x) => {
                    let get = |f: &str| x.get(f).and_then(|y| y.as_u64()).map(|y| y as u32);
                    if let Some(s) = get("shortest_edge") {
                        Ok(Some(ResizeTo::ShortestEdge(s)))
                    } else if let (Some(h), Some(w)) = (get("height"), get("width")) {
                        Ok(Some(ResizeTo::Exact(h, w)))
                    } else {
                        Err(format!("`{k}` must be an integer, {{\"shortest_edge\": n}} or {{\"height\": h, \"width\": w}}"))
                    }
                }
            }
        };
        let triple = |k: &str, default: [f32; 3]| -> Result<[f32; 3], String> {
            match obj.get(k) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(x) => {
                    let v: Vec<f32> = serde_json::from_value(x.clone())
                        .map_err(|_| format!("`{k}` must be a list of numbers"))?;
                    match v.len() {
                        1 => Ok([v[0]; 3]),
                        3 => Ok([v[0], v[1], v[2]]),
                        _ => Err(format!("`{k}` must have 1 or 3 values")),
                    }
                }
            }
        };
        let s = image_size as u32;
        let resize = if flag("do_resize") {
            Some(size_of("size")?.unwrap_or(ResizeTo::ShortestEdge(s)))
        } else {
            None
        };
        let crop = match size_of("crop_size")? {
            Some(ResizeTo::ShortestEdge(c)) => (c, c),
            Some(ResizeTo::Exact(h, w)) => (h, w),
            None => (s, s),
        };
        let resample = match obj.get("resample") {
            None | Some(serde_json::Value::Null) => Resample::Bicubic,
            Some(x) => x
                .as_u64()
                .and_then(Resample::from_pil)
                .ok_or("`resample` must be a PIL filter number 0-5")?,
        };
        let rescale_factor = if flag("do_rescale") {
            Some(
                obj.get("rescale_factor")
                    .and_then(|x| x.as_f64())
                    .unwrap_or(1.0 / 255.0),
            )
        } else {
            None
        };
        let (mean, std) = if flag("do_normalize") {
            (
                Some(triple("image_mean", OPENAI_MEAN)?),
                Some(triple("image_std", OPENAI_STD)?),
            )
        } else {
            (None, None)
        };
        let std_ok = std.is_none_or(|s| s.iter().all(|&x| x > 0.0));
        if !std_ok {
            return Err("`image_std` values must be positive".into());
        }
        Ok(Self {
            resize,
            resample,
            crop,
            do_center_crop: flag("do_center_crop"),
            rescale_factor,
            mean,
            std,
        })
    }

    /// A short key that changes whenever the pixels this config produces would change.
    pub fn cache_key(&self) -> String {
        serde_json::to_string(self).expect("config serialises")
    }

    /// Output `(height, width)` of the resize step for an input of `(w, h)`, as `transformers`'
    /// `get_resize_output_image_size(default_to_square=False)` computes it.
    pub fn resized_size(&self, w: u32, h: u32) -> (u32, u32) {
        match self.resize {
            None => (w, h),
            Some(ResizeTo::Exact(rh, rw)) => (rw, rh),
            Some(ResizeTo::ShortestEdge(s)) => {
                let (short, long) = if w <= h { (w, h) } else { (h, w) };
                let new_long = (s as f64 * long as f64 / short as f64) as u32;
                if w <= h {
                    (s, new_long)
                } else {
                    (new_long, s)
                }
            }
        }
    }

    /// Pixels (CHW, f32) of one view of an image. `key` identifies the image (see
    /// [`View::Augment`]) so a random view does not depend on processing order.
    pub fn apply(&self, img: &RgbImage, view: &View, key: u64) -> Vec<f32> {
        let (ch, cw) = self.crop;
        let mut out = vec![0f32; 3 * ch as usize * cw as usize];
        self.normalize_into(
            &self.view_pixels(img, img.dimensions(), view, key),
            &mut out,
        );
        out
    }

    /// The 8-bit RGB pixels of `view` of an image decoded from one of `full_size`, before
    /// normalisation (`crop` in size). A reduced image is resampled to the size the full one
    /// would have been resized to, so the crop covers the same part of the picture.
    pub fn view_pixels(
        &self,
        img: &RgbImage,
        full_size: (u32, u32),
        view: &View,
        key: u64,
    ) -> RgbImage {
        match *view {
            View::Center | View::Flip => {
                let (w, h) = self.resized_size(full_size.0, full_size.1);
                let (ch, cw) = self.crop;
                let mut px = if self.do_center_crop && w >= cw && h >= ch {
                    // Only the crop's pixels of the resized image (same offsets as center_crop).
                    let (left, top) = ((w - cw) / 2, (h - ch) / 2);
                    pil::resize_region(img, w, h, self.resample, (left, top, cw, ch))
                } else if self.do_center_crop {
                    center_crop(&resize(img, w, h, self.resample), ch, cw)
                } else {
                    resize(img, w, h, self.resample)
                };
                if *view == View::Flip {
                    px = image::imageops::flip_horizontal(&px);
                }
                px
            }
            View::Augment {
                seed,
                epoch,
                scale_min,
                scale_max,
                flip_p,
            } => {
                debug_assert_eq!(
                    img.dimensions(),
                    full_size,
                    "augmented views decode in full"
                );
                // torchvision: RandomResizedCrop(crop, scale, ratio=(3/4, 4/3), bicubic) on the
                // original image (crop, then resize the crop), then RandomHorizontalFlip(flip_p).
                let mut rng = view_rng(seed, epoch, key);
                let (x, y, cw, ch) = random_resized_crop_box(
                    img.width(),
                    img.height(),
                    (scale_min, scale_max),
                    (3.0 / 4.0, 4.0 / 3.0),
                    &mut rng,
                );
                let crop = image::imageops::crop_imm(img, x, y, cw, ch).to_image();
                let mut px = resize(&crop, self.crop.1, self.crop.0, self.resample);
                if rng.random::<f64>() < flip_p {
                    px = image::imageops::flip_horizontal(&px);
                }
                px
            }
        }
    }

    /// The JPEG reduction (1, 2, 4 or 8) that [`Decode::Reduced`] applies to a `(w, h)` image
    /// for `view`: the largest that keeps the image at least as large as the resize output in
    /// both dimensions, as Pillow's `Image.draft(mode, resized_size)` picks it. 1 (no reduction)
    /// for augmented views, which crop the full image, and without a resize step.
    pub fn jpeg_reduction(&self, w: u32, h: u32, view: &View) -> u32 {
        if self.resize.is_none() || matches!(view, View::Augment { .. }) {
            return 1;
        }
        let (rw, rh) = self.resized_size(w, h);
        let scale = (w / rw.max(1)).min(h / rh.max(1));
        [8, 4, 2].into_iter().find(|&d| scale >= d).unwrap_or(1)
    }

    /// Reads and decodes the image at `path` for `view`, reduced while decoding when `decode`
    /// asks for it and the image is a JPEG large enough (see
    /// [`jpeg_reduction`](Self::jpeg_reduction)).
    pub fn load(&self, path: &Path, view: &View, decode: Decode) -> Result<Source, ImageError> {
        match decode {
            Decode::Exact => load_rgb(path).map(Source::full),
            Decode::Reduced => load_rgb_with(path, |w, h| self.jpeg_reduction(w, h, view)),
        }
    }

    /// [`read_view`](Self::read_view) then [`normalize_into`](Self::normalize_into): the pixels
    /// of `view` of the image at `path`, written into `out` (`3 × crop` values).
    pub fn read_into(
        &self,
        path: &Path,
        view: &View,
        decode: Decode,
        key: u64,
        out: &mut [f32],
    ) -> Result<(), ImageError> {
        let img = self.read_view(path, view, decode, key)?;
        self.normalize_into(&img, out);
        Ok(())
    }

    /// [`load`](Self::load) then [`view_pixels`](Self::view_pixels): the 8-bit pixels of `view`
    /// of the image at `path`.
    pub fn read_view(
        &self,
        path: &Path,
        view: &View,
        decode: Decode,
        key: u64,
    ) -> Result<RgbImage, ImageError> {
        let src = self.load(path, view, decode)?;
        Ok(self.view_pixels(&src.rgb, src.full_size, view, key))
    }

    /// Rescale and normalise in f32, operation for operation as `transformers` does (rescale in
    /// f64 then cast, then `(x - mean) / std` in f32), so values match to the last bit.
    pub fn normalize(&self, img: &RgbImage) -> Vec<f32> {
        let mut out = vec![0f32; 3 * img.width() as usize * img.height() as usize];
        self.normalize_into(img, &mut out);
        out
    }

    /// [`normalize`](Self::normalize) into `out` (CHW, `3 × w × h` values).
    pub fn normalize_into(&self, img: &RgbImage, out: &mut [f32]) {
        let lut = self.normalize_table();
        let n = img.width() as usize * img.height() as usize;
        assert_eq!(out.len(), 3 * n, "output holds 3 × {n} values");
        let (r, rest) = out.split_at_mut(n);
        let (g, b) = rest.split_at_mut(n);
        for (i, px) in img.as_raw().chunks_exact(3).enumerate() {
            r[i] = lut[0][px[0] as usize];
            g[i] = lut[1][px[1] as usize];
            b[i] = lut[2][px[2] as usize];
        }
    }

    /// The normalised value of every byte in every channel, `[channel][byte]`, computed with the
    /// exact formula: each output depends only on those two, so normalising is one lookup per
    /// value (on the decoding cores, or on a GPU from the 8-bit pixels).
    pub fn normalize_table(&self) -> [[f32; 256]; 3] {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (byte, v) in table.iter_mut().enumerate() {
                let x = byte as f64;
                let mut x = match self.rescale_factor {
                    Some(f) => (x * f) as f32,
                    None => x as f32,
                };
                if let (Some(m), Some(s)) = (self.mean, self.std) {
                    x = (x - m[c]) / s[c];
                }
                *v = x;
            }
        }
        lut
    }
}

/// How JPEG files are decoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decode {
    /// Full resolution: Pillow's pixels exactly.
    #[default]
    Exact,
    /// Reduced by 1/2, 1/4 or 1/8 inside libjpeg's inverse DCT when the image stays at least as
    /// large as the resize output (what Pillow's `Image.draft` does): much less decoding and
    /// resampling on large photos, pixels no longer exactly `CLIPImageProcessor`'s.
    Reduced,
}

/// An image decoded for preprocessing.
#[derive(Debug, Clone)]
pub struct Source {
    pub rgb: RgbImage,
    /// `(w, h)` of the full-resolution image: larger than `rgb` when it was reduced.
    pub full_size: (u32, u32),
}

impl Source {
    /// An image decoded at full resolution.
    pub fn full(rgb: RgbImage) -> Self {
        let full_size = rgb.dimensions();
        Self { rgb, full_size }
    }
}

/// Which view of an image to encode.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// `CLIPImageProcessor` output.
    Center,
    /// The centre crop, mirrored left to right.
    Flip,
    /// A seeded random resized crop of `scale_min..scale_max` of the area, flipped with
    /// probability `flip_p`; the same `(seed, epoch, image)` always gives the same view.
    Augment {
        seed: u64,
        epoch: u64,
        scale_min: f64,
        scale_max: f64,
        flip_p: f64,
    },
}

/// Pillow-exact resize of an RGB image to `(w, h)`.
pub fn resize(img: &RgbImage, w: u32, h: u32, resample: Resample) -> RgbImage {
    if img.width() == w && img.height() == h {
        return img.clone();
    }
    pil::resize(img, w, h, resample)
}

/// `transformers`' `center_crop`: offsets `(size - crop) // 2`; an image smaller than the crop is
/// padded with zeros around its centre first.
pub fn center_crop(img: &RgbImage, crop_h: u32, crop_w: u32) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (ch, cw) = (crop_h as i64, crop_w as i64);
    let (mut top, mut left) = ((h - ch).div_euclid(2), (w - cw).div_euclid(2));
    let (nh, nw) = (h.max(ch), w.max(cw));
    let (pad_top, pad_left) = ((nh - h) / 2, (nw - w) / 2);
    top += pad_top;
    left += pad_left;
    let mut out = RgbImage::new(crop_w, crop_h);
    for y in 0..ch {
        let sy = top + y - pad_top;
        if sy < 0 || sy >= h {
            continue;
        }
        for x in 0..cw {
            let sx = left + x - pad_left;
            if sx >= 0 && sx < w {
                out.put_pixel(x as u32, y as u32, *img.get_pixel(sx as u32, sy as u32));
            }
        }
    }
    out
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 tries at a random area and log-uniform
/// aspect ratio, then a centre crop clamped to the ratio range. Returns `(x, y, w, h)`.
pub fn random_resized_crop_box(
    width: u32,
    height: u32,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut impl Rng,
) -> (u32, u32, u32, u32) {
    let area = (width as f64) * (height as f64);
    let (log_lo, log_hi) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(log_lo..=log_hi).exp();
        let w = (target * aspect).sqrt().round() as i64;
        let h = (target / aspect).sqrt().round() as i64;
        if 0 < w && w <= width as i64 && 0 < h && h <= height as i64 {
            let y = rng.random_range(0..=(height as i64 - h)) as u32;
            let x = rng.random_range(0..=(width as i64 - w)) as u32;
            return (x, y, w as u32, h as u32);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio.0 {
        (width, (width as f64 / ratio.0).round() as u32)
    } else if in_ratio > ratio.1 {
        ((height as f64 * ratio.1).round() as u32, height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// A seeded generator for one augmented view, independent of processing order.
pub fn view_rng(seed: u64, epoch: u64, index: u64) -> rand_chacha::ChaCha8Rng {
    let mixed = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ epoch.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ index.wrapping_mul(0x1656_67B1_9E37_79F9);
    rand_chacha::ChaCha8Rng::seed_from_u64(mixed)
}

/// An image that could not be read or decoded.
#[derive(Debug, thiserror::Error)]
#[error("{}: {msg}", path.display())]
pub struct ImageError {
    pub path: PathBuf,
    pub msg: String,
}

/// Decodes any supported file to 8-bit RGB as `transformers`' `convert_to_rgb` does: RGB images
/// as they are; every other mode (grey, palette, alpha, CMYK, 16-bit) through RGBA, alpha-composited
/// onto white with Pillow's integer arithmetic. The format is taken from the content, not the
/// extension. EXIF orientation is ignored, as `CLIPImageProcessor` ignores it.
///
/// JPEGs in YCbCr, RGB or grey are decoded with libjpeg-turbo's decoder (via mozjpeg, the same
/// code Pillow uses: accurate integer IDCT, fancy chroma upsampling), so their pixels are
/// Pillow's exactly; other JPEGs (CMYK) and all other formats go through the `image` crate.
/// Whether this build's JPEG decoder runs libjpeg-turbo's SIMD code on this CPU (inverse DCT,
/// chroma upsampling, colour conversion; same pixels as the plain C code, about twice as fast).
/// The SIMD code is assembled with `nasm` when the build finds one; without it the build warns
/// and decodes with the C code.
pub fn jpeg_simd() -> bool {
    extern "C" {
        // libjpeg-turbo's own dispatch query (`jsimd.c`, or `jsimd_none.c` returning 0 when built
        // without SIMD); it also checks the CPU's features.
        fn jsimd_can_idct_islow() -> std::os::raw::c_int;
    }
    // SAFETY: takes no arguments and only reads CPUID and the environment (once).
    unsafe { jsimd_can_idct_islow() != 0 }
}

pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    load_rgb_with(path, |_, _| 1).map(|source| source.rgb)
}

/// [`load_rgb`], with JPEGs of the YCbCr, RGB or grey path reduced by `reduction(w, h)` (1, 2, 4
/// or 8) of their full size `(w, h)` inside libjpeg's inverse DCT (as Pillow's `Image.draft`).
pub fn load_rgb_with(
    path: &Path,
    reduction: impl Fn(u32, u32) -> u32,
) -> Result<Source, ImageError> {
    let err = |msg: String| ImageError {
        path: path.to_path_buf(),
        msg,
    };
    let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let format =
        image::guess_format(&bytes).map_err(|e| err(format!("not a supported image: {e}")))?;
    if format == image::ImageFormat::Jpeg {
        // Decoders fill a cut-off JPEG with grey and carry on; Pillow refuses it ("image file is
        // truncated"), and so does clipft.
        if jpeg::is_truncated(&bytes) {
            return Err(err(
                "truncated JPEG (no end-of-image marker after the image data)".into(),
            ));
        }
        if let Ok(Some(source)) = jpeg::decode(&bytes, reduction) {
            return Ok(source);
        }
        // Anything libjpeg declines (CMYK, arithmetic coding, damage) gets a second opinion below.
    }
    let img = image::load_from_memory_with_format(&bytes, format)
        .map_err(|e| err(format!("cannot decode image: {e}")))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(err("image has no pixels".into()));
    }
    Ok(Source::full(match img {
        image::DynamicImage::ImageRgb8(rgb) => rgb,
        other => composite_on_white(&other.to_rgba8()),
    }))
}

mod jpeg {
    use std::cell::Cell;
    use std::panic::AssertUnwindSafe;
    use std::sync::Once;

    use image::RgbImage;
    use mozjpeg::ColorSpace;

    use super::Source;

    thread_local!(static DECODING: Cell<bool> = const { Cell::new(false) });
    static QUIET_HOOK: Once = Once::new();

    /// libjpeg reports errors by unwinding (mozjpeg's error manager); keep the panic hook quiet
    /// for those, on the decoding thread only, and turn them into errors.
    fn install_quiet_hook() {
        QUIET_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if !DECODING.with(Cell::get) {
                    previous(info)
                }
            }));
        });
    }

    /// True when no end-of-image marker (FF D9) follows the last start-of-scan (FF DA). Entropy-
    /// coded data never contains FF D9 (0xFF bytes are stuffed), and thumbnails come earlier.
    pub fn is_truncated(bytes: &[u8]) -> bool {
        // The usual file ends with its end-of-image marker: then any start-of-scan (found near
        // the start, after the headers) comes before it, and the whole scan below is not needed.
        if bytes.ends_with(&[0xFF, 0xD9]) && bytes.windows(2).any(|w| w == [0xFF, 0xDA]) {
            return false;
        }
        let last_sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]);
        match last_sos {
            Some(i) => !bytes[i..].windows(2).any(|w| w == [0xFF, 0xD9]),
            None => true,
        }
    }

    /// `Ok(None)`: a JPEG colour space this path does not handle (CMYK, YCCK).
    pub fn decode(
        bytes: &[u8],
        reduction: impl Fn(u32, u32) -> u32,
    ) -> Result<Option<Source>, String> {
        install_quiet_hook();
        DECODING.with(|d| d.set(true));
        // Unwind safe: nothing outside the closure is left half-updated by a libjpeg error.
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| -> std::io::Result<Option<Source>> {
                let mut d = mozjpeg::Decompress::new_mem(bytes)?;
                if !matches!(
                    d.color_space(),
                    ColorSpace::JCS_YCbCr | ColorSpace::JCS_RGB | ColorSpace::JCS_GRAYSCALE
                ) {
                    return Ok(None);
                }
                let full_size = (d.width() as u32, d.height() as u32);
                // libjpeg scales by scale_num / 8: 8 (none), 4, 2 or 1.
                let reduce = reduction(full_size.0, full_size.1);
                debug_assert!(matches!(reduce, 1 | 2 | 4 | 8), "JPEG reduction {reduce}");
                if reduce > 1 {
                    d.scale((8 / reduce.clamp(1, 8)) as u8);
                }
                let mut started = d.rgb()?;
                let (w, h) = (started.width() as u32, started.height() as u32);
                let pixels: Vec<u8> = started.read_scanlines()?;
                started.finish()?;
                Ok(RgbImage::from_raw(w, h, pixels).map(|rgb| Source { rgb, full_size }))
            }));
        DECODING.with(|d| d.set(false));
        match result {
            Ok(Ok(img)) => Ok(img),
            Ok(Err(e)) => Err(e.to_string()),
            Err(panic) => Err(panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "corrupt JPEG".into())),
        }
    }
}

/// Pillow's `alpha_composite(white, img)` followed by `convert("RGB")`.
pub fn composite_on_white(rgba: &image::RgbaImage) -> RgbImage {
    let mut out = RgbImage::new(rgba.width(), rgba.height());
    for (o, p) in out.pixels_mut().zip(rgba.pixels()) {
        let [r, g, b, a] = p.0;
        o.0 = [blend_white(r, a), blend_white(g, a), blend_white(b, a)];
    }
    out
}

/// One channel of Pillow's `ImagingAlphaComposite` with an opaque white destination
/// (7 precision bits, rounded divisions by 255).
fn blend_white(src: u8, alpha: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    if alpha == 0 {
        return 255;
    }
    let (s, a) = (src as u32, alpha as u32);
    let outa255 = a * 255 + 255 * (255 - a);
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = s * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
    let div255 = ((tmp >> 8) + tmp) >> 8;
    (div255 >> PRECISION_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_composite_is_identity_and_transparent_is_white() {
        for v in 0..=255u8 {
            assert_eq!(blend_white(v, 255), v);
            assert_eq!(blend_white(v, 0), 255);
        }
        // Pillow: alpha_composite(white, (0, 0, 0, 128)) -> 127
        assert_eq!(blend_white(0, 128), 127);
        assert_eq!(
            [
                blend_white(10, 51),
                blend_white(200, 51),
                blend_white(77, 51)
            ],
            [206, 244, 219]
        );
    }

    #[test]
    fn truncation_needs_an_end_marker_after_the_last_scan() {
        let t = jpeg::is_truncated;
        assert!(!t(&[0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 0xFF, 0xD9]));
        // Trailing bytes after the end marker are fine.
        assert!(!t(&[0xFF, 0xD8, 0xFF, 0xDA, 1, 0xFF, 0xD9, 0, 0]));
        // Cut off inside the scan; or the only end marker belongs to a thumbnail before it.
        assert!(t(&[0xFF, 0xD8, 0xFF, 0xDA, 1, 2, 3]));
        assert!(t(&[0xFF, 0xD8, 0xFF, 0xD9, 0xFF, 0xDA, 1, 2]));
        // A progressive file's later scans count; no scan at all is truncated too.
        assert!(t(&[0xFF, 0xDA, 1, 0xFF, 0xD9, 0xFF, 0xDA, 2]));
        assert!(!t(&[0xFF, 0xDA, 1, 0xFF, 0xDA, 2, 0xFF, 0xD9]));
        assert!(t(&[0xFF, 0xD8, 0xFF, 0xD9]));
    }

    #[test]
    fn resized_size_truncates_like_transformers() {
        let p = PreprocessConfig::openai(224);
        assert_eq!(p.resized_size(500, 375), (298, 224));
        assert_eq!(p.resized_size(375, 500), (224, 298));
        assert_eq!(p.resized_size(224, 224), (224, 224));
        assert_eq!(p.resized_size(20, 15), (298, 224));
        assert_eq!(p.resized_size(1000, 3), (74666, 224));
    }

    #[test]
    fn jpeg_reduction_keeps_the_resize_size_like_pillow_draft() {
        let p = PreprocessConfig::openai(224);
        let c = View::Center;
        // ImageNet-sized photos are never reduced.
        assert_eq!(p.jpeg_reduction(500, 375, &c), 1);
        assert_eq!(p.jpeg_reduction(447, 447, &c), 1);
        // Each factor needs the reduced image to cover the resize output (298 × 224 for 4:3).
        assert_eq!(p.jpeg_reduction(448, 448, &c), 2);
        assert_eq!(p.jpeg_reduction(1000, 750, &c), 2);
        assert_eq!(p.jpeg_reduction(1200, 900, &c), 4);
        assert_eq!(p.jpeg_reduction(2400, 1800, &c), 8);
        assert_eq!(p.jpeg_reduction(8000, 6000, &c), 8);
        assert_eq!(p.jpeg_reduction(6000, 8000, &c), 8);
        // Both sides count: a panorama's short side decides.
        assert_eq!(p.jpeg_reduction(4000, 300, &c), 1);
        assert_eq!(p.jpeg_reduction(4000, 500, &c), 2);
        // Random crops need the full image; without a resize there is nothing to reduce to.
        let aug = View::Augment {
            seed: 0,
            epoch: 0,
            scale_min: 0.5,
            scale_max: 1.0,
            flip_p: 0.5,
        };
        assert_eq!(p.jpeg_reduction(4000, 3000, &aug), 1);
        assert_eq!(p.jpeg_reduction(4000, 3000, &View::Flip), 8);
        let no_resize = PreprocessConfig {
            resize: None,
            ..PreprocessConfig::openai(224)
        };
        assert_eq!(no_resize.jpeg_reduction(4000, 3000, &c), 1);
    }

    #[test]
    fn center_crop_uses_floor_offsets_and_pads() {
        let mut img = RgbImage::new(5, 3);
        for (x, y, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb([x as u8, y as u8, 7]);
        }
        let c = center_crop(&img, 3, 2);
        // left = (5 - 2) // 2 = 1
        assert_eq!(c.get_pixel(0, 0).0, [1, 0, 7]);
        assert_eq!(c.get_pixel(1, 2).0, [2, 2, 7]);
        let padded = center_crop(&img, 5, 5);
        assert_eq!(padded.get_pixel(0, 0).0, [0, 0, 0]);
        assert_eq!(padded.get_pixel(0, 1).0, [0, 0, 7]);
    }

    #[test]
    fn preprocessor_json_variants() {
        let p =
            PreprocessConfig::from_json(r#"{"size": 224, "crop_size": 224, "resample": 3}"#, 224)
                .unwrap();
        assert_eq!(p, PreprocessConfig::openai(224));
        let p = PreprocessConfig::from_json(
            r#"{"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}, "image_mean": [0.5,0.5,0.5], "image_std": [0.5], "resample": 2}"#,
            336,
        )
        .unwrap();
        assert_eq!(p.resize, Some(ResizeTo::ShortestEdge(336)));
        assert_eq!(p.std, Some([0.5; 3]));
        assert_eq!(p.resample, Resample::Bilinear);
        assert!(PreprocessConfig::from_json(r#"{"resample": 9}"#, 224).is_err());
        assert!(PreprocessConfig::from_json(r#"{"image_std": [0, 1, 1]}"#, 224).is_err());
    }

    #[test]
    fn random_crop_box_stays_inside_and_is_seeded() {
        for i in 0..200 {
            let mut rng = view_rng(3, 1, i);
            let (x, y, w, h) =
                random_resized_crop_box(97, 61, (0.5, 1.0), (0.75, 4.0 / 3.0), &mut rng);
            assert!(w > 0 && h > 0 && x + w <= 97 && y + h <= 61);
            let area = (w * h) as f64 / (97.0 * 61.0);
            assert!(area > 0.4 && area <= 1.05, "{area}");
        }
        let a = random_resized_crop_box(
            97,
            61,
            (0.5, 1.0),
            (0.75, 4.0 / 3.0),
            &mut view_rng(1, 2, 3),
        );
        let b = random_resized_crop_box(
            97,
            61,
            (0.5, 1.0),
            (0.75, 4.0 / 3.0),
            &mut view_rng(1, 2, 3),
        );
        assert_eq!(a, b);
    }
}

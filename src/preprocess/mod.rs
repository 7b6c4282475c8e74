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
    /// The filters at their PIL numbers (`resample` in `preprocessor_config.json`).
    const BY_PIL: [Self; 6] = [
        Self::Nearest,
        Self::Lanczos,
        Self::Bilinear,
        Self::Bicubic,
        Self::Box,
        Self::Hamming,
    ];

    pub fn from_pil(n: u64) -> Option<Self> {
        let i = usize::try_from(n).ok()?;
        Self::BY_PIL.get(i).copied()
    }

    /// The PIL filter number.
    pub fn to_pil(self) -> u64 {
        let i = Self::BY_PIL.iter().position(|&r| r == self);
        i.expect("every filter has a PIL number") as u64
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
    /// The file set `do_convert_rgb` to false, which clipft does not follow (it always converts
    /// to RGB; the loader warns). Not part of [`Self::cache_key`]: the pixels are the same.
    #[serde(skip)]
    pub declines_rgb: bool,
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
            declines_rgb: false,
        }
    }

    /// Parses `preprocessor_config.json`; missing keys take the `CLIPImageProcessor` defaults,
    /// except that `size` and `crop_size` default to the tower's `image_size` (not 224, which
    /// only a 224-pixel tower could take).
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
            declines_rgb: obj.get("do_convert_rgb") == Some(&serde_json::Value::Bool(false)),
        })
    }

    /// This config as a `CLIPImageProcessor`'s `preprocessor_config.json`, which
    /// [`Self::from_json`] and `transformers` both read back to the same settings.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let size = |r: ResizeTo| match r {
            ResizeTo::ShortestEdge(n) => serde_json::json!({ "shortest_edge": n }),
            ResizeTo::Exact(h, w) => serde_json::json!({ "height": h, "width": w }),
        };
        // An f32 widened to f64 would print as 0.48145467042922974: write its shortest form.
        let short = |v: [f32; 3]| v.map(|x| x.to_string().parse::<f64>().expect("a number"));
        let mut v = serde_json::json!({
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": self.resize.is_some(),
            "resample": self.resample.to_pil(),
            "do_center_crop": self.do_center_crop,
            "crop_size": size(ResizeTo::Exact(self.crop.0, self.crop.1)),
            "do_rescale": self.rescale_factor.is_some(),
            "rescale_factor": self.rescale_factor.unwrap_or(1.0 / 255.0),
            "do_normalize": self.mean.is_some(),
            "image_mean": short(self.mean.unwrap_or(OPENAI_MEAN)),
            "image_std": short(self.std.unwrap_or(OPENAI_STD)),
            "do_convert_rgb": !self.declines_rgb,
        });
        if let Some(r) = self.resize {
            v["size"] = size(r);
        }
        v
    }

    /// The two lines `clipft info` prints: the geometric steps, then the pixel arithmetic.
    pub fn describe(&self) -> (String, String) {
        let [resize, crop, resample, rescale, normalize] = self.steps();
        (
            format!("{resize}, {crop}, {resample}"),
            format!("{rescale}, {normalize}"),
        )
    }

    /// The steps, each in words: resize, centre crop, resampling filter, rescale, and
    /// normalisation (mean and std).
    pub fn steps(&self) -> [String; 5] {
        let resize = match self.resize {
            Some(ResizeTo::ShortestEdge(n)) => format!("shortest edge to {n}"),
            Some(ResizeTo::Exact(h, w)) => format!("resize to {h}x{w}"),
            None => "no resize".to_string(),
        };
        let (h, w) = self.crop;
        let crop = match (self.do_center_crop, self.resize.is_some()) {
            (true, _) => format!("centre crop {w}x{h}"),
            // Without a crop the tower's input size is what images become, or already are.
            (false, true) => format!("no centre crop (images must resize to {w}x{h})"),
            (false, false) => format!("no centre crop (images must be {w}x{h})"),
        };
        let resample = format!("{:?}", self.resample).to_lowercase();
        let rescale = match self.rescale_factor {
            Some(f) if (f - 1.0 / 255.0).abs() < 1e-12 => "rescale 1/255".to_string(),
            Some(f) => format!("rescale x{f}"),
            None => "no rescale".to_string(),
        };
        let normalize = match (self.mean, self.std) {
            (Some(m), Some(s)) => format!("mean {m:?}, std {s:?}"),
            _ => "no normalisation".to_string(),
        };
        [resize, crop, resample, rescale, normalize]
    }

    /// `None` if `now` gives the same pixels, else the steps that differ, as "then …; now …"
    /// (all the settings where they read alike in words, as a rescale factor within 1e-12 of
    /// 1/255 does).
    pub fn change_to(&self, now: &Self) -> Option<String> {
        if self.cache_key() == now.cache_key() {
            return None;
        }
        let (a, b) = (self.steps(), now.steps());
        let differ: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
        let show = |p: &Self, s: &[String]| match &differ[..] {
            [] => p.cache_key(),
            d => d
                .iter()
                .map(|&i| s[i].as_str())
                .collect::<Vec<_>>()
                .join(", "),
        };
        Some(format!("then {}; now {}", show(self, &a), show(now, &b)))
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
        let px = self.view_pixels(&src.rgb, src.full_size, view, key);
        if px.dimensions() != (self.crop.1, self.crop.0) {
            // Only without a centre crop: the resize alone decides the size, which then depends
            // on the image's shape (transformers fails on such a batch too).
            let (w, h) = px.dimensions();
            return Err(ImageError {
                path: path.to_path_buf(),
                msg: format!(
                    "preprocessed to {w}x{h}, but the model takes {}x{}: the checkpoint's \
                     preprocessor_config.json has do_center_crop false, so only images that \
                     resize to exactly that size can be used",
                    self.crop.1, self.crop.0
                ),
            });
        }
        Ok(px)
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

/// The most pixels an image may have: Pillow's `2 × Image.MAX_IMAGE_PIXELS`, above which
/// `Image.open` raises `DecompressionBombError`. Checked on the size in the file's header,
/// before any pixel is decoded.
pub const MAX_PIXELS: u64 = 2 * 89_478_485;

/// An error for an image whose header claims more than [`MAX_PIXELS`] (Pillow's count: each
/// side at least 1).
fn check_size(w: u32, h: u32) -> Result<(), String> {
    let pixels = u64::from(w.max(1)) * u64::from(h.max(1));
    if pixels > MAX_PIXELS {
        return Err(format!(
            "image is {w}x{h} = {pixels} pixels, over the limit of {MAX_PIXELS} (Pillow's \
             decompression-bomb limit); not decoded"
        ));
    }
    Ok(())
}

/// Decodes any supported file to 8-bit RGB as `transformers`' `convert_to_rgb` does: RGB images
/// as they are; every other mode (grey, palette, alpha, CMYK, 16-bit) through RGBA, alpha-composited
/// onto white with Pillow's integer arithmetic. The format is taken from the content, not the
/// extension. EXIF orientation is ignored, as `CLIPImageProcessor` ignores it, except in TIFFs,
/// which Pillow 13 itself turns upright when it loads them.
///
/// JPEGs are decoded with libjpeg-turbo's decoder (via mozjpeg, the same code Pillow uses:
/// accurate integer IDCT, fancy chroma upsampling), CMYK ones converted with Pillow's
/// arithmetic, so their pixels are Pillow's exactly; the first frame of a GIF is composed as
/// Pillow composes it; other formats go through the `image` crate, with Pillow's reduction of
/// 16-bit colour channels (the high byte) and of 5- and 6-bit BMP channels.
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
    if bytes.is_empty() {
        return Err(err("empty file".into()));
    }
    let format =
        image::guess_format(&bytes).map_err(|e| err(format!("not a supported image: {e}")))?;
    // What libjpeg said about a JPEG it declined, for the error if the second opinion fails too.
    let mut libjpeg = String::new();
    match format {
        image::ImageFormat::Jpeg => match jpeg::decode(&bytes, reduction) {
            Ok(source) => return Ok(source),
            Err(jpeg::Failure::Refused(msg)) => return Err(err(msg)),
            // Anything else libjpeg declines (arithmetic coding, 12 bits, damage) gets a second
            // opinion below.
            Err(jpeg::Failure::Declined(msg)) => libjpeg = format!(" ({msg})"),
        },
        image::ImageFormat::Gif => return gif::first_frame(&bytes).map(Source::full).map_err(err),
        _ => {}
    }
    if format == image::ImageFormat::Tiff {
        // The `image` crate has no 32-bit grey; Pillow reads it as mode I or F.
        if let Some(grey) = tiff32::grey(&bytes, check_size) {
            return grey.map(Source::full).map_err(err);
        }
    }
    let reader = || image::ImageReader::with_format(std::io::Cursor::new(&bytes[..]), format);
    let decode_err = |e: image::ImageError| err(format!("cannot decode image: {e}{libjpeg}"));
    let panicked = |msg: Option<String>| {
        err(format!(
            "cannot decode image: the {format:?} decoder failed on it ({})",
            msg.unwrap_or_else(|| "no message".into())
        ))
    };
    // A PNG's size straight from its header: the png crate refuses a size whose buffer would
    // overflow as "Memory limit exceeded", before the pixel limit could say what is wrong.
    if format == image::ImageFormat::Png && bytes.len() >= 24 && &bytes[12..16] == b"IHDR" {
        let be = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        check_size(be(16), be(20)).map_err(err)?;
    }
    let (w, h) = jpeg::quietly(|| reader().into_dimensions())
        .map_err(panicked)?
        .map_err(decode_err)?;
    check_size(w, h).map_err(err)?;
    let img = jpeg::quietly(|| -> image::ImageResult<image::DynamicImage> {
        let mut decoder = reader().into_decoder()?;
        // Pillow 13 applies a TIFF's Orientation tag when it loads the file
        // (`TiffImagePlugin.load_end` calls `exif_transpose`); for other formats EXIF
        // orientation is left alone, as `CLIPImageProcessor` leaves it.
        let orientation = match format {
            image::ImageFormat::Tiff => image::ImageDecoder::orientation(&mut decoder)?,
            _ => image::metadata::Orientation::NoTransforms,
        };
        let mut img = image::DynamicImage::from_decoder(decoder)?;
        img.apply_orientation(orientation);
        Ok(img)
    })
    .map_err(panicked)?
    .map_err(decode_err)?;
    if img.width() == 0 || img.height() == 0 {
        return Err(err("image has no pixels".into()));
    }
    Ok(Source::full(match img {
        image::DynamicImage::ImageRgb8(mut rgb) => {
            if format == image::ImageFormat::Bmp {
                if let Some(bits) = bmp::channel_bits(&bytes) {
                    bmp::expand_like_pillow(&mut rgb, bits);
                }
            }
            rgb
        }
        // Pillow reads 16-bit colour (RGB;16B, RGBA;16B, LA;16B, and TIFF's RGB;16L) by keeping
        // the high byte of each sample; the `image` crate rounds.
        image::DynamicImage::ImageRgb16(px) => high_bytes(&px),
        image::DynamicImage::ImageRgba16(px) => composite_on_white(&high_bytes(&px)),
        image::DynamicImage::ImageLumaA16(px) => {
            let la: image::GrayAlphaImage = high_bytes(&px);
            composite_on_white(&image::DynamicImage::ImageLumaA8(la).to_rgba8())
        }
        other => composite_on_white(&other.to_rgba8()),
    }))
}

/// A 16-bit image reduced to 8 bits by keeping the high byte of every sample (`x >> 8`).
fn high_bytes<P>(img: &image::ImageBuffer<P, Vec<u16>>) -> image::ImageBuffer<P::Eight, Vec<u8>>
where
    P: image::Pixel<Subpixel = u16> + HasEightBit,
{
    let raw: Vec<u8> = img.as_raw().iter().map(|&v| (v >> 8) as u8).collect();
    image::ImageBuffer::from_raw(img.width(), img.height(), raw).expect("same layout")
}

/// The 8-bit pixel type with the same channels as a 16-bit one.
trait HasEightBit {
    type Eight: image::Pixel<Subpixel = u8>;
}
impl HasEightBit for image::Rgb<u16> {
    type Eight = image::Rgb<u8>;
}
impl HasEightBit for image::Rgba<u16> {
    type Eight = image::Rgba<u8>;
}
impl HasEightBit for image::LumaA<u16> {
    type Eight = image::LumaA<u8>;
}

mod tiff32 {
    use image::RgbImage;
    use tiff::decoder::{Decoder, DecodingResult};
    use tiff::tags::Tag;

    /// A one-channel 32-bit TIFF (integer or float samples, black is zero), as Pillow reads it
    /// (mode I or F) and `convert("RGB")` makes it 8-bit: values clipped to 0..255, floats
    /// truncated, NaN black. `None` for any other TIFF, which the `image` crate decodes or
    /// refuses.
    pub fn grey(
        bytes: &[u8],
        check_size: impl Fn(u32, u32) -> Result<(), String>,
    ) -> Option<Result<RgbImage, String>> {
        let mut d = Decoder::new(std::io::Cursor::new(bytes)).ok()?;
        let black_is_zero = d.find_tag_unsigned::<u16>(Tag::PhotometricInterpretation);
        if d.colortype().ok()? != tiff::ColorType::Gray(32) || black_is_zero.ok()? != Some(1) {
            return None;
        }
        let orientation = d
            .find_tag_unsigned::<u8>(Tag::Orientation)
            .ok()
            .flatten()
            .and_then(image::metadata::Orientation::from_exif);
        Some((|| {
            let (w, h) = d.dimensions().map_err(|e| e.to_string())?;
            check_size(w, h)?;
            let data = d
                .read_image()
                .map_err(|e| format!("cannot decode image: {e}"))?;
            // (An unsigned sample Pillow holds in a signed 32-bit int: from 2^31 it is negative.)
            let px: Vec<u8> = match data {
                DecodingResult::U32(v) => {
                    v.iter().map(|&x| (x as i32).clamp(0, 255) as u8).collect()
                }
                DecodingResult::I32(v) => v.iter().map(|&x| x.clamp(0, 255) as u8).collect(),
                DecodingResult::F32(v) => v
                    .iter()
                    .map(|&x| match x {
                        x if x >= 255.0 => 255,
                        x if x > 0.0 => x as u8,
                        _ => 0,
                    })
                    .collect(),
                _ => return Err("cannot decode image: unexpected 32-bit sample type".into()),
            };
            let grey = image::GrayImage::from_raw(w, h, px)
                .ok_or("cannot decode image: truncated pixel data")?;
            let mut img = image::DynamicImage::ImageLuma8(grey);
            if let Some(o) = orientation {
                img.apply_orientation(o);
            }
            Ok(img.to_rgb8())
        })())
    }
}

mod bmp {
    use image::RgbImage;

    /// Bits of the red, green and blue fields of a 16-bit BMP Pillow reads (5-6-5 or 5-5-5),
    /// from its header; `None` for any other BMP.
    pub fn channel_bits(bytes: &[u8]) -> Option<[u32; 3]> {
        let u16_at = |i: usize| Some(u16::from_le_bytes(bytes.get(i..i + 2)?.try_into().ok()?));
        let u32_at = |i: usize| Some(u32::from_le_bytes(bytes.get(i..i + 4)?.try_into().ok()?));
        let header = u32_at(14)?;
        let (bpp, compression) = if header == 12 {
            (u16_at(24)?, 0)
        } else {
            (u16_at(28)?, u32_at(30)?)
        };
        if bpp != 16 {
            return None;
        }
        match compression {
            // BI_RGB: 5-5-5.
            0 => Some([5, 5, 5]),
            // BI_BITFIELDS: the three masks follow the 40-byte header (or sit at the same
            // offset inside a longer one).
            3 => match (u32_at(54)?, u32_at(58)?, u32_at(62)?) {
                (0xF800, 0x07E0, 0x001F) => Some([5, 6, 5]),
                (0x7C00, 0x03E0, 0x001F) => Some([5, 5, 5]),
                _ => None,
            },
            _ => None,
        }
    }

    /// Re-expands the channels of a 16-bit BMP the `image` crate decoded (`round(v·255/max)`)
    /// the way Pillow's `BGR;16` / `BGR;15` unpackers do (`v·255/max`, truncated).
    pub fn expand_like_pillow(rgb: &mut RgbImage, bits: [u32; 3]) {
        let tables = bits.map(|b| {
            let max = (1u32 << b) - 1;
            let mut t = [0u8; 256];
            for (byte, out) in t.iter_mut().enumerate() {
                // The field value the byte came from (the rounded expansion is one-to-one).
                let v = (byte as u32 * max + 127) / 255;
                *out = (v * 255 / max) as u8;
            }
            t
        });
        for px in rgb.pixels_mut() {
            for (c, t) in px.0.iter_mut().zip(&tables) {
                *c = t[*c as usize];
            }
        }
    }
}

mod gif {
    use image::RgbImage;

    /// The first frame of a GIF as Pillow loads it and `convert_to_rgb` converts it: on a
    /// canvas of the logical screen (grown to the frame if the frame reaches past it), filled
    /// with the frame's transparent index when it has one and with palette entry 0 otherwise
    /// (Pillow ignores the background colour index for the first frame); the frame's (else the
    /// global) palette, grey levels without one; transparent pixels composited onto white.
    pub fn first_frame(bytes: &[u8]) -> Result<RgbImage, String> {
        let bad = |e: ::gif::DecodingError| format!("cannot decode image: {e}");
        let mut options = ::gif::DecodeOptions::new();
        options.set_color_output(::gif::ColorOutput::Indexed);
        // One byte per pixel of a frame within the pixel limit (checked below, before decoding).
        options.set_memory_limit(::gif::MemoryLimit::Bytes(
            std::num::NonZeroU64::new(super::MAX_PIXELS).expect("non-zero"),
        ));
        let mut decoder = options.read_info(bytes).map_err(bad)?;
        let global = decoder.global_palette().map(<[u8]>::to_vec);
        let screen = (u32::from(decoder.width()), u32::from(decoder.height()));
        super::check_size(screen.0, screen.1)?;
        let Some(info) = decoder.next_frame_info().map_err(bad)? else {
            return Err("cannot decode image: no frame in the GIF".into());
        };
        let (left, top) = (u32::from(info.left), u32::from(info.top));
        let (fw, fh) = (u32::from(info.width), u32::from(info.height));
        let (w, h) = (screen.0.max(left + fw), screen.1.max(top + fh));
        super::check_size(w, h)?;
        if w == 0 || h == 0 {
            return Err("image has no pixels".into());
        }
        let transparent = info.transparent;
        let palette = info.palette.clone().or(global);
        let mut frame = vec![0u8; decoder.buffer_size()];
        decoder.read_into_buffer(&mut frame).map_err(bad)?;
        let mut canvas = vec![transparent.unwrap_or(0); w as usize * h as usize];
        if fw > 0 {
            for (y, row) in frame.chunks_exact(fw as usize).enumerate() {
                let start = (top as usize + y) * w as usize + left as usize;
                canvas[start..start + row.len()].copy_from_slice(row);
            }
        }
        // Colour of each index: Pillow's palette lookup (black past the palette's end), or the
        // index as a grey level without a palette; the transparent index onto white.
        let colour = |i: u8| -> [u8; 3] {
            if Some(i) == transparent {
                return [255; 3];
            }
            match &palette {
                Some(p) => p
                    .get(3 * i as usize..3 * i as usize + 3)
                    .map_or([0; 3], |c| [c[0], c[1], c[2]]),
                None => [i; 3],
            }
        };
        let lut: Vec<[u8; 3]> = (0..=255u8).map(colour).collect();
        let raw = canvas.iter().flat_map(|&i| lut[i as usize]).collect();
        Ok(RgbImage::from_raw(w, h, raw).expect("3 bytes per pixel"))
    }
}

mod jpeg {
    use std::cell::Cell;
    use std::os::raw::c_int;
    use std::panic::AssertUnwindSafe;
    use std::sync::Once;

    use image::RgbImage;
    use mozjpeg::ColorSpace;
    use mozjpeg_sys::{jpeg_common_struct, jpeg_error_mgr, JERR_FILE_READ, JWRN_JPEG_EOF};

    use super::Source;

    thread_local! {
        static DECODING: Cell<bool> = const { Cell::new(false) };
        /// Set when libjpeg ran out of data (on the decoding thread, during one decode).
        static HIT_EOF: Cell<bool> = const { Cell::new(false) };
    }
    static QUIET_HOOK: Once = Once::new();

    /// Why libjpeg gave no image.
    pub enum Failure {
        /// Pillow refuses the file too (cut off, too many pixels): an error, no second opinion.
        Refused(String),
        /// libjpeg cannot decode it (arithmetic coding, 12 bits, damage): another decoder may.
        Declined(String),
    }

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

    /// libjpeg's standard error manager, except that fatal errors unwind (with the message) and
    /// warnings are silent, apart from noting the end of the data: mozjpeg's source manager
    /// then feeds libjpeg a fake end-of-image marker and warns (`JWRN_JPEG_EOF`) where Pillow's
    /// decoder, which never fakes data, stops with "image file is truncated".
    fn error_mgr() -> jpeg_error_mgr {
        // SAFETY: jpeg_std_error fills in every field of the zeroed struct.
        let mut err: jpeg_error_mgr = unsafe { std::mem::zeroed() };
        unsafe { mozjpeg_sys::jpeg_std_error(&mut err) };
        err.error_exit = Some(error_exit);
        err.emit_message = Some(emit_message);
        err
    }

    extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
        // SAFETY: libjpeg passes its own cinfo, whose `err` is the manager above.
        let err = unsafe { &mut *cinfo.err };
        if level < 0 {
            err.num_warnings += 1;
            if err.msg_code == JWRN_JPEG_EOF {
                HIT_EOF.with(|e| e.set(true));
            }
        }
    }

    extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
        // SAFETY: as above.
        let err = unsafe { &mut *cinfo.err };
        // The source manager fails this way when asked to skip past the end of the data.
        if err.msg_code == JERR_FILE_READ {
            HIT_EOF.with(|e| e.set(true));
        }
        let mut buf = [0u8; 80];
        if let Some(format) = err.format_message {
            // SAFETY: format_message writes at most 80 bytes (JMSG_LENGTH) into the buffer; the
            // binding declares it `&[u8; 80]`, the C function takes a writable `char *`.
            let format: unsafe extern "C-unwind" fn(&mut jpeg_common_struct, &mut [u8; 80]) =
                unsafe { std::mem::transmute(format) };
            unsafe { format(cinfo, &mut buf) };
        }
        let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        let msg = String::from_utf8_lossy(&buf[..len]).into_owned();
        std::panic::resume_unwind(Box::new(format!("libjpeg: {msg}")));
    }

    /// Decodes a JPEG with libjpeg: YCbCr, RGB and grey to RGB (reduced by `reduction(w, h)`),
    /// CMYK and YCCK at full size converted as Pillow converts them.
    pub fn decode(bytes: &[u8], reduction: impl Fn(u32, u32) -> u32) -> Result<Source, Failure> {
        HIT_EOF.with(|e| e.set(false));
        let result = quietly(|| -> Result<Source, Failure> {
            let io = |e: std::io::Error| Failure::Declined(e.to_string());
            let mut d = mozjpeg::Decompress::builder()
                .with_err(error_mgr())
                .from_mem(bytes)
                .map_err(io)?;
            let full_size = (d.width() as u32, d.height() as u32);
            super::check_size(full_size.0, full_size.1).map_err(Failure::Refused)?;
            let (w, h) = full_size;
            match d.color_space() {
                ColorSpace::JCS_YCbCr | ColorSpace::JCS_RGB | ColorSpace::JCS_GRAYSCALE => {
                    // libjpeg scales by scale_num / 8: 8 (none), 4, 2 or 1.
                    let reduce = reduction(w, h);
                    debug_assert!(matches!(reduce, 1 | 2 | 4 | 8), "JPEG reduction {reduce}");
                    if reduce > 1 {
                        d.scale((8 / reduce.clamp(1, 8)) as u8);
                    }
                    let mut started = d.rgb().map_err(io)?;
                    let (w, h) = (started.width() as u32, started.height() as u32);
                    let pixels: Vec<u8> = started.read_scanlines().map_err(io)?;
                    started.finish().map_err(io)?;
                    let rgb = RgbImage::from_raw(w, h, pixels)
                        .ok_or_else(|| Failure::Declined("short pixel buffer".into()))?;
                    Ok(Source { rgb, full_size })
                }
                ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => {
                    let mut started = d.to_colorspace(ColorSpace::JCS_CMYK).map_err(io)?;
                    let cmyk: Vec<u8> = started.read_scanlines().map_err(io)?;
                    started.finish().map_err(io)?;
                    if cmyk.len() != 4 * w as usize * h as usize {
                        return Err(Failure::Declined("short pixel buffer".into()));
                    }
                    Ok(Source::full(cmyk_to_rgb(&cmyk, w, h)))
                }
                other => Err(Failure::Declined(format!("colour space {other:?}"))),
            }
        });
        // Checked first: a cut-off file may still come out as a (grey-filled) image, or as
        // whatever error the fake end-of-image marker led to.
        if HIT_EOF.with(Cell::get) {
            return Err(Failure::Refused(
                "truncated JPEG (the file ends before the image data does)".into(),
            ));
        }
        result.unwrap_or_else(|msg| Err(Failure::Declined(msg.unwrap_or("corrupt JPEG".into()))))
    }

    /// Runs `f` (a decoder) with panics caught and the panic hook quiet on this thread: libjpeg's
    /// errors unwind by design, and a decoder crate's assertion on an unusual file must fail
    /// that file, not the run. `Err` carries the panic's message, if it had one.
    pub fn quietly<T>(f: impl FnOnce() -> T) -> Result<T, Option<String>> {
        install_quiet_hook();
        DECODING.with(|d| d.set(true));
        // Unwind safe: the decoders' state lives inside `f` and is dropped with the panic.
        let result = std::panic::catch_unwind(AssertUnwindSafe(f));
        DECODING.with(|d| d.set(false));
        result.map_err(|panic| {
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        })
    }

    /// Pillow's CMYK JPEG to RGB: libjpeg's samples read inverted (`CMYK;I`, Adobe's
    /// convention, which Pillow always assumes), then `cmyk2rgb` with its rounded
    /// division by 255.
    pub fn cmyk_to_rgb(cmyk: &[u8], w: u32, h: u32) -> RgbImage {
        let raw = cmyk
            .chunks_exact(4)
            .flat_map(|p| {
                let nk = i32::from(p[3]); // 255 - (255 - k)
                [0, 1, 2].map(|c| {
                    let tmp = i32::from(255 - p[c]) * nk + 128;
                    (nk - (((tmp >> 8) + tmp) >> 8)).clamp(0, 255) as u8
                })
            })
            .collect();
        RgbImage::from_raw(w, h, raw).expect("3 bytes per pixel")
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

    /// A change of preprocessing names the steps that differ, or every setting where the words
    /// read alike.
    #[test]
    fn preprocessing_changes_name_what_differs() {
        let a = PreprocessConfig::openai(224);
        assert_eq!(a.change_to(&a.clone()), None);
        let b = PreprocessConfig {
            resample: Resample::Bilinear,
            crop: (200, 200),
            ..a.clone()
        };
        assert_eq!(
            a.change_to(&b).unwrap(),
            "then centre crop 224x224, bicubic; now centre crop 200x200, bilinear"
        );
        let c = PreprocessConfig {
            rescale_factor: Some(1.0 / 255.0 + 1e-15),
            ..a.clone()
        };
        let e = a.change_to(&c).unwrap();
        assert!(e.starts_with("then {") && e.contains("; now {"), "{e}");
    }

    /// 32-bit grey TIFFs read as Pillow 13 reads them and `convert("RGB")` makes them 8-bit
    /// (the expected values are Pillow's, for these samples).
    #[test]
    fn thirty_two_bit_grey_tiffs_read_as_pillow_reads_them() {
        use tiff::encoder::{colortype, TiffEncoder};
        let dir = tempfile::tempdir().unwrap();
        let f = [-5.5f32, 0.4, 100.7, 254.6, 254.99, 255.0, 300.0, f32::NAN];
        let i = [-5i32, 0, 100, 254, 255, 256, 300, 70000];
        let float = dir.path().join("f.tiff");
        let mut e = TiffEncoder::new(std::fs::File::create(&float).unwrap()).unwrap();
        e.write_image::<colortype::Gray32Float>(4, 2, &f).unwrap();
        let int = dir.path().join("i.tiff");
        let mut e = TiffEncoder::new(std::fs::File::create(&int).unwrap()).unwrap();
        e.write_image::<colortype::GrayI32>(4, 2, &i).unwrap();
        let grey = |p: &Path| -> Vec<u8> {
            let rgb = load_rgb(p).unwrap();
            assert_eq!(rgb.dimensions(), (4, 2));
            rgb.pixels()
                .map(|px| {
                    assert!(px[0] == px[1] && px[1] == px[2]);
                    px[0]
                })
                .collect()
        };
        assert_eq!(grey(&float), [0, 0, 100, 254, 254, 255, 255, 0]);
        assert_eq!(grey(&int), [0, 0, 100, 254, 255, 255, 255, 255]);
    }

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

    /// A deterministic noisy RGB image (the kind of content where rounding differences show).
    fn noisy(w: u32, h: u32) -> RgbImage {
        let mut state = 0x2545_f491_u32;
        RgbImage::from_fn(w, h, |_, _| {
            image::Rgb(std::array::from_fn(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state >> 24) as u8
            }))
        })
    }

    fn jpeg_bytes(img: &RgbImage) -> Vec<u8> {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(img)
            .unwrap();
        out
    }

    /// `bytes` written as `name` in `dir`, then loaded.
    fn load_bytes(dir: &Path, name: &str, bytes: &[u8]) -> Result<RgbImage, ImageError> {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        load_rgb(&path)
    }

    #[test]
    fn a_jpeg_followed_by_any_trailer_loads_but_a_cut_off_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let jpeg = jpeg_bytes(&noisy(48, 32));
        let whole = load_bytes(dir.path(), "whole.jpg", &jpeg).unwrap();
        // A phone "motion photo": an MP4 after the end-of-image marker, with bytes that look
        // like a start-of-scan and no end-of-image after them.
        let mut motion = jpeg.clone();
        motion.extend_from_slice(b"\0\0\0\x18ftypmp42\xff\xda");
        motion.extend((0..200u32).map(|i| (i * 37 % 251) as u8));
        assert_eq!(
            load_bytes(dir.path(), "motion.jpg", &motion).unwrap(),
            whole
        );
        // Pillow refuses a file cut inside the scan, and one missing only its end marker (its
        // decoder waits for the bytes that would end the last MCUs).
        for (name, cut) in [("half.jpg", jpeg.len() / 2), ("no_eoi.jpg", jpeg.len() - 2)] {
            let e = load_bytes(dir.path(), name, &jpeg[..cut]).unwrap_err();
            assert!(e.msg.contains("truncated JPEG"), "{name}: {e}");
        }
    }

    #[test]
    fn cmyk_jpegs_convert_like_pillow() {
        // Pillow's CMYK;I + cmyk2rgb on raw samples, checked against Pillow 13: the raw (not yet
        // inverted) sample 255 is no ink; k 0 raw is full black.
        let cmyk = [
            255, 255, 255, 255, 0, 128, 255, 200, 10, 20, 30, 0, 77, 200, 5, 128,
        ];
        let rgb = jpeg::cmyk_to_rgb(&cmyk, 4, 1);
        assert_eq!(
            rgb.as_raw(),
            &[255, 255, 255, 0, 100, 200, 0, 0, 0, 39, 100, 3]
        );
    }

    #[test]
    fn images_over_pillows_pixel_limit_are_refused_from_the_header() {
        assert!(check_size(178_956_970, 1).is_ok());
        assert!(check_size(13_000, 13_000).is_ok());
        assert!(check_size(178_956_971, 1).is_err());
        assert!(check_size(0, 178_956_971).is_err());
        let dir = tempfile::tempdir().unwrap();
        // A 64×64 JPEG whose frame header claims 30000×30000: libjpeg would happily decode
        // 900 M grey pixels (seconds, gigabytes).
        let mut jpeg = jpeg_bytes(&noisy(64, 64));
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0x75, 0x30, 0x75, 0x30]);
        // A BMP header claiming 20000×10000 over 64 bytes of pixels; a GIF screen as large.
        let mut bmp = b"BM".to_vec();
        bmp.extend(118u32.to_le_bytes());
        bmp.extend([0; 4]);
        bmp.extend(54u32.to_le_bytes());
        for v in [40u32, 20_000, 10_000] {
            bmp.extend(v.to_le_bytes());
        }
        bmp.extend(1u16.to_le_bytes());
        bmp.extend(24u16.to_le_bytes());
        bmp.extend([0; 24 + 64]);
        let mut gif = Vec::new();
        {
            let mut enc = ::gif::Encoder::new(&mut gif, 20_000, 10_000, &[0; 6]).unwrap();
            enc.write_frame(&::gif::Frame::from_indexed_pixels(1, 1, [0], None))
                .unwrap();
        }
        // A PNG header claiming 2³¹-1 × 2³¹-1 (past the decoder's own memory limit).
        let chunk = |kind: &[u8], data: &[u8]| {
            let mut crc = !0u32;
            for &b in kind.iter().chain(data) {
                crc ^= b as u32;
                for _ in 0..8 {
                    crc = if crc & 1 == 1 {
                        (crc >> 1) ^ 0xEDB8_8320
                    } else {
                        crc >> 1
                    };
                }
            }
            let mut c = (data.len() as u32).to_be_bytes().to_vec();
            c.extend(kind);
            c.extend(data);
            c.extend((!crc).to_be_bytes());
            c
        };
        let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
        let side = (i32::MAX as u32).to_be_bytes();
        png.extend(chunk(
            b"IHDR",
            &[&side[..], &side[..], &[8, 2, 0, 0, 0]].concat(),
        ));
        png.extend(chunk(b"IEND", &[]));
        let start = std::time::Instant::now();
        for (name, bytes) in [
            ("j.jpg", &jpeg),
            ("b.bmp", &bmp),
            ("g.gif", &gif),
            ("p.png", &png),
        ] {
            let e = load_bytes(dir.path(), name, bytes).unwrap_err();
            assert!(e.msg.contains("decompression-bomb limit"), "{name}: {e}");
            assert!(e.msg.contains("pixels"), "{name}: {e}");
        }
        assert!(start.elapsed().as_secs_f64() < 2.0, "{:?}", start.elapsed());
    }

    #[test]
    fn sixteen_bit_colour_keeps_the_high_byte_like_pillow() {
        let dir = tempfile::tempdir().unwrap();
        // 0x12FF: high byte 0x12 (Pillow); rounded to 8 bits it would be 0x13.
        let (v, a) = (0x12FF_u16, 0xFFFF_u16);
        let rgb16 = image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(3, 2, image::Rgb([v; 3]));
        let rgba16 =
            image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(3, 2, image::Rgba([v, v, v, a]));
        let la16 =
            image::ImageBuffer::<image::LumaA<u16>, _>::from_pixel(3, 2, image::LumaA([v, a]));
        let files = [
            ("rgb16.png", image::DynamicImage::ImageRgb16(rgb16.clone())),
            ("rgb16.tif", image::DynamicImage::ImageRgb16(rgb16)),
            ("rgba16.png", image::DynamicImage::ImageRgba16(rgba16)),
            ("la16.png", image::DynamicImage::ImageLumaA16(la16)),
        ];
        for (name, img) in files {
            let path = dir.path().join(name);
            img.save(&path).unwrap();
            let rgb = load_rgb(&path).unwrap();
            assert!(
                rgb.pixels().all(|p| p.0 == [0x12; 3]),
                "{name}: {:?}",
                rgb.get_pixel(0, 0)
            );
        }
        // Alpha reduces the same way before compositing: 0x80FF -> 128, so 0 over white -> 127.
        let half = image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(
            1,
            1,
            image::Rgba([0, 0, 0, 0x80FF]),
        );
        let path = dir.path().join("half.png");
        image::DynamicImage::ImageRgba16(half).save(&path).unwrap();
        assert_eq!(load_rgb(&path).unwrap().get_pixel(0, 0).0, [127; 3]);
    }

    /// A bottom-up 16-bit BMP with BI_BITFIELDS masks (5-6-5), `w` even.
    fn bmp565(w: u32, px: &[u16]) -> Vec<u8> {
        let h = px.len() as u32 / w;
        let mut out = b"BM".to_vec();
        out.extend((66 + 2 * px.len() as u32).to_le_bytes());
        out.extend([0; 4]);
        out.extend(66u32.to_le_bytes());
        for v in [40, w, h] {
            out.extend(v.to_le_bytes());
        }
        out.extend(1u16.to_le_bytes());
        out.extend(16u16.to_le_bytes());
        out.extend(3u32.to_le_bytes());
        out.extend([0; 20]);
        for m in [0xF800u32, 0x07E0, 0x001F] {
            out.extend(m.to_le_bytes());
        }
        for row in px.chunks(w as usize).rev() {
            out.extend(row.iter().flat_map(|v| v.to_le_bytes()));
        }
        out
    }

    #[test]
    fn sixteen_bit_bmp_channels_expand_like_pillow() {
        let dir = tempfile::tempdir().unwrap();
        // Pillow's BGR;16: v * 255 / 31 (or / 63), truncated: 3 -> 24 and 11 -> 44 (the
        // rounded expansion gives 25 and 45); the extremes stay 0 and 255.
        let px = |r: u16, g: u16, b: u16| (r << 11) | (g << 5) | b;
        let bmp = bmp565(2, &[px(3, 11, 3), px(31, 63, 0)]);
        let rgb = load_bytes(dir.path(), "565.bmp", &bmp).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [24, 44, 24]);
        assert_eq!(rgb.get_pixel(1, 0).0, [255, 255, 0]);
        // Every field value of both widths, against the formula.
        for bits in [5, 6] {
            let max = (1u32 << bits) - 1;
            let mut img = RgbImage::new(64, 1);
            for (v, p) in img.pixels_mut().enumerate().take(max as usize + 1) {
                p.0 = [(v as f64 * 255.0 / max as f64).round() as u8; 3];
            }
            bmp::expand_like_pillow(&mut img, [bits; 3]);
            for v in 0..=max {
                assert_eq!(
                    img.get_pixel(v, 0).0[0] as u32,
                    v * 255 / max,
                    "{bits} bits, {v}"
                );
            }
        }
        assert_eq!(bmp::channel_bits(&bmp), Some([5, 6, 5]));
    }

    /// A GIF with a 6×5 screen and one 3×2 frame of index 1 at (2, 1); background index 2.
    fn small_frame_gif(transparent: Option<u8>) -> Vec<u8> {
        let palette = [10, 20, 30, 200, 100, 50, 40, 220, 90, 0, 0, 255];
        let mut out = Vec::new();
        {
            let mut enc = ::gif::Encoder::new(&mut out, 6, 5, &palette).unwrap();
            let mut frame = ::gif::Frame::from_indexed_pixels(3, 2, [1; 6], transparent);
            (frame.left, frame.top) = (2, 1);
            enc.write_frame(&frame).unwrap();
        }
        out[11] = 2;
        out
    }

    #[test]
    fn gif_area_outside_a_small_first_frame_is_filled_like_pillow() {
        let dir = tempfile::tempdir().unwrap();
        // No transparency: palette entry 0 (Pillow ignores the background index here).
        let rgb = load_bytes(dir.path(), "plain.gif", &small_frame_gif(None)).unwrap();
        assert_eq!(rgb.dimensions(), (6, 5));
        assert_eq!(rgb.get_pixel(0, 0).0, [10, 20, 30]);
        assert_eq!(rgb.get_pixel(5, 4).0, [10, 20, 30]);
        assert_eq!(rgb.get_pixel(2, 1).0, [200, 100, 50]);
        assert_eq!(rgb.get_pixel(4, 2).0, [200, 100, 50]);
        assert_eq!(rgb.get_pixel(4, 3).0, [10, 20, 30]);
        // With a transparent index: the canvas is that index, composited onto white.
        let rgb = load_bytes(dir.path(), "trns.gif", &small_frame_gif(Some(3))).unwrap();
        assert_eq!(rgb.get_pixel(0, 0).0, [255; 3]);
        assert_eq!(rgb.get_pixel(3, 2).0, [200, 100, 50]);
    }

    #[test]
    fn an_empty_file_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_bytes(dir.path(), "empty.png", b"").unwrap_err();
        assert_eq!(e.msg, "empty file");
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

    /// What FD-Align writes for a source without `preprocessor_config.json` reads back the same.
    #[test]
    fn hf_json_round_trips() {
        for n in 0..6 {
            assert_eq!(Resample::from_pil(n).unwrap().to_pil(), n);
        }
        assert_eq!(Resample::from_pil(6), None);
        let p = |json: &str| PreprocessConfig::from_json(json, 32).unwrap();
        for c in [
            PreprocessConfig::openai(224),
            p(r#"{"do_center_crop": false, "do_resize": false, "do_normalize": false}"#),
            p(
                r#"{"size": {"height": 40, "width": 36}, "crop_size": {"height": 32, "width": 30},
                  "resample": 2, "do_rescale": false, "image_mean": [0.5], "image_std": [0.25],
                  "do_convert_rgb": false}"#,
            ),
        ] {
            let text = c.to_hf_json().to_string();
            let image_size = c.crop.0 as usize;
            assert_eq!(
                PreprocessConfig::from_json(&text, image_size).unwrap(),
                c,
                "{text}"
            );
        }
    }

    /// `clipft info`'s description follows the config, including the no-resize, no-crop case.
    #[test]
    fn describe_names_each_step() {
        let d = PreprocessConfig::openai(224).describe();
        assert_eq!(d.0, "shortest edge to 224, centre crop 224x224, bicubic");
        assert!(
            d.1.starts_with("rescale 1/255, mean [0.48145467"),
            "{}",
            d.1
        );
        let p = |json: &str| PreprocessConfig::from_json(json, 32).unwrap();
        let d = p(r#"{"do_center_crop": false}"#).describe();
        assert_eq!(
            d.0,
            "shortest edge to 32, no centre crop (images must resize to 32x32), bicubic"
        );
        let q = p(r#"{"do_center_crop": false, "do_resize": false, "do_normalize": false}"#);
        assert_eq!(
            q.describe().0,
            "no resize, no centre crop (images must be 32x32), bicubic"
        );
        assert_eq!(q.describe().1, "rescale 1/255, no normalisation");
        assert!(!q.declines_rgb && p(r#"{"do_convert_rgb": false}"#).declines_rgb);
        // The recorded flag does not change the pixels' cache key.
        assert_eq!(
            p(r#"{"do_convert_rgb": false}"#).cache_key(),
            p("{}").cache_key()
        );
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

//! Generated checkpoints and image sets: the embedded default of `clipft demo`, the tests and the
//! benchmarks. Nothing here downloads anything.
//!
//! The tokenizer is the real CLIP BPE pipeline truncated to its first 1000 merges
//! (`configs/tiny-tokenizer.json`), so prompts tokenise the way they do with the real vocabulary,
//! only into more pieces.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::config::{Activation, ClipConfig, ClipTextConfig, ClipVisionConfig};

pub const TINY_TOKENIZER_JSON: &str = include_str!("../../configs/tiny-tokenizer.json");
/// Vocabulary size of [`TINY_TOKENIZER_JSON`]: 512 byte tokens, 1000 merges, 2 specials.
pub const TINY_VOCAB: usize = 1514;

/// A small CLIP shape that runs in milliseconds on a CPU.
pub fn tiny_config() -> ClipConfig {
    ClipConfig {
        text_config: ClipTextConfig {
            vocab_size: TINY_VOCAB,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            bos_token_id: TINY_VOCAB as u32 - 2,
            eos_token_id: TINY_VOCAB as u32 - 1,
            pad_token_id: TINY_VOCAB as u32 - 1,
        },
        vision_config: ClipVisionConfig {
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_channels: 3,
            image_size: 32,
            patch_size: 8,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        },
        projection_dim: 32,
        logit_scale_init_value: 2.6592,
    }
}

fn normal(rng: &mut ChaCha8Rng, n: usize, mean: f32, std: f32) -> Vec<f32> {
    // Box-Muller: deterministic across platforms, unlike candle's randn.
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random_range(f64::EPSILON..1.0);
            let u2: f64 = rng.random();
            mean + std * ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

/// Writes a random CLIP checkpoint in the Hugging Face layout (`config.json`, `model.safetensors`,
/// `tokenizer.json`, `preprocessor_config.json`) to `dir`. Same seed, same bytes.
pub fn write_checkpoint(dir: &Path, config: &ClipConfig, seed: u64) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, shape) in config.expected_tensors() {
        let n: usize = shape.iter().product();
        let fan_in = if shape.len() >= 2 {
            shape[1..].iter().product::<usize>()
        } else {
            shape[0]
        };
        let (mean, std) = if name.ends_with("norm.weight")
            || name.contains("layer_norm") && name.ends_with(".weight")
            || name.contains("layrnorm.weight")
        {
            (1.0, 0.05)
        } else if name.ends_with(".bias") {
            (0.0, 0.02)
        } else if name.contains("embedding") {
            (0.0, 0.1)
        } else {
            (0.0, 1.0 / (fan_in as f32).sqrt())
        };
        let t = Tensor::from_vec(normal(&mut rng, n, mean, std), shape, &Device::Cpu)?;
        tensors.push((name, t));
    }
    tensors.push((
        "logit_scale".into(),
        Tensor::new(100f32.ln(), &Device::Cpu)?,
    ));
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)?;
    crate::io::write_atomic(&dir.join("model.safetensors"), &bytes)?;

    // The tokenizer written below is always the tiny one: its start/end tokens are what the text
    // tower must pool on, whatever the rest of the config.
    let mut config = config.clone();
    config.text_config.bos_token_id = TINY_VOCAB as u32 - 2;
    config.text_config.eos_token_id = TINY_VOCAB as u32 - 1;
    config.text_config.pad_token_id = TINY_VOCAB as u32 - 1;
    let mut cfg = serde_json::to_value(&config)?;
    cfg["architectures"] = serde_json::json!(["CLIPModel"]);
    cfg["model_type"] = "clip".into();
    cfg["text_config"]["model_type"] = "clip_text_model".into();
    cfg["vision_config"]["model_type"] = "clip_vision_model".into();
    cfg["text_config"]["projection_dim"] = config.projection_dim.into();
    cfg["vision_config"]["projection_dim"] = config.projection_dim.into();
    crate::io::write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;
    crate::io::write_atomic(&dir.join("tokenizer.json"), TINY_TOKENIZER_JSON.as_bytes())?;
    let s = config.vision_config.image_size;
    let pre = serde_json::json!({
        "crop_size": {"height": s, "width": s},
        "do_center_crop": true, "do_convert_rgb": true, "do_normalize": true, "do_rescale": true, "do_resize": true,
        "image_mean": crate::preprocess::OPENAI_MEAN, "image_std": crate::preprocess::OPENAI_STD,
        "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1.0 / 255.0,
        "size": {"shortest_edge": s}
    });
    crate::io::write_atomic(
        &dir.join("preprocessor_config.json"),
        serde_json::to_string_pretty(&pre)?.as_bytes(),
    )?;
    Ok(())
}

/// Texture of a generated class.
#[derive(Debug, Clone, Copy)]
enum Pattern {
    /// Sine stripes at this angle (radians).
    Stripes(f32),
    Checks,
    Rings,
}

/// Classes of the generated image set: folder name, colour, texture, spatial frequency.
const SYNTH_CLASSES: &[(&str, [u8; 3], Pattern, f32)] = &[
    (
        "red_vertical_stripes",
        [200, 40, 40],
        Pattern::Stripes(0.0),
        0.35,
    ),
    (
        "green_horizontal_stripes",
        [40, 170, 60],
        Pattern::Stripes(std::f32::consts::FRAC_PI_2),
        0.35,
    ),
    (
        "blue_diagonal_stripes",
        [40, 70, 200],
        Pattern::Stripes(std::f32::consts::FRAC_PI_4),
        0.5,
    ),
    (
        "yellow_fine_stripes",
        [210, 190, 40],
        Pattern::Stripes(0.0),
        1.1,
    ),
    ("purple_checks", [140, 50, 160], Pattern::Checks, 0.45),
    ("orange_rings", [230, 130, 30], Pattern::Rings, 0.5),
];

/// Number of distinct classes [`write_dataset`] can generate.
pub const MAX_SYNTH_CLASSES: usize = SYNTH_CLASSES.len();

fn synth_image(class: usize, rng: &mut ChaCha8Rng) -> RgbImage {
    let (_, color, pattern, freq) = SYNTH_CLASSES[class % SYNTH_CLASSES.len()];
    let (w, h) = (rng.random_range(40..100u32), rng.random_range(40..100u32));
    let phase: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let jitter: f32 = rng.random_range(0.85..1.15);
    let (cx, cy) = (
        w as f32 * rng.random_range(0.3..0.7),
        h as f32 * rng.random_range(0.3..0.7),
    );
    let f = freq * jitter;
    let mut img = RgbImage::new(w, h);
    for (x, y, p) in img.enumerate_pixels_mut() {
        let (xf, yf) = (x as f32, y as f32);
        let wave = match pattern {
            Pattern::Checks => ((xf * f).sin() * (yf * f).sin()).signum(),
            Pattern::Rings => ((xf - cx).hypot(yf - cy) * f + phase).sin(),
            Pattern::Stripes(a) => ((xf * a.cos() + yf * a.sin()) * f + phase).sin(),
        };
        let shade = 0.65 + 0.35 * wave;
        let mut px = [0u8; 3];
        for (c, v) in px.iter_mut().enumerate() {
            let noise: f32 = rng.random_range(-25.0..25.0);
            *v = (color[c] as f32 * shade + noise).clamp(0.0, 255.0) as u8;
        }
        *p = Rgb(px);
    }
    img
}

/// Writes a labelled image set `dir/{train,val,test}/<class>/<n>.{png,jpg}` of `classes` classes
/// (at most 6) with the given number of images per class and split. Same seed, same images.
pub fn write_dataset(
    dir: &Path,
    classes: usize,
    per_split: [(&str, usize); 3],
    seed: u64,
) -> Result<()> {
    let classes = classes.min(MAX_SYNTH_CLASSES);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for (split, n) in per_split {
        for (c, (folder, ..)) in SYNTH_CLASSES.iter().enumerate().take(classes) {
            let d = dir.join(split).join(folder);
            std::fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            for i in 0..n {
                let img = synth_image(c, &mut rng);
                let (path, format) = if i % 2 == 0 {
                    (d.join(format!("{i:03}.png")), image::ImageFormat::Png)
                } else {
                    (d.join(format!("{i:03}.jpg")), image::ImageFormat::Jpeg)
                };
                // Encoded in memory and written atomically: a full disk leaves no cut image.
                let mut bytes = std::io::Cursor::new(Vec::new());
                img.write_to(&mut bytes, format)
                    .with_context(|| format!("encoding {}", path.display()))?;
                crate::io::write_atomic(&path, bytes.get_ref())?;
            }
        }
    }
    Ok(())
}

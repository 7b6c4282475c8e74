//! Dumps clipft's preprocessed pixels for a list of images, for comparison with
//! `CLIPImageProcessor` (see scripts/check_preprocess.py).
//!
//!     cargo run --release --example pixels -- PREPROCESSOR_CONFIG.json OUT.safetensors IMAGE...

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use clipft::preprocess::{load_rgb, PreprocessConfig, View};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        args.len() >= 3,
        "usage: pixels PREPROCESSOR_CONFIG.json OUT.safetensors IMAGE..."
    );
    let pre = PreprocessConfig::from_json(&std::fs::read_to_string(&args[0])?, 224)
        .map_err(anyhow::Error::msg)?;
    let (h, w) = pre.crop;
    let mut rows = Vec::new();
    for p in &args[2..] {
        let px = pre.apply(&load_rgb(&PathBuf::from(p))?, &View::Center, 0);
        rows.push(Tensor::from_vec(
            px,
            (3, h as usize, w as usize),
            &Device::Cpu,
        )?);
    }
    let t = Tensor::stack(&rows, 0)?;
    clipft::io::save(
        &PathBuf::from(&args[1]),
        &[("pixel_values", &t)],
        &serde_json::json!({ "images": &args[2..] }),
    )
}

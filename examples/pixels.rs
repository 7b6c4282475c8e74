//! Dumps clipft's preprocessed pixels for a list of images, for comparison with
//! `CLIPImageProcessor` (see scripts/check_preprocess.py).
//!
//!     cargo run --release --example pixels -- [--fast-decode] PREPROCESSOR_CONFIG.json OUT.safetensors IMAGE...

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use clipft::preprocess::{Decode, PreprocessConfig, View};

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let decode = if args.first().is_some_and(|a| a == "--fast-decode") {
        args.remove(0);
        Decode::Reduced
    } else {
        Decode::Exact
    };
    anyhow::ensure!(
        args.len() >= 3,
        "usage: pixels [--fast-decode] PREPROCESSOR_CONFIG.json OUT.safetensors IMAGE..."
    );
    let pre = PreprocessConfig::from_json(&std::fs::read_to_string(&args[0])?, 224)
        .map_err(anyhow::Error::msg)?;
    let (h, w) = pre.crop;
    let mut rows = Vec::new();
    for p in &args[2..] {
        let mut px = vec![0f32; 3 * h as usize * w as usize];
        pre.read_into(&PathBuf::from(p), &View::Center, decode, 0, &mut px)?;
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

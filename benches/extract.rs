//! Feature-extraction throughput on a folder of real-size JPEGs with a ViT-B/32-sized checkpoint,
//! split into decode+preprocess, the pipeline's feed rate to the model's device, and model time.
//!
//!     cargo bench --bench extract
//!
//! Environment (all optional):
//! - `CLIPFT_BENCH_MODEL`: checkpoint folder (default: a random ViT-B/32 generated in a temp dir)
//! - `CLIPFT_BENCH_IMAGES`: folder of images (default: 256 generated 500×375 JPEGs cut from the
//!   photographs in tests/fixtures/preprocess)
//! - `CLIPFT_BENCH_N` (256): how many JPEGs to generate when no folder is given
//! - `CLIPFT_BENCH_BATCH` (32), `CLIPFT_BENCH_DTYPE` (f32), `CLIPFT_BENCH_DEVICE` (cpu; `cuda`)
//! - `CLIPFT_BENCH_PASSES` (1): passes over the preprocessed batches in the model-only timing,
//!   and the decode+preprocess timing's number of passes (the best is printed)
//! - `CLIPFT_BENCH_TEXT_CLASSES` (20): class names for the text timing (× the 80 ImageNet
//!   templates, through `text_classifier`); 0 skips it
//! - `CLIPFT_BENCH_TEXT_BATCH` (`features::TEXT_BATCH`, what the CLI uses): prompts per batch;
//!   80 encodes class by class, as the official repositories do
//! - `CLIPFT_BENCH_FAST_DECODE` (0): 1 decodes as `--fast-decode` does (JPEGs reduced in the
//!   decoder where large enough)
//! - `CLIPFT_BENCH_TRANSFER` (auto): `normalized` or `bytes`, how pixels reach the device
//!   (`features::PixelTransfer`; auto is f32 on the CPU, bytes on a GPU)
//! - `CLIPFT_BENCH_ROUNDS` (1): model-only and end-to-end timings alternate this often; the best
//!   of each is printed, and the median of each round's end-to-end / model-only ratio (the two
//!   timings of a round are seconds apart, so a busy neighbour moves both)
//! - `RAYON_NUM_THREADS` (all cores)
//!
//! `scripts/bench_vs_pytorch.py` runs this next to `transformers` on the same checkpoint and images.

// The allocator the clipft binary uses (src/main.rs); `keep_freed_memory` is called in main.
#[global_allocator]
static GLOBAL: clipft::alloc::Allocator = clipft::alloc::Allocator {};

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use clipft::features::{
    decoding_threads, image_batches, image_features, text_classifier, ExtractOptions, PixelTransfer,
};
use clipft::model::{synth, Clip, ClipConfig, DTypeArg, DeviceArg, ModelSpec};
use clipft::preprocess::{load_rgb, Decode, View};
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

fn make_images(dir: &Path, n: usize) {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/preprocess");
    let photos = [
        load_rgb(&fixtures.join("photo1.jpg")).unwrap(),
        load_rgb(&fixtures.join("photo2.jpg")).unwrap(),
    ];
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    std::fs::create_dir_all(dir).unwrap();
    for i in 0..n {
        let src = &photos[i % 2];
        // A random crop of at least half the photo, scaled to 500×375 like a typical dataset image.
        let (w, h) = (
            rng.random_range(src.width() / 2..=src.width()),
            rng.random_range(src.height() / 2..=src.height()),
        );
        let (x, y) = (
            rng.random_range(0..=src.width() - w),
            rng.random_range(0..=src.height() - h),
        );
        let crop = image::imageops::crop_imm(src, x, y, w, h).to_image();
        let img = image::imageops::resize(&crop, 500, 375, image::imageops::FilterType::Triangle);
        img.save(dir.join(format!("{i:04}.jpg"))).unwrap();
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn main() {
    clipft::alloc::keep_freed_memory();
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = std::env::var("CLIPFT_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let d = tmp.path().join("vit-b32");
            eprintln!("generating a random ViT-B/32 checkpoint in {}", d.display());
            synth::write_checkpoint(&d, &ClipConfig::vit_base_patch32(), 0).unwrap();
            d
        });
    let image_dir = std::env::var("CLIPFT_BENCH_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let d = tmp.path().join("images");
            let n: usize = env_or("CLIPFT_BENCH_N", "256").parse().unwrap();
            eprintln!("generating {n} JPEGs (500×375) in {}", d.display());
            make_images(&d, n);
            d
        });
    let batch: usize = env_or("CLIPFT_BENCH_BATCH", "32").parse().unwrap();
    let dtype: DTypeArg = env_or("CLIPFT_BENCH_DTYPE", "f32").parse().unwrap();
    let device: DeviceArg = env_or("CLIPFT_BENCH_DEVICE", "cpu").parse().unwrap();
    let passes: usize = env_or("CLIPFT_BENCH_PASSES", "1").parse().unwrap();
    let rounds: usize = env_or("CLIPFT_BENCH_ROUNDS", "1")
        .parse::<usize>()
        .unwrap()
        .max(1);
    let text_classes: usize = env_or("CLIPFT_BENCH_TEXT_CLASSES", "20").parse().unwrap();
    assert!(
        text_classes <= 64,
        "CLIPFT_BENCH_TEXT_CLASSES: at most 64 (the made-up class names must be distinct)"
    );
    let text_batch: usize = env_or(
        "CLIPFT_BENCH_TEXT_BATCH",
        &clipft::features::TEXT_BATCH.to_string(),
    )
    .parse()
    .unwrap();
    let decode = if env_or("CLIPFT_BENCH_FAST_DECODE", "0") == "1" {
        Decode::Reduced
    } else {
        Decode::Exact
    };
    let transfer = match env_or("CLIPFT_BENCH_TRANSFER", "auto").as_str() {
        "auto" => PixelTransfer::Auto,
        "normalized" => PixelTransfer::Normalized,
        "bytes" => PixelTransfer::Bytes,
        t => panic!("CLIPFT_BENCH_TRANSFER={t}: expected auto, normalized or bytes"),
    };
    let threads = rayon::current_num_threads();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&image_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    let n = paths.len();

    let mut spec = ModelSpec::local(&model_dir);
    spec.dtype = dtype;
    spec.device = device;
    let clip = Clip::load(&spec).unwrap();
    let (s, _) = clip.preprocess.crop;
    let s = s as usize;

    // 1. Decode + preprocess only, in parallel on all threads; the best of `passes` (one pass
    //    over a few hundred images is short enough for a neighbour's burst to show). The
    //    outputs are written into buffers allocated and touched before the clock starts, as the
    //    pipeline recycles its batch buffers: fresh memory would time the page faults of
    //    n × 600 KB instead (in a VM whose freed memory goes back to the host, a pass into
    //    fresh memory ran at a third of the rate of one into reused memory).
    let mut pixels: Vec<Vec<f32>> = (0..n).map(|_| vec![f32::NAN; 3 * s * s]).collect();
    let mut pre = 0f64;
    for _ in 0..passes.max(1) {
        let t = Instant::now();
        paths.par_iter().zip(&mut pixels).for_each(|(p, px)| {
            clip.preprocess
                .read_into(p, &View::Center, decode, 0, px)
                .unwrap();
        });
        pre = pre.max(n as f64 / t.elapsed().as_secs_f64());
    }

    // 2. Model only, on preprocessed batches (one warm-up batch first).
    let batches: Vec<Tensor> = pixels
        .chunks(batch)
        .filter(|c| c.len() == batch)
        .map(|c| {
            Tensor::from_vec(c.concat(), (batch, 3, s, s), &Device::Cpu)
                .unwrap()
                .to_dtype(clip.dtype)
                .unwrap()
                .to_device(&clip.device)
                .unwrap()
        })
        .collect();
    clip.model.image_features(&batches[0]).unwrap();
    clip.device.synchronize().unwrap();
    let model_pass = || {
        let t = Instant::now();
        for _ in 0..passes {
            for b in &batches {
                clip.model.image_features(b).unwrap();
            }
        }
        clip.device.synchronize().unwrap();
        (passes * batches.len() * batch) as f64 / t.elapsed().as_secs_f64()
    };

    // 3. The pipeline alone: batches decoded on its own pool, uploaded and made the model's
    //    input on its device, nothing else. End to end can be no faster than this.
    let opts = ExtractOptions {
        batch_size: batch,
        decode,
        transfer,
        ..ExtractOptions::default()
    };
    let refs: Vec<&std::path::Path> = paths.iter().map(PathBuf::as_path).collect();
    let t = Instant::now();
    image_batches(&clip, &refs, &View::Center, &opts, |x, _| {
        if let Some(x) = x {
            x.device().synchronize()?;
        }
        Ok(())
    })
    .unwrap();
    let feed = n as f64 / t.elapsed().as_secs_f64();

    // 4. End to end through the pipelined extractor (no cache), in rounds with step 2.
    let e2e_pass = || {
        let t = Instant::now();
        let f = image_features(&clip, &paths, &View::Center, &opts).unwrap();
        assert_eq!(f.kept.len(), n);
        n as f64 / t.elapsed().as_secs_f64()
    };
    let (mut model, mut e2e, mut ratios) = (0f64, 0f64, Vec::new());
    for _ in 0..rounds {
        let m = model_pass();
        let e = e2e_pass();
        (model, e2e) = (model.max(m), e2e.max(e));
        ratios.push(e / m);
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[ratios.len() / 2];

    // 5. Text: a class-name × template classifier.
    let text = (text_classes > 0).then(|| {
        let templates = clipft::templates::resolve("imagenet80").unwrap();
        let names: Vec<String> = (0..text_classes).map(class_name).collect();
        text_classifier(&clip, &names[..1], &templates, text_batch, false).unwrap();
        let t = Instant::now();
        text_classifier(&clip, &names, &templates, text_batch, false).unwrap();
        (names.len() * templates.len()) as f64 / t.elapsed().as_secs_f64()
    });

    println!(
        "clipft feature extraction: {} ({}, {}), {n} images from {}, batch {batch}, {threads} threads, \
         JPEG decoding {}{}",
        clip.config().arch_name(),
        dtype,
        clipft::model::load::device_name(&clip.device),
        image_dir.display(),
        if clipft::preprocess::jpeg_simd() { "SIMD" } else { "without SIMD" },
        if decode == Decode::Exact { "" } else { ", fast decode" }
    );
    println!("  decode+preprocess  {pre:8.1} img/s");
    println!(
        "  pipeline feed      {feed:8.1} img/s  (decoded on {} threads, {transfer:?} pixels)",
        decoding_threads(&clip.device)
    );
    println!("  model              {model:8.1} img/s");
    if rounds == 1 {
        println!(
            "  end to end         {e2e:8.1} img/s  ({:.0}% of model-only)",
            100.0 * e2e / model
        );
    } else {
        println!(
            "  end to end         {e2e:8.1} img/s  ({:.0}% of model-only; best of {rounds} rounds each, \
             median per-round ratio {:.0}%, range {:.0}–{:.0}%)",
            100.0 * e2e / model,
            100.0 * median,
            100.0 * ratios[0],
            100.0 * ratios[ratios.len() - 1]
        );
    }
    if let Some(text) = text {
        println!("  text               {text:8.1} prompts/s (batches of {text_batch} prompts)");
    }
}

/// Deterministic made-up class names of varied length (the same list in bench_vs_pytorch.py).
fn class_name(i: usize) -> String {
    const PARTS: [&str; 8] = [
        "golden",
        "retriever",
        "sports car",
        "tabby",
        "cat",
        "maple",
        "leaf",
        "aircraft carrier",
    ];
    // Distinct for i < 64: clipft refuses classes whose prompts tokenize the same.
    format!("{} {}", PARTS[i % 8], PARTS[(i / 8 + i * 3 + 1) % 8])
}

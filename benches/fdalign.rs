//! One FD-Align training step (frozen forward for P₀, trainable forward, backward, Nesterov SGD
//! update) at batch 32 on a ViT-B/32-sized random checkpoint; prints seconds per step and the
//! process's peak resident memory.
//!
//!     cargo bench --bench fdalign
//!
//! `CLIPFT_BENCH_MODEL` selects a checkpoint folder (default: a random ViT-B/32 in a temp dir),
//! `CLIPFT_BENCH_BATCH` the batch (32), `CLIPFT_BENCH_STEPS` the timed steps (3),
//! `CLIPFT_BENCH_DEVICE` the device (cpu; `cuda`: timed after a synchronise),
//! `CLIPFT_BENCH_UNFUSED=1` trains the encoder layers through candle's graph of their ops
//! instead of as single nodes (the CPU's f32 default; `src/model/fused_layer.rs`),
//! `CLIPFT_BENCH_DTYPE` the compute dtype (f32; `bf16`/`f16`: mixed precision as `clipft fdalign
//! train --dtype` runs it: f32 weights cast once per step, f16 with loss scaling).
//! `scripts/bench_fdalign_vs_pytorch.py` runs the same step in PyTorch next to it.

// The allocator the clipft binary uses (src/main.rs); `keep_freed_memory` is called in main.
#[global_allocator]
static GLOBAL: clipft::alloc::Allocator = clipft::alloc::Allocator {};

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use clipft::methods::fdalign;
use clipft::model::trainable::TrainableVision;
use clipft::model::{synth, Clip, ClipConfig, DTypeArg, DeviceArg, ModelSpec};

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() {
    clipft::alloc::keep_freed_memory();
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = std::env::var("CLIPFT_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            let d = tmp.path().join("vit-b32");
            synth::write_checkpoint(&d, &ClipConfig::vit_base_patch32(), 0).unwrap();
            d
        });
    let batch: usize = std::env::var("CLIPFT_BENCH_BATCH")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let steps: usize = std::env::var("CLIPFT_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mut spec = ModelSpec::local(&model_dir);
    spec.device = std::env::var("CLIPFT_BENCH_DEVICE")
        .unwrap_or_else(|_| "cpu".into())
        .parse::<DeviceArg>()
        .unwrap();
    spec.dtype = std::env::var("CLIPFT_BENCH_DTYPE")
        .unwrap_or_else(|_| "f32".into())
        .parse::<DTypeArg>()
        .unwrap();
    let clip = Clip::load(&spec).unwrap();
    let dev: Device = clip.device.clone();
    let mut tv = TrainableVision::from_files(&clip.files, clip.config(), &dev, DType::F32).unwrap();
    if std::env::var("CLIPFT_BENCH_UNFUSED").is_ok_and(|v| v == "1") {
        tv = tv.without_fused_layers();
    }
    let d = clip.config().projection_dim;
    let classes = 100;
    let s = clip.config().vision_config.image_size;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, s, s), &dev).unwrap();
    let y = Tensor::from_vec(
        (0..batch as u32)
            .map(|i| i % classes as u32)
            .collect::<Vec<_>>(),
        batch,
        &dev,
    )
    .unwrap();
    let protos = (Tensor::randn(0f32, 1.0, (20, d), &dev).unwrap() * 10.0).unwrap();
    let head_w =
        Var::from_tensor(&(Tensor::randn(0f32, 1.0, (classes, d), &dev).unwrap() * 5.0).unwrap())
            .unwrap();
    let head_b = Var::zeros(classes, DType::F32, &dev).unwrap();
    let mut vars: Vec<Var> = tv.vars().into_iter().map(|(_, v)| v).collect();
    vars.extend([head_w.clone(), head_b.clone()]);
    let mut opt = fdalign::Sgd::new(vars, 5e-5 * batch as f64 / 256.0, 0.9, 5e-4);
    let compute = clip.dtype;
    let mut scaler = fdalign::LossScaler::for_dtype(compute);
    // Seconds spent in each phase of the timed steps: frozen forward, trainable forward and
    // loss, backward, optimiser update.
    let mut phases = [0f64; 4];
    let mut step = |phases: &mut [f64; 4]| {
        let mut lap = {
            let dev = &dev;
            let mut t = Instant::now();
            move |slot: &mut f64| {
                dev.synchronize().unwrap();
                *slot += t.elapsed().as_secs_f64();
                t = Instant::now();
            }
        };
        let f0 = clip
            .model
            .image_features(&x)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        lap(&mut phases[0]);
        let ft = tv
            .in_dtype(compute)
            .unwrap()
            .forward(&x)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let (total, _, _) = fdalign::loss(
            &ft,
            &f0,
            &y,
            head_w.as_tensor(),
            head_b.as_tensor(),
            &protos,
            20.0,
        )
        .unwrap();
        lap(&mut phases[1]);
        let mut grads = tv.backward(&(total * scaler.scale).unwrap()).unwrap();
        lap(&mut phases[2]);
        if scaler.unscale(&mut grads, opt.vars()).unwrap() {
            opt.step(&grads).unwrap();
        }
        lap(&mut phases[3]);
    };
    step(&mut [0f64; 4]); // warm-up
    dev.synchronize().unwrap();
    let t = Instant::now();
    for _ in 0..steps {
        step(&mut phases);
    }
    dev.synchronize().unwrap();
    let per_step = t.elapsed().as_secs_f64() / steps as f64;
    println!(
        "clipft FD-Align step: {} batch {batch}, {}, compute {:?}, {} threads",
        clip.config().arch_name(),
        clipft::model::load::device_name(&dev),
        compute,
        rayon::current_num_threads()
    );
    println!("  seconds per step   {per_step:.3}");
    println!("  images per second  {:.2}", batch as f64 / per_step);
    println!("  peak RSS MiB       {:.0}", peak_rss_mib());
    for (name, secs) in [
        "frozen forward",
        "trainable forward",
        "backward",
        "SGD update",
    ]
    .iter()
    .zip(phases)
    {
        println!("    {name:<18} {:.3} s", secs / steps as f64);
    }
}

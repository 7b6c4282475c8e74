//! Where the time of one ViT-B/32 encoder layer goes, op by op, on the CPU or a GPU: the same
//! candle calls `src/model/clip.rs` makes, on random tensors of the layer's shapes.
//!
//!     cargo bench --bench layer_ops
//!
//! Environment (optional): `CLIPFT_BENCH_DEVICE` (cpu; `cuda`), `CLIPFT_BENCH_DTYPE` (f32, f16,
//! bf16), `CLIPFT_BENCH_BATCH` (32), `CLIPFT_BENCH_REPS` (10). Prints milliseconds per call and
//! each op's share of the sum; the GEMMs' rate in TFLOP/s.

// The allocator the clipft binary uses (src/main.rs); `keep_freed_memory` is called in main.
#[global_allocator]
static GLOBAL: clipft::alloc::Allocator = clipft::alloc::Allocator {};

use std::time::Instant;

use candle_core::{Device, Tensor};
use clipft::model::kernels::{dense_bias, layer_norm, quick_gelu};
use clipft::model::load::device_name;
use clipft::model::{DTypeArg, DeviceArg};

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn main() {
    clipft::alloc::keep_freed_memory();
    let device = env_or("CLIPFT_BENCH_DEVICE", "cpu")
        .parse::<DeviceArg>()
        .unwrap();
    let dev = match device {
        DeviceArg::Cuda(n) => Device::new_cuda(n).unwrap(),
        _ => Device::Cpu,
    };
    let dtype = env_or("CLIPFT_BENCH_DTYPE", "f32")
        .parse::<DTypeArg>()
        .unwrap()
        .dtype();
    let b: usize = env_or("CLIPFT_BENCH_BATCH", "32").parse().unwrap();
    let reps: usize = env_or("CLIPFT_BENCH_REPS", "10").parse().unwrap();
    let (t, h, nh, inter) = (50usize, 768usize, 12usize, 3072usize);
    let hd = h / nh;
    let rnd = |shape: &[usize]| {
        Tensor::randn(0f32, 0.02, shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let x = rnd(&[b, t, h]);
    let x2 = x.reshape((b * t, h)).unwrap();
    let (ln_w, ln_b) = (rnd(&[h]), rnd(&[h]));
    let (w_qkv, b_qkv) = (rnd(&[3 * h, h]), rnd(&[3 * h]));
    let (w_o, b_o) = (rnd(&[h, h]), rnd(&[h]));
    let (w1, b1) = (rnd(&[inter, h]), rnd(&[inter]));
    let (w2, b2) = (rnd(&[h, inter]), rnd(&[h]));
    let qkv = dense_bias(&x2, &w_qkv, &b_qkv).unwrap();
    let heads = qkv
        .reshape((b, t, 3, nh, hd))
        .unwrap()
        .permute((2, 0, 3, 1, 4))
        .unwrap()
        .contiguous()
        .unwrap();
    let (q, k, v) = (
        heads.get(0).unwrap(),
        heads.get(1).unwrap(),
        heads.get(2).unwrap(),
    );
    let scores = q.matmul(&k.t().unwrap()).unwrap();
    let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
    let ctx = probs.matmul(&v).unwrap();
    let hidden = dense_bias(&x2, &w1, &b1).unwrap();
    let act = quick_gelu(&hidden).unwrap();

    type Op<'a> = (&'a str, f64, Box<dyn Fn() -> Tensor + 'a>);
    let gf = |m: usize, n: usize, k: usize| 2.0 * (m * n * k) as f64;
    let ops: Vec<Op> = vec![
        (
            "layer_norm",
            0.0,
            // As `clip::LayerNorm` dispatches: clipft's kernel on the CPU in f32.
            Box::new(|| {
                layer_norm(&x, &ln_w, &ln_b, 1e-5)
                    .unwrap_or_else(|| candle_nn::ops::layer_norm(&x, &ln_w, &ln_b, 1e-5))
                    .unwrap()
            }),
        ),
        (
            "qkv dense+bias",
            gf(b * t, 3 * h, h),
            Box::new(|| dense_bias(&x2, &w_qkv, &b_qkv).unwrap()),
        ),
        (
            "head split copy",
            0.0,
            Box::new(|| {
                qkv.reshape((b, t, 3, nh, hd))
                    .unwrap()
                    .permute((2, 0, 3, 1, 4))
                    .unwrap()
                    .contiguous()
                    .unwrap()
            }),
        ),
        (
            "q·kᵀ",
            gf(b * nh * t, t, hd),
            Box::new(|| q.matmul(&k.t().unwrap()).unwrap()),
        ),
        (
            "softmax",
            0.0,
            Box::new(|| candle_nn::ops::softmax_last_dim(&scores).unwrap()),
        ),
        (
            "p·v",
            gf(b * nh * t, hd, t),
            Box::new(|| probs.matmul(&v).unwrap()),
        ),
        (
            "head merge copy",
            0.0,
            Box::new(|| ctx.transpose(1, 2).unwrap().reshape((b * t, h)).unwrap()),
        ),
        (
            "out dense+bias",
            gf(b * t, h, h),
            Box::new(|| dense_bias(&x2, &w_o, &b_o).unwrap()),
        ),
        ("residual add", 0.0, Box::new(|| (&x + &x).unwrap())),
        (
            "fc1 dense+bias",
            gf(b * t, inter, h),
            Box::new(|| dense_bias(&x2, &w1, &b1).unwrap()),
        ),
        ("quick_gelu", 0.0, Box::new(|| quick_gelu(&hidden).unwrap())),
        (
            "fc2 dense+bias",
            gf(b * t, h, inter),
            Box::new(|| dense_bias(&act, &w2, &b2).unwrap()),
        ),
    ];
    let time = |f: &dyn Fn() -> Tensor| {
        f();
        dev.synchronize().unwrap();
        let start = Instant::now();
        for _ in 0..reps {
            f();
        }
        dev.synchronize().unwrap();
        start.elapsed().as_secs_f64() / reps as f64
    };
    let rows: Vec<_> = ops
        .iter()
        .map(|(name, flops, f)| (name, flops, time(f)))
        .collect();
    let total: f64 = rows.iter().map(|r| r.2).sum();
    println!(
        "one ViT-B/32 encoder layer, batch {b} ({} tokens), {:?}, {}",
        b * t,
        dtype,
        device_name(&dev)
    );
    for (name, flops, s) in rows {
        let rate = if *flops > 0.0 {
            format!("{:7.2} TFLOP/s", flops / s / 1e12)
        } else {
            String::new()
        };
        println!(
            "  {name:16} {:9.3} ms  {:5.1}%  {rate}",
            s * 1e3,
            100.0 * s / total
        );
    }
    println!(
        "  {:16} {:9.3} ms  -> {:.0} img/s for 12 layers",
        "sum",
        total * 1e3,
        b as f64 / (12.0 * total)
    );
    // A model off the CPU folds QuickGELU's constant into fc1 and fc2
    // (`clip::BuildOptions::fold_quick_gelu`) and runs one SiLU instead.
    println!(
        "  {:16} {:9.3} ms  (instead of quick_gelu off the CPU)",
        "silu",
        time(&|| hidden.silu().unwrap()) * 1e3
    );
    // What the model runs on the CPU for the five ops from the head split to the head merge.
    let qkv = qkv.reshape((b, t, 3 * h)).unwrap();
    if let Some(Ok(_)) = clipft::model::attention_cpu::attention(&qkv, nh, None) {
        println!(
            "  {:16} {:9.3} ms  (head split to head merge, fused, as the CPU model runs it)",
            "attention core",
            time(&|| {
                clipft::model::attention_cpu::attention(&qkv, nh, None)
                    .unwrap()
                    .unwrap()
            }) * 1e3
        );
        // FD-Align's backward pass through it (recomputing the scores; the sum's backward is
        // a broadcast of ones).
        let var = candle_core::Var::from_tensor(&qkv).unwrap();
        let loss = clipft::model::attention_cpu::attention(var.as_tensor(), nh, None)
            .unwrap()
            .unwrap()
            .sum_all()
            .unwrap();
        println!(
            "  {:16} {:9.3} ms  (its gradient, as FD-Align's backward pass runs it)",
            "attention grad",
            time(&|| {
                let grads = loss.backward().unwrap();
                grads.get(var.as_tensor()).unwrap().clone()
            }) * 1e3
        );
    }
}

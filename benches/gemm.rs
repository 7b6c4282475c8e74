//! Dense-layer GEMM rates on the CPU for the ViT-B/32 shapes (batch 32: 1,600 rows), f32 (`gemm`
//! crate, what `--dtype f32` runs) next to clipft's bf16 kernel (`--dtype bf16` on a CPU with
//! AVX512-BF16; AMX tiles where the CPU has them), in GFLOP/s.
//!
//!     cargo bench --bench gemm
//!
//! Environment (optional): `CLIPFT_BENCH_ROWS` (1600), `CLIPFT_BENCH_REPS` (10),
//! `RAYON_NUM_THREADS` (all cores), `CLIPFT_NO_AMX=1` (the AVX512-BF16 kernel on an AMX CPU).

// The allocator the clipft binary uses (src/main.rs); `keep_freed_memory` is called in main.
#[global_allocator]
static GLOBAL: clipft::alloc::Allocator = clipft::alloc::Allocator {};

use std::time::Instant;

use candle_core::{Device, Tensor};
use clipft::model::gemm_bf16::{self, PackedView, PackedWeight};
use clipft::model::kernels::dense_bias;

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Best time of `reps` calls, in seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    clipft::alloc::keep_freed_memory();
    let m: usize = env_or("CLIPFT_BENCH_ROWS", "1600").parse().unwrap();
    let reps: usize = env_or("CLIPFT_BENCH_REPS", "10").parse().unwrap();
    println!(
        "dense layers x·Wᵀ + b, {m} rows, {} threads; bf16 kernel: {}",
        rayon::current_num_threads(),
        match gemm_bf16::kernel() {
            gemm_bf16::Kernel::Portable => "none (no AVX512-BF16 on this CPU: not timed)",
            kernel => kernel.name(),
        }
    );
    println!("  {:<22} {:>10} {:>10}", "layer (N×K)", "f32", "bf16");
    for (name, n, k) in [
        ("patch embed 768×3072", 768, 3072),
        ("qkv 2304×768", 2304, 768),
        ("out_proj 768×768", 768, 768),
        ("fc1 3072×768", 3072, 768),
        ("fc2 768×3072", 768, 3072),
        ("text fc1 2048×512", 2048, 512),
    ] {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.02, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.02, n, &dev).unwrap();
        let flops = 2.0 * (m * n * k) as f64;
        let f32_s = best(reps, || {
            dense_bias(&x, &w, &b).unwrap();
        });
        let packed = PackedView::new(PackedWeight::new(
            &w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            n,
            k,
            Some(&b.to_vec1::<f32>().unwrap()),
        ));
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The portable kernel is the reference, not a path `--dtype bf16` takes (the loader
        // computes in f32 on such CPUs), and ~60× slower than f32: not timed.
        let bf16 = (gemm_bf16::kernel() != gemm_bf16::Kernel::Portable).then(|| {
            let s = best(reps, || {
                std::hint::black_box(gemm_bf16::dense(&xs, m, &packed, gemm_bf16::Epilogue::None));
            });
            format!("{:.1}", flops / s / 1e9)
        });
        println!(
            "  {name:<22} {:>10.1} {:>10}",
            flops / f32_s / 1e9,
            bf16.as_deref().unwrap_or("–")
        );
    }
}

//! Tip-Adapter timings: the full α/β grid search (200 × 20) for a 100-class, 16-shot cache with
//! 1,000 val images, and one Tip-Adapter-F epoch (1,600 cached features, batch 256, with the val
//! evaluation that chooses the epoch), on D = 512 random L2-normalised features.
//!
//!     cargo bench --bench tip
//!
//! Environment (optional): `CLIPFT_TIP_BENCH_FEATURES`: a safetensors file with `keys` [NK, D],
//! `cache_labels` [NK] (i64), `val` [N, D], `val_labels` [N] (i64), `classifier` [C, D], `train`
//! [NK, D] (as `scripts/bench_tip_vs_pytorch.py` writes, so both sides time the same numbers);
//! `CLIPFT_BENCH_REPEATS` (5); `RAYON_NUM_THREADS` (all cores). Prints one `name seconds` line
//! per measurement (best of the repeats) on stdout.

// The allocator the clipft binary uses (src/main.rs); `keep_freed_memory` is called in main.
#[global_allocator]
static GLOBAL: clipft::alloc::Allocator = clipft::alloc::Allocator {};

use std::time::Instant;

use candle_core::{Device, Tensor};
use clipft::features::l2_normalize;
use clipft::methods::tip::{self, Grid, TipConfig, TipFSettings};

struct Inputs {
    keys: Tensor,
    cache_labels: Vec<usize>,
    val: Tensor,
    val_labels: Vec<usize>,
    classifier: Tensor,
    train: Tensor,
}

fn labels(t: &Tensor) -> Vec<usize> {
    t.to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as usize)
        .collect()
}

fn inputs() -> Inputs {
    if let Some(path) = std::env::var_os("CLIPFT_TIP_BENCH_FEATURES") {
        let (t, _) = clipft::io::load(std::path::Path::new(&path)).unwrap();
        return Inputs {
            keys: t["keys"].clone(),
            cache_labels: labels(&t["cache_labels"]),
            val: t["val"].clone(),
            val_labels: labels(&t["val_labels"]),
            classifier: t["classifier"].clone(),
            train: t["train"].clone(),
        };
    }
    let (c, k, n, d) = (100, 16, 1000, 512);
    let dev = Device::Cpu;
    let randn = |r: usize| l2_normalize(&Tensor::randn(0f32, 1., (r, d), &dev).unwrap()).unwrap();
    Inputs {
        keys: randn(c * k),
        cache_labels: (0..c * k).map(|i| i / k).collect(),
        val: randn(n),
        val_labels: (0..n).map(|i| i % c).collect(),
        classifier: randn(c),
        train: randn(c * k),
    }
}

fn best_of(repeats: usize, mut f: impl FnMut()) -> f64 {
    (0..repeats)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    clipft::alloc::keep_freed_memory();
    let repeats: usize = std::env::var("CLIPFT_BENCH_REPEATS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let x = inputs();
    let c = x.classifier.dims2().unwrap().0;
    let cfg = TipConfig::resolve("default").unwrap();
    let grid = Grid::new([7.0, 3.0], [200, 20]);
    eprintln!(
        "cache {:?}, val {:?}, {c} classes, grid {}×{}, {} threads",
        x.keys.dims(),
        x.val.dims(),
        grid.n_beta,
        grid.alphas.len(),
        rayon::current_num_threads()
    );
    let mut result = None;
    let search = best_of(repeats, || {
        // Everything the search needs from features: affinity and zero-shot logits, then the grid.
        let aff = x.val.matmul(&x.keys.t().unwrap()).unwrap();
        let z = clipft::eval::zero_shot_logits(&x.val, &x.classifier).unwrap();
        result = Some(tip::search(&aff, &x.cache_labels, &z, &x.val_labels, &grid).unwrap());
    });
    let r = result.unwrap();
    eprintln!("search: β {:.4} α {:.4} val {:.2}%", r.beta, r.alpha, r.acc);
    println!("search_seconds {search:.6}");

    let values = tip::one_hot(&x.cache_labels, c).unwrap();
    let settings = TipFSettings {
        epochs: 1,
        ..TipFSettings::from_config(&cfg, 1)
    };
    let epoch = best_of(repeats, || {
        let mut feats = |_e: usize| Ok(x.train.clone());
        tip::train_adapter(
            &x.keys,
            &values,
            &x.classifier,
            &settings,
            &x.cache_labels,
            &x.val,
            &x.val_labels,
            &mut feats,
            false,
        )
        .unwrap();
    });
    println!("tipf_epoch_seconds {epoch:.6}");
}

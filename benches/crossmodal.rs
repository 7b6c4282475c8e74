//! Times the default cross-modal sweep (12 settings: lr {1e-3,1e-4} × wd {0,1e-2,1e-4} × batch
//! {8,32}) on cached features of a synthetic 100-class 16-shot task: D = 512, 16 shots × 2 views
//! = 3200 image rows, 100 text rows (one template), 1000 val rows, random normalised features.
//!
//!   RAYON_NUM_THREADS=2 cargo bench --bench crossmodal            # full 12 × 12800 iterations
//!   CROSSMODAL_BENCH_ITERS=1280 cargo bench --bench crossmodal    # a tenth, extrapolated
//!   CROSSMODAL_BENCH_HEAD=adapter cargo bench --bench crossmodal  # the CLIP-Adapter head and its
//!                                                                 # grid (lr 1e-4..1e-7 × 3 wd × batch 8)
//!
//! Compare with `python3 scripts/bench_crossmodal_vs_pytorch.py` (the official logic in PyTorch).

// The allocator the clipft binary uses (src/main.rs); `keep_freed_memory` is called in main.
#[global_allocator]
static GLOBAL: clipft::alloc::Allocator = clipft::alloc::Allocator {};

use std::time::Instant;

use clipft::methods::crossmodal::{
    self as cm, Adapter, Head, HeadKind, Init, Mat, Modality, Rows, TrainSettings,
};

fn random(rows: usize, cols: usize, seed: u64) -> Mat {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data = (0..rows * cols)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    Mat::new(rows, cols, data)
}

fn main() {
    clipft::alloc::keep_freed_memory();
    let (c, d, shots, nval) = (100, 512, 16, 1000);
    let iters: usize = std::env::var("CROSSMODAL_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12800);
    let head = match std::env::var("CROSSMODAL_BENCH_HEAD").as_deref() {
        Ok("adapter") => HeadKind::Adapter,
        Ok("linear") | Err(_) => HeadKind::Linear,
        Ok(other) => panic!("CROSSMODAL_BENCH_HEAD={other}: linear or adapter"),
    };
    let text_raw = random(c, d, 1);
    let text = Rows::new(&text_raw, cm::text_labels(c, 1));
    let image = Rows::new(
        &random(c * shots * 2, d, 2),
        (0..c * shots * 2).map(|i| i % c).collect(),
    );
    let val = Rows::new(&random(nval, d, 3), (0..nval).map(|i| i % c).collect());
    let init = Head {
        adapter: (head == HeadKind::Adapter)
            .then(|| Adapter::random(d, cm::ADAPTER_REDUCTION, cm::ADAPTER_RATIO, 1).unwrap()),
        weight: cm::zeroshot_init(&text_raw, c).unwrap(),
    };
    let grid = cm::grid_for(head);
    let settings = TrainSettings {
        iters,
        modality: Modality::Cross,
        init: Init::Zeroshot,
        seed: 1,
    };
    let threads = rayon::current_num_threads();
    let t0 = Instant::now();
    let out = cm::sweep(&text, &image, &val, &init, &grid, &settings).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    let full = secs * 12800.0 / iters as f64;
    println!(
        "clipft crossmodal sweep ({head:?} head): {} settings x {iters} iterations, {threads} \
         threads: {secs:.2} s (full {} x 12800: {full:.1} s{}); best val {:.1}%",
        grid.len(),
        grid.len(),
        if iters == 12800 { "" } else { ", extrapolated" },
        out.best.val_acc
    );
}

//! The CUDA path against the CPU f32 one (which tests/reference.rs holds to `transformers`), with
//! clipft's CUDA kernels on and off, on a checkpoint with ViT-B/32's layer shapes (two layers per
//! tower): image features, and text features of equal-length (grid) and mixed-length (packed)
//! prompt batches. Needs a CUDA build and device; elsewhere (CI) each test says it was skipped.
//! On a GPU machine: `scripts/bench_gpu.sh` runs the test binary built by `build-cuda.sh`.

mod common;

use candle_core::{DType, Device, Tensor};
use clipft::model::synth::{tiny_config, write_checkpoint, TINY_VOCAB};
use clipft::model::{cuda, Clip, Precision};

/// The kernels' switch is process-wide: tests that flip it take turns.
static SWITCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn cuda_device() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// ViT-B/32's widths, heads, patch grid and context length, two layers per tower.
fn checkpoint() -> (tempfile::TempDir, clipft::model::hub::ModelFiles) {
    let mut config = tiny_config();
    let t = &mut config.text_config;
    (t.hidden_size, t.intermediate_size, t.num_attention_heads) = (512, 2048, 8);
    let v = &mut config.vision_config;
    (v.hidden_size, v.intermediate_size, v.num_attention_heads) = (768, 3072, 12);
    (v.image_size, v.patch_size) = (224, 32);
    config.projection_dim = 512;
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &config, 7).unwrap();
    let files = clipft::model::hub::resolve(dir.path().to_str().unwrap(), None, false).unwrap();
    (dir, files)
}

fn load(files: &clipft::model::hub::ModelFiles, device: &Device, dtype: DType) -> Clip {
    let precision = Precision {
        dtype,
        bf16_matmul: false,
    };
    Clip::from_files(files.clone(), device.clone(), precision, vec![]).unwrap()
}

/// Prompts as token ids: `lens[i]` tokens, BOS first and EOS last.
fn prompts(lens: &[usize]) -> Vec<Vec<u32>> {
    let (bos, eos) = (TINY_VOCAB as u32 - 2, TINY_VOCAB as u32 - 1);
    lens.iter()
        .enumerate()
        .map(|(i, &len)| {
            let mut ids = vec![bos];
            ids.extend((1..len - 1).map(|j| ((i * 131 + j * 17) % (TINY_VOCAB - 2)) as u32));
            ids.push(eos);
            ids
        })
        .collect()
}

fn pixels(device: &Device) -> Tensor {
    let n = 5 * 3 * 224 * 224;
    let v: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
        .collect();
    Tensor::from_vec(v, (5, 3, 224, 224), device).unwrap()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

fn min_cosine(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let dot: f64 = x.iter().zip(y).map(|(p, q)| *p as f64 * *q as f64).sum();
            let nx: f64 = x.iter().map(|p| (*p as f64).powi(2)).sum::<f64>().sqrt();
            let ny: f64 = y.iter().map(|q| (*q as f64).powi(2)).sum::<f64>().sqrt();
            dot / (nx * ny)
        })
        .fold(1.0, f64::min)
}

/// Image and text features (three prompt batches) of `clip` on `device`.
fn features(clip: &Clip, device: &Device) -> Vec<Vec<Vec<f32>>> {
    let mut out = vec![rows(&clip.model.image_features(&pixels(device)).unwrap())];
    for lens in [&[77, 77, 77][..], &[9, 9], &[2, 77, 30, 5, 16, 2]] {
        out.push(rows(
            &clip.model.text_features(&prompts(lens), device).unwrap(),
        ));
    }
    out
}

#[test]
fn cuda_features_match_the_cpu_with_and_without_clipft_kernels() {
    let Some(gpu) = cuda_device() else { return };
    let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let (_dir, files) = checkpoint();
    let reference = features(&load(&files, &Device::Cpu, DType::F32), &Device::Cpu);
    for (dtype, min_cos) in [
        (DType::F32, 0.99999),
        (DType::F16, 0.999),
        (DType::BF16, 0.995),
    ] {
        let clip = load(&files, &gpu, dtype);
        let mut by_path = Vec::new();
        for kernels in [false, true] {
            cuda::set_enabled(kernels);
            let ours = features(&clip, &gpu);
            for (what, (a, b)) in ["image", "text 77x3", "text 9x2", "text mixed"]
                .iter()
                .zip(ours.iter().zip(&reference))
            {
                let c = min_cosine(a, b);
                println!("{dtype:?} kernels {kernels}: {what} min cosine {c:.7}");
                assert!(
                    c >= min_cos,
                    "{dtype:?} kernels {kernels} {what}: cosine {c}"
                );
            }
            by_path.push(ours);
        }
        // The kernels must really have run: not bit-identical to candle's ops.
        assert_ne!(by_path[0], by_path[1], "{dtype:?}: kernels changed nothing");
    }
    cuda::set_enabled(false);
}

/// Mixed-precision FD-Align on the GPU: the trainable tower's f32 variables, computing in f32,
/// bf16 and f16 on CUDA, receive the gradients the CPU f32 tower computes (per variable,
/// cosine ≥ 0.99; the key biases' true gradient is zero, rounding only), with clipft's kernels
/// (the layer norm's own backward pass) off and on.
#[test]
fn cuda_mixed_precision_gradients_match_the_cpu() {
    use clipft::model::trainable::TrainableVision;
    let Some(dev) = cuda_device() else { return };
    let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let (_dir, files) = checkpoint();
    let config =
        clipft::model::ClipConfig::from_json(&std::fs::read_to_string(&files.config).unwrap())
            .unwrap();
    let grads = |device: &Device, compute: DType| -> Vec<(String, Vec<f32>)> {
        let tv = TrainableVision::from_files(&files, &config, device, DType::F32).unwrap();
        let f = tv
            .in_dtype(compute)
            .unwrap()
            .forward(&pixels(device))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let r = Tensor::arange(0f32, f.elem_count() as f32, device)
            .unwrap()
            .reshape(f.shape())
            .unwrap()
            .sin()
            .unwrap();
        let loss = (clipft::features::l2_normalize(&f).unwrap() * r)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = tv.backward(&loss).unwrap();
        tv.vars()
            .into_iter()
            .map(|(name, v)| {
                let g = g.get(v.as_tensor()).unwrap();
                assert_eq!(g.dtype(), DType::F32, "{name}");
                let g = g.flatten_all().unwrap().to_device(&Device::Cpu).unwrap();
                (name, g.to_vec1().unwrap())
            })
            .collect()
    };
    let reference = grads(&Device::Cpu, DType::F32);
    for compute in [DType::F32, DType::BF16, DType::F16] {
        let mut by_path = Vec::new();
        for kernels in [false, true] {
            cuda::set_enabled(kernels);
            let ours = grads(&dev, compute);
            for ((name, a), (_, b)) in ours.iter().zip(&reference) {
                if name.ends_with("k_proj.bias") {
                    continue;
                }
                let c = min_cosine(std::slice::from_ref(a), std::slice::from_ref(b));
                println!("{compute:?} kernels {kernels} {name}: gradient cosine {c:.6}");
                assert!(
                    c > 0.99,
                    "{compute:?} kernels {kernels} `{name}`: gradient cosine {c} to the CPU f32"
                );
            }
            by_path.push(ours);
        }
        assert_ne!(
            by_path[0], by_path[1],
            "{compute:?}: kernels changed nothing"
        );
    }
    cuda::set_enabled(false);
}

/// `fdalign train` end to end on the GPU in mixed precision (bf16, f16 with loss scaling), with
/// clipft's kernels off and on: the run finishes (val through the frozen tower), and the
/// weights it returns are f32, finite, and moved.
#[test]
fn cuda_fdalign_trains_in_mixed_precision() {
    use clipft::data::{Dataset, Split};
    use clipft::methods::fdalign::FdAlignSettings;
    use clipft::methods::fdalign_train;
    use clipft::model::{DTypeArg, DeviceArg, ModelSpec};
    if cuda_device().is_none() {
        return;
    }
    let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let ws = common::Workspace::new();
    let dataset = Dataset::open(ws.data()).unwrap();
    let train = dataset.samples(Split::Train).unwrap();
    let val = dataset.samples(Split::Val).unwrap();
    let templates = clipft::templates::resolve("ensemble7").unwrap();
    let initial =
        candle_core::safetensors::load(ws.model().join("model.safetensors"), &Device::Cpu).unwrap();
    let settings = FdAlignSettings {
        epochs: 2,
        base_lr: 2e-2,
        batch_size: Some(4),
        spurious_keep: 6,
        spurious_clusters: 3,
        ..FdAlignSettings::default()
    };
    for kernels in [false, true] {
        cuda::set_enabled(kernels);
        for dtype in [DTypeArg::Bf16, DTypeArg::F16] {
            let mut spec = ModelSpec::local(ws.model());
            (spec.dtype, spec.device) = (dtype, DeviceArg::Cuda(0));
            let clip = Clip::load(&spec).unwrap();
            let out = ws.path().join(format!("fd-{dtype}-{kernels}"));
            let (best, outcome) = fdalign_train::train(
                &clip,
                &dataset.class_names(),
                &templates,
                &train,
                &val,
                &settings,
                &out,
                false,
                false,
                None,
            )
            .unwrap_or_else(|e| panic!("{dtype} kernels {kernels}: {e:#}"));
            println!("{dtype} kernels {kernels}: {outcome:?}");
            let name = "vision_model.encoder.layers.0.mlp.fc1.weight";
            assert_eq!(best[name].dtype(), DType::F32, "{dtype} kernels {kernels}");
            // The weights after the last step (the best epoch's may predate f16's first taken
            // step: the first steps can overflow and be skipped).
            let (state, _) = clipft::io::load(&out.join(fdalign_train::STATE_FILE)).unwrap();
            let t = &state[&format!("current.{name}")];
            let moved = common::max_abs_diff(t, &initial[name]);
            assert!(
                moved.is_finite() && moved > 1e-4,
                "{dtype} kernels {kernels}: moved by {moved}"
            );
        }
    }
    cuda::set_enabled(false);
}

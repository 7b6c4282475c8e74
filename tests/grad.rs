//! The trainable vision tower: every parameter receives its true gradient (finite differences in
//! f64), and its forward pass equals the inference model's.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use clipft::features::l2_normalize;
use clipft::model::hub;
use clipft::model::trainable::TrainableVision;
use clipft::model::{synth, Clip, ClipConfig, ModelSpec};

fn pixels(dtype: DType) -> Tensor {
    let n = 2 * 3 * 32 * 32;
    let v: Vec<f64> = (0..n).map(|i| ((i as f64) * 0.37).sin() * 1.5).collect();
    Tensor::from_vec(v, (2, 3, 32, 32), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The `R` of [`loss`] for two images' `d`-wide features: fixed values, each output weighted
/// differently.
fn mix(d: usize, dtype: DType) -> Tensor {
    let r: Vec<f64> = (0..2 * d).map(|i| ((i * 7 % 11) as f64) - 5.0).collect();
    Tensor::from_vec(r, (2, d), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The largest absolute entry of `b`, floored at `floor`, and the largest difference of `a`
/// from it: gradients compared relative to their own size.
fn scale_and_gap(a: &[f64], b: &[f64], floor: f64) -> (f64, f64) {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(floor);
    let gap = a.iter().zip(b).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    (scale, gap)
}

/// A scalar that depends non-linearly on every output: Σ normalize(f) ⊙ R.
fn loss(tv: &TrainableVision, x: &Tensor, r: &Tensor) -> Tensor {
    let f = tv.tower.forward(x).unwrap();
    (l2_normalize(&f).unwrap() * r).unwrap().sum_all().unwrap()
}

fn check_gradients(dir: &Path) {
    let files = hub::resolve(&dir.display().to_string(), None, false).unwrap();
    let config = ClipConfig::from_json(&std::fs::read_to_string(&files.config).unwrap()).unwrap();
    let tv = TrainableVision::from_files(&files, &config, &Device::Cpu, DType::F64).unwrap();
    let x = pixels(DType::F64);
    let r = mix(config.projection_dim, DType::F64);
    let grads = loss(&tv, &x, &r).backward().unwrap();
    let vars = tv.vars();
    // Every tensor of the vision tower and projection is a variable.
    let expected = config
        .expected_tensors()
        .into_iter()
        .filter(|(n, _)| n.starts_with("vision_model.") || n == "visual_projection.weight")
        .count();
    assert_eq!(vars.len(), expected);
    let h = 1e-5;
    for (name, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("`{name}` received no gradient"));
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        // The key bias is the one exception, and rightly so: it adds `q·b` to every logit of a
        // query's softmax, which cancels, so its true gradient is zero (the finite differences
        // below confirm it).
        if !name.ends_with("k_proj.bias") {
            assert!(
                g.iter().any(|v| v.abs() > 1e-12),
                "`{name}` has an all-zero gradient"
            );
        }
        // Central differences on a few elements of each tensor.
        let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let n = base.len();
        for &k in &[0, n / 3, n - 1] {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[k] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&tv, &x, &r).to_scalar::<f64>().unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let tol = 1e-6 + 1e-5 * g[k].abs().max(fd.abs());
            assert!(
                (fd - g[k]).abs() <= tol,
                "`{name}`[{k}]: autograd {} vs finite difference {fd}",
                g[k]
            );
        }
    }
}

#[test]
fn every_vision_parameter_gets_its_true_gradient_gelu_tower() {
    // The fixture's vision tower uses exact (erf) GELU.
    check_gradients(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-clip"));
}

#[test]
fn every_vision_parameter_gets_its_true_gradient_quick_gelu_tower() {
    let tmp = tempfile::tempdir().unwrap();
    synth::write_checkpoint(tmp.path(), &synth::tiny_config(), 3).unwrap();
    check_gradients(tmp.path());
}

/// The f32 tower trains through clipft's fused CPU kernels (layer norm, softmax, QuickGELU
/// inside the MLP's second layer, dense layers, each with its own backward pass); its gradients
/// must equal the f64 tower's, whose composed ops the test above checks against finite
/// differences.
#[test]
fn fused_f32_gradients_equal_the_f64_ones() {
    let tmp = tempfile::tempdir().unwrap();
    synth::write_checkpoint(tmp.path(), &synth::tiny_config(), 3).unwrap();
    let files = hub::resolve(&tmp.path().display().to_string(), None, false).unwrap();
    let config = ClipConfig::from_json(&std::fs::read_to_string(&files.config).unwrap()).unwrap();
    let grads = |dtype: DType| {
        let tv = TrainableVision::from_files(&files, &config, &Device::Cpu, dtype).unwrap();
        let r = mix(config.projection_dim, dtype);
        let g = tv.backward(&loss(&tv, &pixels(dtype), &r)).unwrap();
        tv.vars()
            .into_iter()
            .map(|(name, v)| {
                let g = g.get(v.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
                (name, g.flatten_all().unwrap().to_vec1::<f64>().unwrap())
            })
            .collect::<Vec<_>>()
    };
    for ((name, a), (_, b)) in grads(DType::F32).into_iter().zip(grads(DType::F64)) {
        // The key bias's true gradient is zero (see above): f32 rounding alone is left there.
        let (scale, diff) = scale_and_gap(&a, &b, 1e-3);
        assert!(
            diff <= 1e-3 * scale,
            "`{name}`: f32 and f64 gradients differ by {diff} (scale {scale})"
        );
    }
}

/// On the CPU in f32 the encoder layers train as single autograd nodes
/// (`src/model/fused_layer.rs`): the features and every gradient equal those of the same layers
/// trained through candle's graph of their ops, and the layers' gradients come from the fused
/// nodes (`loss.backward()` alone does not see them).
#[test]
fn fused_layers_train_as_the_graph_of_their_ops() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = synth::tiny_config();
    config.vision_config.num_hidden_layers = 3;
    synth::write_checkpoint(tmp.path(), &config, 5).unwrap();
    let files = hub::resolve(&tmp.path().display().to_string(), None, false).unwrap();
    let r = mix(config.projection_dim, DType::F32);
    let x = pixels(DType::F32);
    let tv = || TrainableVision::from_files(&files, &config, &Device::Cpu, DType::F32).unwrap();
    let (fused, graph) = (tv(), tv().without_fused_layers());
    let diff = common::max_abs_diff(
        &fused.tower.forward(&x).unwrap(),
        &graph.tower.forward(&x).unwrap(),
    );
    assert!(diff < 1e-5, "features differ by {diff}");
    let ga = fused.backward(&loss(&fused, &x, &r)).unwrap();
    let gb = graph.backward(&loss(&graph, &x, &r)).unwrap();
    let partial = loss(&fused, &x, &r).backward().unwrap();
    let vars = fused.vars().into_iter().zip(graph.vars());
    let mut from_fused_nodes = 0;
    for ((name, va), (_, vb)) in vars {
        let a = flat(ga.get(va.as_tensor()).unwrap());
        let b = flat(gb.get(vb.as_tensor()).unwrap());
        // The key bias's true gradient is zero (see above): f32 rounding alone is left there.
        let (scale, diff) = scale_and_gap(&a, &b, 1e-2);
        assert!(diff <= 1e-4 * scale, "`{name}`: {diff} (scale {scale})");
        if name.contains("encoder.layers.0.") || name.contains("encoder.layers.1.") {
            from_fused_nodes += 1;
            assert!(partial.get(va.as_tensor()).is_none(), "`{name}`");
        }
    }
    // Two of the three layers (the last one pools a single token through the graph), 16
    // parameters each.
    assert_eq!(from_fused_nodes, 32);
}

#[test]
fn trainable_tower_computes_the_inference_features() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-clip");
    let clip = Clip::load(&ModelSpec::local(&dir)).unwrap();
    let tv =
        TrainableVision::from_files(&clip.files, clip.config(), &Device::Cpu, DType::F32).unwrap();
    let x = pixels(DType::F32);
    let a = clip.model.image_features(&x).unwrap();
    let b = tv.tower.forward(&x).unwrap();
    let diff = common::max_abs_diff(&a, &b);
    assert!(diff < 1e-5, "{diff}");
    // A step on one variable changes the output: the tower reads the variables, not copies.
    let (_, var): (String, Var) = tv
        .vars()
        .into_iter()
        .find(|(n, _)| n == "vision_model.embeddings.patch_embedding.weight")
        .unwrap();
    var.set(&(var.as_tensor() * 1.5).unwrap()).unwrap();
    let c = tv.tower.forward(&x).unwrap();
    let moved = common::max_abs_diff(&clip.model.image_features(&x).unwrap(), &c);
    assert!(moved > 1e-3, "{moved}");
}

#[test]
fn fdalign_steps_lower_the_loss_and_the_kl_starts_at_zero() {
    use clipft::methods::fdalign;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-clip");
    let clip = Clip::load(&ModelSpec::local(&dir)).unwrap();
    let tv =
        TrainableVision::from_files(&clip.files, clip.config(), &Device::Cpu, DType::F32).unwrap();
    let classes = ["dog", "cat", "bird"];
    let templates = clipft::templates::resolve("imagenet80").unwrap();
    let prompts: Vec<String> = templates
        .iter()
        .flat_map(|t| classes.iter().map(move |c| clipft::templates::fill(t, c)))
        .collect();
    let d = clip.config().projection_dim;
    let text = clipft::features::text_features(&clip, &prompts, 256)
        .unwrap()
        .reshape((templates.len(), classes.len(), d))
        .unwrap();
    let prototypes =
        fdalign::select_prototypes(&fdalign::context_weights(&text, 100.0).unwrap(), 60, 20, 0)
            .unwrap();
    assert_eq!(prototypes.dims(), &[20, d]);
    let head_w = Var::from_tensor(&fdalign::class_head_init(&text, 100.0).unwrap()).unwrap();
    let head_b = Var::zeros(classes.len(), DType::F32, &Device::Cpu).unwrap();
    let x = Tensor::cat(
        &[
            pixels(DType::F32),
            (pixels(DType::F32) * -0.5).unwrap(),
            (pixels(DType::F32) + 0.3).unwrap(),
        ],
        0,
    )
    .unwrap();
    let y = Tensor::new(&[0u32, 1, 2, 0, 1, 2], &Device::Cpu).unwrap();
    let f0 = clip.model.image_features(&x).unwrap();
    let mut vars: Vec<Var> = tv.vars().into_iter().map(|(_, v)| v).collect();
    vars.extend([head_w.clone(), head_b.clone()]);
    // Small enough that momentum does not overshoot within the six steps.
    let mut opt = fdalign::Sgd::new(vars, 5e-5, 0.9, 5e-4);
    let mut totals = Vec::new();
    for step in 0..6 {
        let ft = tv.tower.forward(&x).unwrap();
        let (total, _ce, kl) = fdalign::loss(
            &ft,
            &f0,
            &y,
            head_w.as_tensor(),
            head_b.as_tensor(),
            &prototypes,
            20.0,
        )
        .unwrap();
        if step == 0 {
            let kl0 = kl.to_scalar::<f32>().unwrap();
            assert!(kl0.abs() < 1e-6, "KL at step 0 is {kl0}");
        }
        totals.push(total.to_scalar::<f32>().unwrap());
        opt.step(&tv.backward(&total).unwrap()).unwrap();
    }
    eprintln!("FD-Align loss per step: {totals:?}");
    assert!(
        totals.windows(2).all(|w| w[1] < w[0]),
        "loss did not go down every step: {totals:?}"
    );
    assert!(
        totals[5] < totals[0] * 0.9,
        "loss did not go down: {totals:?}"
    );
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (n(a) * n(b)).max(1e-300)
}

/// Mixed precision (`--dtype f16|bf16` for FD-Align): the tower computes in 16 bits from casts
/// of the f32 variables, the gradients arrive in f32 on those variables, and a step at
/// FD-Align's learning rate moves the weights as the f32 step does. (Variables kept in bf16
/// would not move at all: `lr·g` is below half a bf16 step of these weights.)
#[test]
fn mixed_precision_computes_in_16_bits_and_updates_the_f32_weights() {
    use clipft::methods::fdalign::Sgd;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-clip");
    let clip = Clip::load(&ModelSpec::local(&dir)).unwrap();
    let d = clip.config().projection_dim;
    let r = mix(d, DType::F32);
    let x = pixels(DType::F32);
    let lr = 5e-5 * 32.0 / 256.0;
    // Output, per-variable gradients and per-variable update of one SGD step.
    let run = |compute: DType| {
        let tv = TrainableVision::from_files(&clip.files, clip.config(), &Device::Cpu, DType::F32)
            .unwrap();
        let before: Vec<Tensor> = tv
            .vars()
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();
        let tower = tv.in_dtype(compute).unwrap();
        let f = tower.forward(&x).unwrap();
        assert_eq!(f.dtype(), compute);
        let f = f.to_dtype(DType::F32).unwrap();
        let loss = (l2_normalize(&f).unwrap() * &r).unwrap().sum_all().unwrap();
        let grads = tv.backward(&loss).unwrap();
        let vars = tv.vars();
        let g: Vec<Vec<f64>> = vars
            .iter()
            .map(|(name, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{compute:?}: `{name}` received no gradient"));
                assert_eq!(g.dtype(), DType::F32, "{name}");
                flat(g)
            })
            .collect();
        let mut opt = Sgd::new(vars.iter().map(|(_, v)| v.clone()).collect(), lr, 0.9, 5e-4);
        opt.step(&grads).unwrap();
        let moved: Vec<Vec<f64>> = vars
            .iter()
            .zip(&before)
            .map(|((_, v), b)| {
                assert_eq!(v.dtype(), DType::F32);
                flat(&(v.as_tensor() - b).unwrap())
            })
            .collect();
        (flat(&f), g, moved, vars)
    };
    let (f32_out, f32_grads, f32_moved, vars) = run(DType::F32);
    for compute in [DType::F16, DType::BF16] {
        let (out, grads, moved, _) = run(compute);
        assert_ne!(
            out, f32_out,
            "{compute:?}: the tower did not compute in 16 bits"
        );
        let c = cosine(&out, &f32_out);
        assert!(c > 0.999, "{compute:?}: output cosine {c}");
        for (i, (name, _)) in vars.iter().enumerate() {
            // The key bias's true gradient is zero: only rounding is left there.
            if name.ends_with("k_proj.bias") {
                continue;
            }
            let c = cosine(&grads[i], &f32_grads[i]);
            assert!(c > 0.99, "{compute:?}: `{name}` gradient cosine {c}");
            let c = cosine(&moved[i], &f32_moved[i]);
            let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let ratio = norm(&moved[i]) / norm(&f32_moved[i]);
            assert!(
                c > 0.99 && (0.95..1.05).contains(&ratio),
                "{compute:?}: `{name}` moved unlike the f32 step (cosine {c}, norm ratio {ratio})"
            );
        }
    }
}

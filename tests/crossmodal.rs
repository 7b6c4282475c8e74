//! Cross-modal linear probing: the head forward, zero-shot init, batch composition, gradient and
//! WiSE-FT pinned against reference numbers from a PyTorch port of the official code's logic
//! (`scripts/crossmodal_reference.py` → `tests/fixtures/crossmodal/reference.json`); the
//! hand-derived gradient checked against candle autograd and finite differences; cross-modal
//! beating the image-only probe at 1 shot on a generated task; the command line end to end.
//! The same for the CLIP-Adapter head (`--head adapter`): forward, gradient of all three layers
//! and a few AdamW steps against PyTorch, the artifact, and train + eval from the command line.

use candle_core::{Device, Tensor, Var};
use clipft::methods::crossmodal::{
    self as cm, Adapter, Head, Hyper, Init, Mat, Modality, Rows, Sampler, TrainSettings,
};
use serde_json::Value;

const C: usize = 5;
const T: usize = 3;
const D: usize = 16;
const NIMG: usize = 10;

/// The fixture formula of `scripts/crossmodal_reference.py` (f64, then f32).
fn formula(rows: usize, cols: usize, salt: f64) -> Vec<Vec<f32>> {
    (0..rows)
        .map(|i| {
            (0..cols)
                .map(|j| {
                    let t = (i * cols + j) as f64;
                    ((0.731 * t + 1.37 * salt).sin()
                        + 0.5 * (0.217 * (i + 1) as f64 * (j + 1) as f64 + salt).cos())
                        as f32
                })
                .collect()
        })
        .collect()
}

fn reference() -> Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/crossmodal/reference.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn matrix(v: &Value) -> Mat {
    let rows: Vec<Vec<f32>> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    Mat::from_rows(&rows)
}

fn max_abs_diff(a: &Mat, b: &Mat) -> f32 {
    assert_eq!((a.rows, a.cols), (b.rows, b.cols));
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

struct Fixture {
    text: Mat,
    image: Mat,
    image_labels: Vec<usize>,
}

fn fixture() -> Fixture {
    let proto = formula(C, D, 2.0);
    let noise = formula(NIMG, D, 3.0);
    let image: Vec<Vec<f32>> = (0..NIMG)
        .map(|i| {
            (0..D)
                .map(|j| 3.0 * proto[i % C][j] + noise[i][j])
                .collect()
        })
        .collect();
    Fixture {
        text: Mat::from_rows(&formula(C * T, D, 1.0)),
        image: Mat::from_rows(&image),
        image_labels: (0..NIMG).map(|i| i % C).collect(),
    }
}

fn perturbed(w0: &Mat) -> Mat {
    let p = Mat::from_rows(&formula(C, D, 6.0));
    Mat::new(
        C,
        D,
        w0.data
            .iter()
            .zip(&p.data)
            .map(|(a, b)| a + 0.1 * b)
            .collect(),
    )
}

/// candle's cross-entropy of `logits` against `labels` equals `loss`; returns its gradients.
fn autograd_cross_entropy(
    logits: &Tensor,
    labels: &[usize],
    loss: f32,
) -> candle_core::backprop::GradStore {
    let y: Vec<u32> = labels.iter().map(|&l| l as u32).collect();
    let y = Tensor::new(y.as_slice(), &Device::Cpu).unwrap();
    let l = candle_nn::loss::cross_entropy(logits, &y).unwrap();
    let la = l.to_scalar::<f32>().unwrap();
    assert!(
        (la - loss).abs() < 1e-4 * (1.0 + la.abs()),
        "{la} vs {loss}"
    );
    l.backward().unwrap()
}

#[test]
fn zeroshot_init_matches_reference() {
    let r = reference();
    let w = cm::zeroshot_init(&fixture().text, C).unwrap();
    assert!(max_abs_diff(&w, &matrix(&r["zeroshot_init"])) < 1e-6);
    assert!(cm::zeroshot_init(&fixture().text, 4).is_err());
}

#[test]
fn head_forward_matches_reference() {
    let r = reference();
    let w = cm::zeroshot_init(&fixture().text, C).unwrap();
    let x = Mat::from_rows(&formula(4, D, 5.0));
    let x = Mat::new(4, D, x.data.iter().map(|v| v * 2.5).collect());
    let got = cm::head_logits(&x, &w);
    assert!(max_abs_diff(&got, &matrix(&r["head_logits"])) < 1e-3);
}

/// The batch of the reference (text rows, then image rows): labels, loss and the hand-derived
/// gradient equal PyTorch's autograd.
#[test]
fn batch_loss_and_gradient_match_reference() {
    let r = reference();
    let f = fixture();
    let ti: Vec<usize> = serde_json::from_value(r["batch_text_rows"].clone()).unwrap();
    let ii: Vec<usize> = serde_json::from_value(r["batch_image_rows"].clone()).unwrap();
    let text_labels = cm::text_labels(C, T);
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for &t in &ti {
        rows.push(f.text.row(t).to_vec());
        labels.push(text_labels[t]);
    }
    for &i in &ii {
        rows.push(f.image.row(i).to_vec());
        labels.push(f.image_labels[i]);
    }
    let want: Vec<usize> = serde_json::from_value(r["batch_labels"].clone()).unwrap();
    assert_eq!(labels, want);
    let xn = Mat::from_rows(&rows).l2_normalized();
    let w = perturbed(&cm::zeroshot_init(&f.text, C).unwrap());
    let mut g = Mat::zeros(C, D);
    let loss = cm::loss_and_grad(&xn, &labels, &w, &mut g);
    let want = r["batch_loss"].as_f64().unwrap();
    assert!(
        (loss as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
        "{loss} vs {want}"
    );
    assert!(max_abs_diff(&g, &matrix(&r["batch_grad"])) < 1e-3);
}

/// The hand-derived gradient equals candle autograd (composed log-softmax) and finite
/// differences.
#[test]
fn gradient_matches_autograd_and_finite_differences() {
    let f = fixture();
    let xn = f.image.l2_normalized();
    let labels = f.image_labels.clone();
    let w = perturbed(&cm::zeroshot_init(&f.text, C).unwrap());
    let mut g = Mat::zeros(C, D);
    let loss = cm::loss_and_grad(&xn, &labels, &w, &mut g);

    let var = Var::from_tensor(&w.to_tensor().unwrap()).unwrap();
    let logits = (xn
        .to_tensor()
        .unwrap()
        .matmul(&var.as_tensor().t().unwrap())
        .unwrap()
        * cm::LOGIT_SCALE as f64)
        .unwrap();
    let grads = autograd_cross_entropy(&logits, &labels, loss);
    let ga = Mat::from_tensor(grads.get(var.as_tensor()).unwrap()).unwrap();
    assert!(ga.data.iter().any(|v| v.abs() > 1e-3));
    assert!(max_abs_diff(&g, &ga) < 1e-4, "{}", max_abs_diff(&g, &ga));

    let h = 1e-3f32;
    let mut scratch = Mat::zeros(C, D);
    for (r, c) in [(0, 0), (2, 5), (4, 15)] {
        let mut lp = 0.0;
        for sign in [1f32, -1.] {
            let mut w2 = w.clone();
            w2.data[r * D + c] += sign * h;
            lp += sign * cm::loss_and_grad(&xn, &labels, &w2, &mut scratch);
        }
        let fd = lp / (2.0 * h);
        let an = g.data[r * D + c];
        assert!((fd - an).abs() < 2e-2 * (1.0 + an.abs()), "{fd} vs {an}");
    }
}

/// Text/image halves (or skips) of the default sweep on the fixture, as the official code; the
/// sampler gives the text half then the image half, each a fresh permutation per pass.
#[test]
fn batch_composition_matches_reference() {
    let r = reference();
    let comp = r["composition"].as_array().unwrap();
    let grid = cm::default_grid();
    assert_eq!(comp.len(), grid.len());
    for (h, c) in grid.iter().zip(comp) {
        assert_eq!(h.lr, c["lr"].as_f64().unwrap());
        assert_eq!(h.weight_decay, c["wd"].as_f64().unwrap());
        assert_eq!(h.batch_size as u64, c["batch"].as_u64().unwrap());
        let want = c["text"]
            .as_u64()
            .map(|t| (t as usize, c["image"].as_u64().unwrap() as usize));
        assert_eq!(
            cm::batch_split(h.batch_size, Modality::Cross, C * T, NIMG),
            want
        );
    }
    let mut s = Sampler::new(4, 4, C * T, NIMG, 7);
    let mut seen_text = Vec::new();
    let mut seen_img = Vec::new();
    // 3 batches of 4 text rows cover 12 distinct rows of one 15-row pass (drop_last); 2 image
    // batches cover 8 distinct rows of the 10-row pass.
    for k in 0..3 {
        let (t, i) = s.next_batch();
        assert_eq!((t.len(), i.len()), (4, 4));
        seen_text.extend(t);
        if k < 2 {
            seen_img.extend(i);
        }
    }
    let mut st = seen_text.clone();
    st.sort();
    st.dedup();
    assert_eq!(st.len(), 12);
    assert!(seen_text.iter().all(|&t| t < C * T));
    let mut si = seen_img.clone();
    si.sort();
    si.dedup();
    assert_eq!(si.len(), 8);
}

#[test]
fn wise_ft_matches_reference() {
    let r = reference();
    let w0 = cm::zeroshot_init(&fixture().text, C).unwrap();
    let got = cm::wise_ft(&perturbed(&w0), &w0, 0.5);
    assert!(max_abs_diff(&got, &matrix(&r["wise_ft_0.5"])) < 1e-6);
    // The ratio weighs the zero-shot head, as the official `get_wiseft`'s `wiseft_ratio`.
    let learned = perturbed(&w0);
    let z = w0.l2_normalized();
    let got = cm::wise_ft(&learned, &w0, 0.8);
    for ((g, l), z) in got.data.iter().zip(&learned.data).zip(&z.data) {
        assert!((g - (0.2 * l + 0.8 * z)).abs() < 1e-6);
    }
}

/// Seeded Gaussian generator (Box–Muller over a 64-bit LCG).
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let (a, b) = (self.uniform(), self.uniform());
        (-2.0 * a.ln()).sqrt() * (std::f32::consts::TAU * b).cos()
    }
    fn vec(&mut self, d: usize, s: f32) -> Vec<f32> {
        (0..d).map(|_| s * self.normal()).collect()
    }
}

/// A feature-level task: class means shared by a "text" and an "image" modality (each with its
/// own offset, the modality gap) plus noise. Image-only with 1 shot sees one noisy sample per
/// class; cross-modal also sees the text rows and starts from their means.
#[test]
fn cross_modal_beats_image_only_at_one_shot() {
    let (c, d, t) = (20, 64, 4);
    let mut diffs = Vec::new();
    for seed in 0..3u64 {
        let mut rng = Rng(seed * 7919 + 1);
        let means: Vec<Vec<f32>> = (0..c).map(|_| rng.vec(d, 1.0)).collect();
        let gap_t = rng.vec(d, 0.5);
        let gap_i = rng.vec(d, 0.5);
        let sample = |k: usize, gap: &[f32], s: f32, rng: &mut Rng| -> Vec<f32> {
            let n = rng.vec(d, s);
            (0..d).map(|j| means[k][j] + gap[j] + n[j]).collect()
        };
        let text_rows: Vec<Vec<f32>> = (0..c * t)
            .map(|r| sample(r / t, &gap_t, 0.3, &mut rng))
            .collect();
        let mut img_rows = Vec::new();
        for k in 0..c {
            let x = sample(k, &gap_i, 1.2, &mut rng);
            let flip: Vec<f32> = x.iter().map(|v| v + 0.05 * rng.normal()).collect();
            img_rows.push(x);
            img_rows.push(flip);
        }
        let img_labels: Vec<usize> = (0..2 * c).map(|i| i / 2).collect();
        let val_labels: Vec<usize> = (0..10 * c).map(|i| i % c).collect();
        let val_rows: Vec<Vec<f32>> = val_labels
            .iter()
            .map(|&k| sample(k, &gap_i, 1.2, &mut rng))
            .collect();
        let test_labels: Vec<usize> = (0..20 * c).map(|i| i % c).collect();
        let test_rows: Vec<Vec<f32>> = test_labels
            .iter()
            .map(|&k| sample(k, &gap_i, 1.2, &mut rng))
            .collect();
        let text_raw = Mat::from_rows(&text_rows);
        let text = Rows::new(&text_raw, cm::text_labels(c, t));
        let image = Rows::new(&Mat::from_rows(&img_rows), img_labels);
        let val = Rows::new(&Mat::from_rows(&val_rows), val_labels);
        let test = Mat::from_rows(&test_rows).l2_normalized();
        let hyper = Hyper {
            lr: 1e-3,
            weight_decay: 0.0,
            batch_size: 8,
        };
        let run = |modality: Modality, init: Init| {
            let w0 = match init {
                Init::Zeroshot => cm::zeroshot_init(&text_raw, c).unwrap(),
                Init::Random => cm::random_init(c, d, seed),
            };
            let s = TrainSettings {
                iters: 400,
                modality,
                init,
                seed,
            };
            let out = cm::train_one(&text, &image, &val, &Head::linear(w0), hyper, &s).unwrap();
            cm::accuracy(&out.head.logits(&test), &test_labels)
        };
        let img = run(Modality::Image, Init::Random);
        let cross = run(Modality::Cross, Init::Zeroshot);
        eprintln!("seed {seed}: image-only {img:.1}%, cross-modal {cross:.1}%");
        diffs.push(cross - img);
    }
    let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
    assert!(mean > 10.0, "cross-modal gain {diffs:?}");
    assert!(diffs.iter().all(|&x| x > 0.0), "{diffs:?}");
}

/// The sweep skips settings whose half batch exceeds a set, notes them, and picks the best.
#[test]
fn sweep_skips_oversized_batches_and_picks_best() {
    let f = fixture();
    let text = Rows::new(&f.text, cm::text_labels(C, T));
    let image = Rows::new(&f.image, f.image_labels.clone());
    let val = image.clone();
    let w0 = cm::zeroshot_init(&f.text, C).unwrap();
    let s = TrainSettings {
        iters: 120,
        modality: Modality::Cross,
        init: Init::Zeroshot,
        seed: 1,
    };
    let out = cm::sweep(
        &text,
        &image,
        &val,
        &Head::linear(w0),
        &cm::default_grid(),
        &s,
    )
    .unwrap();
    assert_eq!(out.notes.len(), 6);
    assert!(out.best.head.adapter.is_none());
    assert_eq!(out.best.hyper.batch_size, 8);
    let best = out
        .results
        .iter()
        .filter_map(|(_, a)| *a)
        .fold(f64::MIN, f64::max);
    assert_eq!(out.best.val_acc, best);
}

// ---------------------------------------------------------------------------------------------
// CLIP-Adapter head
// ---------------------------------------------------------------------------------------------

/// The reference adapter (formula weights inside nn.Linear's default range) on a linear layer.
fn reference_adapter_head(r: &Value, weight: Mat) -> Head {
    Head {
        adapter: Some(Adapter {
            fc1: matrix(&r["adapter_fc1"]),
            fc2: matrix(&r["adapter_fc2"]),
            ratio: cm::ADAPTER_RATIO,
        }),
        weight,
    }
}

/// The reference batch: text rows then image rows, normalised, with labels.
fn batch(f: &Fixture, ti: &[usize], ii: &[usize]) -> (Mat, Vec<usize>) {
    let text_labels = cm::text_labels(C, T);
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for &t in ti {
        rows.push(f.text.row(t).to_vec());
        labels.push(text_labels[t]);
    }
    for &i in ii {
        rows.push(f.image.row(i).to_vec());
        labels.push(f.image_labels[i]);
    }
    (Mat::from_rows(&rows).l2_normalized(), labels)
}

fn rows_of(v: &Value) -> Vec<Vec<usize>> {
    serde_json::from_value(v.clone()).unwrap()
}

#[test]
fn adapter_head_forward_matches_reference() {
    let r = reference();
    let head = reference_adapter_head(&r, cm::zeroshot_init(&fixture().text, C).unwrap());
    let x = Mat::from_rows(&formula(4, D, 5.0));
    let x = Mat::new(4, D, x.data.iter().map(|v| v * 2.5).collect());
    let got = head.logits(&x.l2_normalized());
    let want = matrix(&r["adapter_head_logits"]);
    assert!(
        max_abs_diff(&got, &want) < 1e-3,
        "{}",
        max_abs_diff(&got, &want)
    );
    // The adapter matters: the linear head on the same weight gives other logits.
    assert!(max_abs_diff(&cm::head_logits(&x, &head.weight), &want) > 1.0);
}

/// Loss and the hand-derived gradient of all three layers equal PyTorch's autograd on the
/// reference batch.
#[test]
fn adapter_batch_loss_and_gradient_match_reference() {
    let r = reference();
    let f = fixture();
    let (xn, labels) = batch(
        &f,
        &serde_json::from_value::<Vec<usize>>(r["batch_text_rows"].clone()).unwrap(),
        &serde_json::from_value::<Vec<usize>>(r["batch_image_rows"].clone()).unwrap(),
    );
    let head = reference_adapter_head(&r, perturbed(&cm::zeroshot_init(&f.text, C).unwrap()));
    let mut g = head.clone();
    let loss = cm::head_loss_and_grad(&xn, &labels, &head, &mut g);
    let want = r["adapter_batch_loss"].as_f64().unwrap();
    assert!(
        (loss as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
        "{loss} vs {want}"
    );
    let ga = g.adapter.as_ref().unwrap();
    for (got, key) in [
        (&g.weight, "adapter_batch_grad_head"),
        (&ga.fc1, "adapter_batch_grad_fc1"),
        (&ga.fc2, "adapter_batch_grad_fc2"),
    ] {
        let d = max_abs_diff(got, &matrix(&r[key]));
        assert!(d < 1e-3, "{key}: {d}");
    }
}

/// The adapter gradient equals candle autograd (the forward composed from candle ops) and finite
/// differences, for the linear layer and both adapter layers.
#[test]
fn adapter_gradient_matches_autograd_and_finite_differences() {
    let r = reference();
    let f = fixture();
    let xn = f.image.l2_normalized();
    let labels = f.image_labels.clone();
    let head = reference_adapter_head(&r, perturbed(&cm::zeroshot_init(&f.text, C).unwrap()));
    let mut g = head.clone();
    let loss = cm::head_loss_and_grad(&xn, &labels, &head, &mut g);
    let a = head.adapter.as_ref().unwrap();

    let var = |m: &Mat| Var::from_tensor(&m.to_tensor().unwrap()).unwrap();
    let (w, fc1, fc2) = (var(&head.weight), var(&a.fc1), var(&a.fc2));
    let x = xn.to_tensor().unwrap();
    let a1 = x
        .matmul(&fc1.as_tensor().t().unwrap())
        .unwrap()
        .relu()
        .unwrap();
    let a2 = a1
        .matmul(&fc2.as_tensor().t().unwrap())
        .unwrap()
        .relu()
        .unwrap();
    let rho = cm::ADAPTER_RATIO as f64;
    let z = ((a2 * rho).unwrap() + (x * (1.0 - rho)).unwrap()).unwrap();
    let logits = (z.matmul(&w.as_tensor().t().unwrap()).unwrap() * cm::LOGIT_SCALE as f64).unwrap();
    let grads = autograd_cross_entropy(&logits, &labels, loss);
    let ga = g.adapter.as_ref().unwrap();
    for (v, got) in [(&w, &g.weight), (&fc1, &ga.fc1), (&fc2, &ga.fc2)] {
        let want = Mat::from_tensor(grads.get(v.as_tensor()).unwrap()).unwrap();
        assert!(want.data.iter().any(|v| v.abs() > 1e-3));
        let d = max_abs_diff(got, &want);
        assert!(
            d < 1e-3 * (1.0 + want.data.iter().fold(0f32, |m, v| m.max(v.abs()))),
            "{d}"
        );
    }

    // Central differences on a few entries of each layer.
    let h = 1e-3f32;
    let mut scratch = head.clone();
    let loss_at = |param: usize, idx: usize, delta: f32, scratch: &mut Head| -> f32 {
        let mut h2 = head.clone();
        let ad = h2.adapter.as_mut().unwrap();
        match param {
            0 => h2.weight.data[idx] += delta,
            1 => ad.fc1.data[idx] += delta,
            _ => ad.fc2.data[idx] += delta,
        }
        cm::head_loss_and_grad(&xn, &labels, &h2, scratch)
    };
    for (param, idx, an) in [
        (0, 0, g.weight.data[0]),
        (0, 2 * D + 5, g.weight.data[2 * D + 5]),
        (1, 3, ga.fc1.data[3]),
        (1, 2 * D + 9, ga.fc1.data[2 * D + 9]),
        (2, 5, ga.fc2.data[5]),
        (2, 13 * 4 + 2, ga.fc2.data[13 * 4 + 2]),
    ] {
        let fd = (loss_at(param, idx, h, &mut scratch) - loss_at(param, idx, -h, &mut scratch))
            / (2.0 * h);
        assert!(
            (fd - an).abs() < 2e-2 * (1.0 + an.abs()),
            "param {param} [{idx}]: {fd} vs {an}"
        );
    }
}

/// Six AdamW steps over all three layers on the reference's fixed batches and learning rates:
/// the loss of every step and the final weights equal PyTorch's `AdamW` on the official head.
#[test]
fn adapter_training_steps_match_reference() {
    let r = reference();
    let f = fixture();
    let t = &r["adapter_train"];
    let head = reference_adapter_head(&r, cm::zeroshot_init(&f.text, C).unwrap());
    let mut trainer = cm::Trainer::new(&head);
    let lrs: Vec<f64> = serde_json::from_value(t["lr"].clone()).unwrap();
    let wd = t["wd"].as_f64().unwrap();
    let want: Vec<f64> = serde_json::from_value(t["loss"].clone()).unwrap();
    let (tr, ir) = (rows_of(&t["text_rows"]), rows_of(&t["image_rows"]));
    assert_eq!(lrs.len(), want.len());
    for (k, &lr) in lrs.iter().enumerate() {
        let (xn, labels) = batch(&f, &tr[k], &ir[k]);
        let loss = trainer.step(&xn, &labels, lr, wd) as f64;
        assert!(
            (loss - want[k]).abs() < 1e-4 * (1.0 + want[k].abs()),
            "step {k}: {loss} vs {}",
            want[k]
        );
    }
    let got = trainer.head();
    let a = got.adapter.as_ref().unwrap();
    for (m, key) in [(&got.weight, "head"), (&a.fc1, "fc1"), (&a.fc2, "fc2")] {
        let d = max_abs_diff(m, &matrix(&t[key]));
        assert!(d < 1e-4, "{key}: {d}");
    }
    // Every layer moved.
    let a0 = head.adapter.as_ref().unwrap();
    assert!(max_abs_diff(&got.weight, &head.weight) > 1e-3);
    assert!(max_abs_diff(&a.fc1, &a0.fc1) > 1e-3);
    assert!(max_abs_diff(&a.fc2, &a0.fc2) > 1e-3);
}

/// The adapter sweep is the official `HYPER_DICT['adapter']`.
#[test]
fn adapter_grid_matches_reference() {
    let r = reference();
    let want = r["adapter_grid"].as_array().unwrap();
    let grid = cm::grid_for(cm::HeadKind::Adapter);
    assert_eq!(grid.len(), want.len());
    for (h, w) in grid.iter().zip(want) {
        assert_eq!(h.lr, w["lr"].as_f64().unwrap());
        assert_eq!(h.weight_decay, w["wd"].as_f64().unwrap());
        assert_eq!(h.batch_size as u64, w["batch"].as_u64().unwrap());
    }
    assert_eq!(cm::grid_for(cm::HeadKind::Linear), cm::default_grid());
}

/// A sweep with the adapter head trains all layers and keeps the adapter in the best state;
/// WiSE-FT blends the linear layer only.
#[test]
fn adapter_sweep_trains_adapter_and_wise_ft_keeps_it() {
    let f = fixture();
    let text = Rows::new(&f.text, cm::text_labels(C, T));
    let image = Rows::new(&f.image, f.image_labels.clone());
    let w0 = cm::zeroshot_init(&f.text, C).unwrap();
    let init = Head {
        adapter: Some(Adapter::random(D, cm::ADAPTER_REDUCTION, cm::ADAPTER_RATIO, 1).unwrap()),
        weight: w0.clone(),
    };
    let s = TrainSettings {
        iters: 150,
        modality: Modality::Cross,
        init: Init::Zeroshot,
        seed: 1,
    };
    let grid = [Hyper {
        lr: 1e-2,
        weight_decay: 1e-3,
        batch_size: 8,
    }];
    let out = cm::sweep(&text, &image, &image, &init, &grid, &s).unwrap();
    let a = out.best.head.adapter.as_ref().unwrap();
    let a0 = init.adapter.as_ref().unwrap();
    assert!(out.best.best_iter > 0, "the best state is a trained one");
    assert!(max_abs_diff(&a.fc1, &a0.fc1) > 1e-3 && max_abs_diff(&a.fc2, &a0.fc2) > 1e-3);
    let wise = cm::wise_ft_head(&out.best.head, &w0, 0.5);
    assert_eq!(wise.adapter, out.best.head.adapter);
    assert_eq!(wise.weight, cm::wise_ft(&out.best.head.weight, &w0, 0.5));
}

/// A linear artifact written before the adapter existed (no adapter fields) still loads; an
/// adapter artifact round-trips; an adapter artifact without its tensors is refused.
#[test]
fn artifacts_old_linear_and_adapter_load() {
    let dir = tempfile::tempdir().unwrap();
    let w0 = cm::zeroshot_init(&fixture().text, C).unwrap();
    let meta = serde_json::json!({
        "kind": "crossmodal", "version": 1, "model": "m", "revision": null,
        "projection_dim": D, "class_folders": ["a", "b", "c", "d", "e"],
        "class_names": ["a", "b", "c", "d", "e"], "templates": ["a photo of a {}."],
        "shots": 1, "seed": 1, "head": "linear", "modality": "cross", "init": "zeroshot",
        "image_views": ["center", "flip"], "iters": 10, "swept": false,
        "hyper": {"lr": 0.001, "weight_decay": 0.0, "batch_size": 8}, "best_iter": 0,
        "val_acc": 50.0, "val_acc_zeroshot": 40.0, "val_n": 10, "sweep": [],
        "wise_ft_alpha": 0.8, "val_acc_wiseft": null, "default_head": "head"
    });
    let old = dir.path().join("old.safetensors");
    clipft::io::save(&old, &[("head", &w0.to_tensor().unwrap())], &meta).unwrap();
    let art = cm::CrossArtifact::load(&old).unwrap();
    assert!(art.adapter.is_none());
    // The legacy `wise_ft_alpha` was the learned head's weight: the zero-shot ratio is 1 − it.
    assert_eq!(art.meta.wise_ft_ratio, Some(1.0 - 0.8));
    assert_eq!(art.meta.head, cm::HeadKind::Linear);
    let (h, method) = art.pick("default").unwrap();
    assert_eq!((h.weight, method), (w0.clone(), "crossmodal"));
    // Saving it again writes no adapter fields.
    let again = dir.path().join("again.safetensors");
    art.save(&again).unwrap();
    let (_, m) = clipft::io::load(&again).unwrap();
    let mut want = meta.clone();
    want.as_object_mut().unwrap().remove("wise_ft_alpha");
    want["wise_ft_ratio"] = serde_json::json!(1.0 - 0.8);
    assert_eq!(m, want);

    let mut ad = art.clone();
    ad.meta.head = cm::HeadKind::Adapter;
    ad.meta.adapter_reduction = Some(cm::ADAPTER_REDUCTION);
    ad.meta.adapter_ratio = Some(0.2);
    ad.adapter = Some(Adapter::random(D, cm::ADAPTER_REDUCTION, cm::ADAPTER_RATIO, 5).unwrap());
    let p = dir.path().join("adapter.safetensors");
    ad.save(&p).unwrap();
    let back = cm::CrossArtifact::load(&p).unwrap();
    assert_eq!(back.adapter, ad.adapter);
    assert_eq!(back.adapter.as_ref().unwrap().ratio, cm::ADAPTER_RATIO);
    let (h, method) = back.pick("learned").unwrap();
    assert_eq!(method, "crossmodal-adapter");
    assert_eq!(h.adapter, ad.adapter);
    // A blend ratio outside [0, 1], or a default head the file lacks, is refused.
    let mut bad = ad.clone();
    bad.meta.adapter_ratio = Some(2.0);
    bad.save(&p).unwrap();
    let e = format!("{:#}", cm::CrossArtifact::load(&p).unwrap_err());
    assert!(
        e.contains("`adapter_ratio` 2 is not between 0 and 1"),
        "{e}"
    );
    let mut bad = ad.clone();
    bad.meta.default_head = "head_wiseft".into();
    bad.save(&p).unwrap();
    let e = format!("{:#}", cm::CrossArtifact::load(&p).unwrap_err());
    assert!(e.contains("`default_head` `head_wiseft`"), "{e}");
    let mut broken = ad.clone();
    broken.adapter = None;
    broken.save(&p).unwrap();
    let e = cm::CrossArtifact::load(&p).unwrap_err();
    assert!(format!("{e:#}").contains("adapter.fc1"), "{e:#}");
    // A head that is not a float matrix is refused naming the file and tensor, not cast.
    let bad = dir.path().join("bad.safetensors");
    let w = w0.to_tensor().unwrap();
    for (t, want) in [
        (w.unsqueeze(0).unwrap(), "`head` has shape [1, "),
        (w.to_dtype(candle_core::DType::U8).unwrap(), "`head` is U8"),
    ] {
        clipft::io::save(&bad, &[("head", &t)], &meta).unwrap();
        let e = format!("{:#}", cm::CrossArtifact::load(&bad).unwrap_err());
        assert!(e.contains("bad.safetensors") && e.contains(want), "{e}");
    }
}

mod cli {
    use std::path::{Path, PathBuf};

    use assert_cmd::Command;
    use clipft::model::synth;
    use serde_json::Value;

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    /// A temp dir holding a tiny checkpoint (`model`) and a 3-class dataset (`data`).
    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        synth::write_checkpoint(&dir.path().join("model"), &synth::tiny_config(), 0).unwrap();
        let splits = [("train", 4), ("val", 3), ("test", 4)];
        synth::write_dataset(&dir.path().join("data"), 3, splits, 0).unwrap();
        dir
    }

    /// `clipft --quiet` with the feature cache inside `dir`.
    fn clipft(dir: &Path) -> Command {
        let mut c = Command::cargo_bin("clipft").unwrap();
        c.env("CLIPFT_CACHE_DIR", dir.join("cache")).arg("--quiet");
        c
    }

    #[test]
    fn train_then_eval_adapter_end_to_end() {
        let dir = fixture();
        let p = |n: &str| -> PathBuf { dir.path().join(n) };
        let cmd = || clipft(dir.path());
        let out = cmd()
            .args(["crossmodal", "train", "--model", s(&p("model")), "--data"])
            .arg(s(&p("data")))
            .args([
                "--shots",
                "2",
                "--iters",
                "150",
                "--templates",
                "ensemble7",
                "--wise-ft",
                "--out",
            ])
            .arg(s(&p("head.safetensors")))
            .assert()
            .success()
            .get_output()
            .stdout
            .clone();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("chosen: lr"), "{text}");
        let (_, meta) = clipft::io::load(&p("head.safetensors")).unwrap();
        assert_eq!(meta["kind"], "crossmodal");
        // Val as the official few-shot protocol: min(--shots, 4) = 2 of the 3 per class.
        assert_eq!(meta["val_n"], 6);
        assert_eq!(meta["templates"].as_array().unwrap().len(), 7);
        assert_eq!(meta["sweep"].as_array().unwrap().len(), 12);
        let eval = |variant: &str| -> Value {
            let o = cmd()
                .args(["eval", "--adapter", s(&p("head.safetensors")), "--data"])
                .arg(s(&p("data")))
                .args(["--split", "test", "--json", "--head-variant", variant])
                .assert()
                .success()
                .get_output()
                .stdout
                .clone();
            serde_json::from_slice(&o).unwrap()
        };
        let j = eval("default");
        assert_eq!(j["method"], "crossmodal");
        assert_eq!(j["n"], 12);
        assert_eq!(eval("wiseft")["method"], "crossmodal-wiseft");
        // A different class set is refused.
        synth::write_dataset(&p("other"), 4, [("train", 2), ("val", 2), ("test", 2)], 0).unwrap();
        cmd()
            .args(["eval", "--adapter", s(&p("head.safetensors")), "--data"])
            .arg(s(&p("other")))
            .assert()
            .failure()
            .stderr(predicates::str::contains("class folders"));
    }

    /// `--head adapter` end to end: the artifact holds the adapter and its metadata, the sweep is
    /// the adapter grid, `eval --adapter` reproduces the train-time val accuracy of both heads, and
    /// its logits are the library's adapter forward on the same features (not the linear head's).
    #[test]
    fn train_adapter_head_then_eval() {
        use clipft::methods::crossmodal::{CrossArtifact, Head, Mat};
        use predicates::prelude::*;
        let dir = fixture();
        let p = |n: &str| -> PathBuf { dir.path().join(n) };
        let cmd = || clipft(dir.path());
        let train = |extra: &[&str], out: &str| {
            cmd()
                .args(["crossmodal", "train", "--model", s(&p("model")), "--data"])
                .arg(s(&p("data")))
                .args(["--shots", "2", "--iters", "150", "--templates", "ensemble7"])
                // Tuned on every val image, as `eval --split val` scores below.
                .args(["--val-shots", "all"])
                .args(extra)
                .arg("--out")
                .arg(s(&p(out)))
                .assert()
        };
        cmd()
            .args(["crossmodal", "train", "--model", s(&p("model")), "--data"])
            .arg(s(&p("data")))
            .args(["--val-shots", "0", "--out", s(&p("x.safetensors"))])
            .assert()
            .failure()
            .stderr(
                predicates::str::contains("--val-shots").and(predicates::str::contains("or `all`")),
            );
        // A wrong head names the flag and the choices.
        train(&["--head", "mlp"], "x.safetensors")
            .failure()
            .stderr(predicates::str::contains("--head").and(predicates::str::contains("adapter")));
        let out = train(&["--head", "adapter", "--wise-ft"], "head.safetensors")
            .success()
            .get_output()
            .stdout
            .clone();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("CLIP-Adapter head"), "{text}");
        let (t, meta) = clipft::io::load(&p("head.safetensors")).unwrap();
        assert_eq!(meta["head"], "adapter");
        assert_eq!(meta["adapter_reduction"], 4);
        assert_eq!(meta["adapter_ratio"].as_f64(), Some(0.2));
        assert_eq!(t["head"].dims(), &[3, 32]);
        assert_eq!(t["head_wiseft"].dims(), &[3, 32]);
        assert_eq!(t["adapter.fc1"].dims(), &[8, 32]);
        assert_eq!(t["adapter.fc2"].dims(), &[32, 8]);
        let sweep = meta["sweep"].as_array().unwrap();
        assert_eq!(sweep.len(), 12);
        assert!(sweep
            .iter()
            .all(|e| e[0]["batch_size"] == 8 && e[0]["lr"].as_f64().unwrap() <= 1e-4));

        let eval = |split: &str, variant: &str, logits: Option<&str>| -> Value {
            let mut c = cmd();
            c.args(["eval", "--adapter", s(&p("head.safetensors")), "--data"])
                .arg(s(&p("data")))
                .args(["--split", split, "--json", "--head-variant", variant]);
            if let Some(l) = logits {
                c.arg("--save-logits").arg(s(&p(l)));
            }
            serde_json::from_slice(&c.assert().success().get_output().stdout).unwrap()
        };
        // Scored as trained: the val accuracies recorded at train time come back.
        let v = eval("val", "learned", None);
        assert_eq!(v["method"], "crossmodal-adapter");
        assert!((v["top1"].as_f64().unwrap() - meta["val_acc"].as_f64().unwrap()).abs() < 1e-9);
        let v = eval("val", "wiseft", None);
        assert_eq!(v["method"], "crossmodal-adapter-wiseft");
        let want = meta["val_acc_wiseft"].as_f64().unwrap();
        assert!((v["top1"].as_f64().unwrap() - want).abs() < 1e-9);

        // The eval logits are normalise → adapter → linear ×100 on the test features.
        let j = eval("test", "default", Some("logits.safetensors"));
        assert_eq!(j["n"], 12);
        cmd()
            .args(["features", "--model", s(&p("model")), "--data"])
            .arg(s(&p("data")))
            .args(["--split", "test", "--out"])
            .arg(s(&p("feats.safetensors")))
            .assert()
            .success();
        let (mut f, _) = clipft::io::load(&p("feats.safetensors")).unwrap();
        let x = Mat::from_tensor(&f.remove("image_features").unwrap()).unwrap();
        let (mut l, logits_meta) = clipft::io::load(&p("logits.safetensors")).unwrap();
        assert_eq!(logits_meta["head_variant"], "default");
        let got = Mat::from_tensor(&l.remove("logits").unwrap()).unwrap();
        let art = CrossArtifact::load(&p("head.safetensors")).unwrap();
        let (head, _) = art.pick("learned").unwrap();
        let diff = |a: &Mat, b: &Mat| {
            a.data
                .iter()
                .zip(&b.data)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        assert!(diff(&head.logits(&x), &got) < 1e-3);
        let linear = Head::linear(art.head.clone()).logits(&x);
        assert!(diff(&linear, &got) > 1e-2, "the adapter changes the logits");
    }
}

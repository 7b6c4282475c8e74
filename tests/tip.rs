//! Tip-Adapter and Tip-Adapter-F: the math pinned against reference numbers from a PyTorch port
//! of the official code (`scripts/tip_reference.py` → `tests/fixtures/tip/reference.json`), the
//! methods beating their baselines on generated tasks, and the command line end to end.

use std::path::Path;

use candle_core::{Device, Tensor};
use clipft::features::l2_normalize;
use clipft::methods::tip::{self, Grid, TipFSettings, TipFTrainer};
use serde_json::Value;

const C: usize = 5;
const K: usize = 4;
const D: usize = 16;
const E: usize = 3;
const NVAL: usize = 40;
const NK: usize = C * K;

/// The fixture formula of `scripts/tip_reference.py` (f64, then f32).
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

fn tensor(rows: &[Vec<f32>]) -> Tensor {
    let (r, c) = (rows.len(), rows[0].len());
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (r, c), &Device::Cpu).unwrap()
}

struct Fixture {
    views: Vec<Tensor>,
    train_labels: Vec<usize>,
    val: Tensor,
    val_labels: Vec<usize>,
    classifier: Tensor,
}

fn fixture() -> Fixture {
    let proto = formula(C, D, 1.0);
    let train_labels: Vec<usize> = (0..NK).map(|k| k / K).collect();
    let views = (0..E)
        .map(|e| {
            let noise = formula(NK, D, 10.0 + e as f64);
            let rows: Vec<Vec<f32>> = (0..NK)
                .map(|k| {
                    (0..D)
                        .map(|j| 3.0 * proto[train_labels[k]][j] + noise[k][j])
                        .collect()
                })
                .collect();
            tensor(&rows)
        })
        .collect();
    let val_labels: Vec<usize> = (0..NVAL).map(|n| n % C).collect();
    let noise = formula(NVAL, D, 30.0);
    let val: Vec<Vec<f32>> = (0..NVAL)
        .map(|n| {
            (0..D)
                .map(|j| proto[val_labels[n]][j] + 0.8 * noise[n][j])
                .collect()
        })
        .collect();
    let noise = formula(C, D, 40.0);
    let w: Vec<Vec<f32>> = (0..C)
        .map(|c| (0..D).map(|j| proto[c][j] + 1.0 * noise[c][j]).collect())
        .collect();
    Fixture {
        views,
        train_labels,
        val: l2_normalize(&tensor(&val)).unwrap(),
        val_labels,
        classifier: l2_normalize(&tensor(&w)).unwrap(),
    }
}

fn reference() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tip/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn matrix(v: &Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn vector(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

fn assert_search(got: &tip::SearchResult, want: &Value) {
    assert!(
        (got.beta - want["beta"].as_f64().unwrap()).abs() < 1e-9
            && (got.alpha - want["alpha"].as_f64().unwrap()).abs() < 1e-9
            && (got.acc - want["acc"].as_f64().unwrap()).abs() < 1e-9,
        "got β {} α {} acc {}, reference {want}",
        got.beta,
        got.alpha,
        got.acc
    );
}

#[test]
fn cache_keys_average_raw_views_then_normalise() {
    let f = fixture();
    let r = reference();
    let keys = tip::cache_keys_from_views(&f.views).unwrap();
    let got = keys.to_vec2::<f32>().unwrap();
    assert!(max_abs_diff(&got, &matrix(&r["cache_keys"])) < 1e-6);
    // The other order (normalise each view, then average) gives different keys.
    let wrong: Vec<f32> = r["cache_keys_wrong_order_row0"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let diff = got[0]
        .iter()
        .zip(&wrong)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(diff > 1e-3, "the fixture must tell the two orders apart");
}

#[test]
fn logits_match_reference() {
    let f = fixture();
    let r = reference();
    let keys = tip::cache_keys_from_views(&f.views).unwrap();
    let values = tip::one_hot(&f.train_labels, C).unwrap();
    let aff = f.val.matmul(&keys.t().unwrap()).unwrap();
    for (name, beta, alpha) in [("logits_b1_a117", 1.0, 1.17), ("logits_b55_a3", 5.5, 3.0)] {
        let got = tip::tip_logits(&f.val, &aff, &values, &f.classifier, beta, alpha)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let d = max_abs_diff(&got, &matrix(&r[name]));
        assert!(d < 2e-4, "{name}: max abs diff {d}");
    }
    let zs = clipft::eval::zero_shot_logits(&f.val, &f.classifier).unwrap();
    let acc = tip::top1(&zs, &f.val_labels).unwrap();
    assert!((acc - r["zero_shot_acc"].as_f64().unwrap()).abs() < 1e-9);
}

#[test]
fn search_grid_and_result_match_reference() {
    let f = fixture();
    let r = reference();
    let g = Grid::new([7.0, 3.0], [20, 10]);
    let want_b = vector(&r["grid_7_3_20_10"]["betas"]);
    let want_a = vector(&r["grid_7_3_20_10"]["alphas"]);
    assert_eq!(g.betas().len(), want_b.len());
    for (a, b) in g.betas().iter().zip(&want_b) {
        assert!((a - b).abs() < 1e-12);
    }
    assert_eq!(g.alphas.len(), want_a.len());
    for (a, b) in g.alphas.iter().zip(&want_a) {
        assert!((a - b).abs() < 1e-12);
    }

    let keys = tip::cache_keys_from_views(&f.views).unwrap();
    let aff = f.val.matmul(&keys.t().unwrap()).unwrap();
    let zs = clipft::eval::zero_shot_logits(&f.val, &f.classifier).unwrap();
    let small = tip::search(&aff, &f.train_labels, &zs, &f.val_labels, &g).unwrap();
    assert_search(&small, &r["search_7_3_20_10"]);
    let full = tip::search(
        &aff,
        &f.train_labels,
        &zs,
        &f.val_labels,
        &Grid::new([12.0, 10.0], [200, 20]),
    )
    .unwrap();
    assert_search(&full, &r["search_12_10_200_20"]);
}

/// AdamW + cosine schedule + cross-entropy through the Tip logits, step for step like PyTorch.
#[test]
fn tipf_training_matches_reference() {
    let f = fixture();
    let r = &reference()["tipf"];
    let keys = tip::cache_keys_from_views(&f.views).unwrap();
    let values = tip::one_hot(&f.train_labels, C).unwrap();
    let epochs = r["epochs"].as_u64().unwrap() as usize;
    let batch = r["batch"].as_u64().unwrap() as usize;
    let settings = TipFSettings {
        epochs,
        lr: r["lr"].as_f64().unwrap(),
        batch_size: batch,
        init_beta: r["init_beta"].as_f64().unwrap(),
        init_alpha: r["init_alpha"].as_f64().unwrap(),
        eps: 1e-4,
        weight_decay: 0.01,
        seed: 0,
    };
    let iters = NK.div_ceil(batch);
    let mut tr =
        TipFTrainer::new(&keys, &values, &f.classifier, &settings, epochs * iters).unwrap();
    let want_losses = vector(&r["losses"]);
    let want_lrs = vector(&r["lrs"]);
    let want_val = vector(&r["val_accs"]);
    assert_eq!(want_val.len(), epochs);
    let mut step = 0;
    for (e, want_acc) in want_val.iter().enumerate() {
        let feats = l2_normalize(&f.views[e % E]).unwrap();
        let order: Vec<usize> = (0..NK).map(|k| (7 * k + 3 * e) % NK).collect();
        for chunk in order.chunks(batch) {
            let idx: Vec<u32> = chunk.iter().map(|&i| i as u32).collect();
            let x = feats
                .index_select(&Tensor::new(idx.as_slice(), &Device::Cpu).unwrap(), 0)
                .unwrap();
            let y: Vec<usize> = chunk.iter().map(|&i| f.train_labels[i]).collect();
            assert!((tr.current_lr() - want_lrs[step]).abs() < 1e-12);
            let loss = tr.step(&x, &y).unwrap() as f64;
            assert!(
                (loss - want_losses[step]).abs() < 1e-3 * want_losses[step].abs().max(1.0),
                "step {step}: loss {loss} vs {}",
                want_losses[step]
            );
            step += 1;
        }
        let acc = tip::top1(&tr.logits(&f.val).unwrap(), &f.val_labels).unwrap();
        assert!((acc - want_acc).abs() < 1e-9);
    }
    let w = tr.weight().unwrap();
    let init = keys.to_vec2::<f32>().unwrap();
    let got = w.to_vec2::<f32>().unwrap();
    let want = matrix(&r["weight"]);
    assert!(max_abs_diff(&got, &init) > 1e-3, "the weight must move");
    let d = max_abs_diff(&got, &want);
    assert!(d < 2e-5, "trained weight: max abs diff {d}");
    let aff = f.val.matmul(&w.t().unwrap()).unwrap();
    let zs = clipft::eval::zero_shot_logits(&f.val, &f.classifier).unwrap();
    let found = tip::search(
        &aff,
        &f.train_labels,
        &zs,
        &f.val_labels,
        &Grid::new([7.0, 3.0], [20, 10]),
    )
    .unwrap();
    assert_search(&found, &r["search_7_3_20_10"]);
}

// ---------------------------------------------------------------------------------------------
// Generated tasks: Tip-Adapter beats zero-shot, Tip-Adapter-F beats Tip-Adapter.
// ---------------------------------------------------------------------------------------------

struct Gaussian(rand_chacha::ChaCha8Rng);

impl Gaussian {
    fn new(seed: u64) -> Self {
        use rand::SeedableRng;
        Self(rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }
    fn next(&mut self) -> f32 {
        use rand::Rng;
        let u1: f64 = self.0.random_range(f64::EPSILON..1.0);
        let u2: f64 = self.0.random();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// A feature-level task: class means in the first `D_SIG` dimensions, strong class-independent
/// nuisance in the other `D_NUIS` (which a cosine cache cannot ignore, but trained keys can), a
/// noisy text classifier, and augmented views as small perturbations of each train image.
struct Task {
    views: Vec<Tensor>,
    train_labels: Vec<usize>,
    val: Tensor,
    val_labels: Vec<usize>,
    test: Tensor,
    test_labels: Vec<usize>,
    classifier: Tensor,
}

fn task(seed: u64) -> Task {
    const CLS: usize = 10;
    const SHOTS: usize = 8;
    const D_SIG: usize = 16;
    const D_NUIS: usize = 48;
    const DIM: usize = D_SIG + D_NUIS;
    let mut g = Gaussian::new(seed);
    let means: Vec<Vec<f32>> = (0..CLS)
        .map(|_| (0..D_SIG).map(|_| g.next()).collect())
        .collect();
    let sample = |c: usize, g: &mut Gaussian| -> Vec<f32> {
        (0..DIM)
            .map(|j| {
                if j < D_SIG {
                    means[c][j] + 0.9 * g.next()
                } else {
                    1.3 * g.next()
                }
            })
            .collect()
    };
    let train_labels: Vec<usize> = (0..CLS * SHOTS).map(|k| k / SHOTS).collect();
    let train: Vec<Vec<f32>> = train_labels.iter().map(|&c| sample(c, &mut g)).collect();
    let views = (0..4)
        .map(|_| {
            let rows: Vec<Vec<f32>> = train
                .iter()
                .map(|r| r.iter().map(|x| x + 0.2 * g.next()).collect())
                .collect();
            tensor(&rows)
        })
        .collect();
    let split = |n: usize, g: &mut Gaussian| {
        let labels: Vec<usize> = (0..n).map(|i| i % CLS).collect();
        let rows: Vec<Vec<f32>> = labels.iter().map(|&c| sample(c, g)).collect();
        (l2_normalize(&tensor(&rows)).unwrap(), labels)
    };
    let (val, val_labels) = split(300, &mut g);
    let (test, test_labels) = split(1000, &mut g);
    let w: Vec<Vec<f32>> = (0..CLS)
        .map(|c| {
            (0..DIM)
                .map(|j| {
                    if j < D_SIG {
                        means[c][j] + 2.0 * g.next()
                    } else {
                        0.0
                    }
                })
                .collect()
        })
        .collect();
    Task {
        views,
        train_labels,
        val,
        val_labels,
        test,
        test_labels,
        classifier: l2_normalize(&tensor(&w)).unwrap(),
    }
}

#[test]
fn tip_beats_zero_shot_and_tipf_beats_tip_on_a_generated_task() {
    let t = task(3);
    let cfg = tip::TipConfig::resolve("default").unwrap();
    let c = 10;
    let keys = tip::cache_keys_from_views(&t.views).unwrap();
    let values = tip::one_hot(&t.train_labels, c).unwrap();
    let zs_val = clipft::eval::zero_shot_logits(&t.val, &t.classifier).unwrap();
    let zs_test = clipft::eval::zero_shot_logits(&t.test, &t.classifier).unwrap();
    let zs = tip::top1(&zs_test, &t.test_labels).unwrap();

    // Tip-Adapter: α/β on val, scored on test.
    let aff = t.val.matmul(&keys.t().unwrap()).unwrap();
    let found = tip::search(&aff, &t.train_labels, &zs_val, &t.val_labels, &cfg.grid()).unwrap();
    let aff_test = t.test.matmul(&keys.t().unwrap()).unwrap();
    let logits = tip::tip_logits(
        &t.test,
        &aff_test,
        &values,
        &t.classifier,
        found.beta,
        found.alpha,
    )
    .unwrap();
    let tip_acc = tip::top1(&logits, &t.test_labels).unwrap();

    // Tip-Adapter-F on the bank of views, epoch and α/β chosen on val.
    let settings = TipFSettings {
        epochs: 20,
        lr: 1e-2,
        batch_size: 16,
        ..TipFSettings::from_config(&cfg, 1)
    };
    let bank: Vec<Tensor> = t.views.iter().map(|v| l2_normalize(v).unwrap()).collect();
    let mut views = |e: usize| Ok(bank[e % bank.len()].clone());
    let out = tip::train_adapter(
        &keys,
        &values,
        &t.classifier,
        &settings,
        &t.train_labels,
        &t.val,
        &t.val_labels,
        &mut views,
        false,
    )
    .unwrap();
    let aff = t.val.matmul(&out.weight.t().unwrap()).unwrap();
    let found_f = tip::search(&aff, &t.train_labels, &zs_val, &t.val_labels, &cfg.grid()).unwrap();
    let aff_test = t.test.matmul(&out.weight.t().unwrap()).unwrap();
    let logits = tip::tip_logits(
        &t.test,
        &aff_test,
        &values,
        &t.classifier,
        found_f.beta,
        found_f.alpha,
    )
    .unwrap();
    let tipf_acc = tip::top1(&logits, &t.test_labels).unwrap();
    eprintln!(
        "zero-shot {zs:.1}%, Tip-Adapter {tip_acc:.1}% (β {:.2} α {:.2}), Tip-Adapter-F {tipf_acc:.1}% \
         (epoch {}, β {:.2} α {:.2}; val {:?})",
        found.beta, found.alpha, out.best_epoch, found_f.beta, found_f.alpha, out.val_accs
    );
    assert!(
        tip_acc > zs + 5.0,
        "Tip-Adapter {tip_acc} vs zero-shot {zs}"
    );
    assert!(
        tipf_acc > tip_acc + 5.0,
        "Tip-Adapter-F {tipf_acc} vs Tip-Adapter {tip_acc}"
    );
}

// ---------------------------------------------------------------------------------------------
// The command line end to end on a generated checkpoint and image set.
// ---------------------------------------------------------------------------------------------

mod cli {
    use std::path::{Path, PathBuf};

    use assert_cmd::Command;
    use clipft::model::synth;
    use predicates::prelude::*;
    use predicates::str::contains;
    use serde_json::Value;

    struct Ws {
        dir: tempfile::TempDir,
    }

    impl Ws {
        fn new(classes: usize) -> Self {
            let dir = tempfile::tempdir().unwrap();
            synth::write_checkpoint(&dir.path().join("model"), &synth::tiny_config(), 0).unwrap();
            synth::write_dataset(
                &dir.path().join("data"),
                classes,
                [("train", 8), ("val", 6), ("test", 10)],
                0,
            )
            .unwrap();
            Self { dir }
        }
        fn p(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        fn cmd(&self) -> Command {
            let mut c = Command::cargo_bin("clipft").unwrap();
            c.env("CLIPFT_CACHE_DIR", self.p("cache"))
                .env("HF_HOME", self.p("hf"))
                .env("HF_HUB_OFFLINE", "1")
                .arg("--quiet");
            c
        }
        /// `tip build-cache` with this workspace's model, on `data`.
        fn build_cache(&self, data: &Path) -> Command {
            let mut c = self.cmd();
            c.args([
                "tip",
                "build-cache",
                "--model",
                s(&self.p("model")),
                "--data",
                s(data),
            ]);
            c
        }
        fn json(&self, args: &[&str]) -> Value {
            let out = self.cmd().args(args).arg("--json").assert().success();
            serde_json::from_slice(&out.get_output().stdout).unwrap()
        }
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    /// A cache built before augmented views went by composed names, from names that are not
    /// composed (as macOS stores accented ones), is refused by `tip train`: its keys came from
    /// other views than it would now draw. The same cache from this clipft is accepted.
    #[test]
    fn caches_of_views_by_decomposed_bytes_are_built_again() {
        let ws = Ws::new(2);
        let data = ws.p("data");
        // The first class folder, in every split, renamed to a decomposed `é` name.
        let first = std::fs::read_dir(data.join("train"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .min()
            .unwrap();
        for split in ["train", "val", "test"] {
            let dir = data.join(split);
            std::fs::rename(dir.join(&first), dir.join("e\u{301}t\u{e9}")).unwrap();
        }
        let tipc = ws.p("tip.safetensors");
        ws.build_cache(&data)
            .args(["--shots", "2", "--augment-epochs", "2", "--out", s(&tipc)])
            .assert()
            .success();
        let (tensors, mut meta) = clipft::io::load(&tipc).unwrap();
        assert_eq!(meta["composed_views"], true);
        let train = |cache: &Path| {
            let mut c = ws.cmd();
            c.args(["tip", "train", "--cache", s(cache), "--data", s(&data)])
                .args(["--epochs", "1", "--out", s(&ws.p("f.safetensors"))]);
            c
        };
        train(&tipc).assert().success();
        // As a clipft of before 2026-11-29 wrote it.
        meta.as_object_mut().unwrap().remove("composed_views");
        let old = ws.p("old.safetensors");
        let refs: Vec<(&str, &candle_core::Tensor)> =
            tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        clipft::io::save(&old, &refs, &meta).unwrap();
        train(&old)
            .assert()
            .failure()
            .stderr(contains("older than 2026-11-29").and(contains("build the cache again")));
    }

    /// `tip train` draws the cache's sample again: on another dataset it names the classes
    /// that differ, and on one with fewer images the cache's shot count, not flags it lacks.
    #[test]
    fn tip_train_on_another_dataset_names_the_cause() {
        let ws = Ws::new(3);
        let tipc = ws.p("tip.safetensors");
        ws.build_cache(&ws.p("data"))
            .args(["--shots", "4", "--augment-epochs", "1", "--out", s(&tipc)])
            .assert()
            .success();
        let train = |data: &Path| {
            let mut c = ws.cmd();
            c.args(["tip", "train", "--cache", s(&tipc), "--data", s(data)])
                .args(["--epochs", "1", "--out", s(&ws.p("f.safetensors"))]);
            c
        };
        let fewer = ws.p("fewer");
        synth::write_dataset(&fewer, 3, [("train", 2), ("val", 2), ("test", 2)], 0).unwrap();
        train(&fewer).assert().failure().stderr(
            contains("fewer training images than the 4 shots per class --cache")
                .and(contains("--allow-fewer-shots").not())
                .and(contains("--shots 4:").not()),
        );
        let other = ws.p("other");
        synth::write_dataset(&other, 2, [("train", 8), ("val", 2), ("test", 2)], 0).unwrap();
        train(&other)
            .assert()
            .failure()
            .stderr(contains("class folders differ").and(contains("fewer").not()));
        assert!(!ws.p("f.safetensors").exists());
    }

    #[test]
    fn build_train_eval_and_mismatch_errors() {
        let ws = Ws::new(4);
        let (model, data) = (ws.p("model"), ws.p("data"));
        let (tipc, tipf) = (ws.p("tip.safetensors"), ws.p("tipf.safetensors"));
        ws.build_cache(&data)
            .args(["--shots", "4", "--seed", "2", "--augment-epochs", "3"])
            .args(["--out", s(&tipc)])
            .assert()
            .success()
            .stdout(contains("tip-adapter: 16 cache entries, 4 classes"));
        let (t, meta) = clipft::io::load(&tipc).unwrap();
        assert_eq!(meta["kind"], "tip");
        assert_eq!(meta["augment_epochs"], 3);
        assert_eq!(meta["shots"], 4);
        assert_eq!(meta["projection_dim"], 32);
        assert_eq!(meta["train_paths"].as_array().unwrap().len(), 16);
        assert_eq!(meta["templates"][0], "a photo of a {}.");
        assert!(meta["beta"].as_f64().unwrap() > 0.0);
        assert_eq!(t["cache_keys"].dims(), &[16, 32]);
        assert_eq!(t["cache_values"].dims(), &[16, 4]);
        assert_eq!(t["text_classifier"].dims(), &[4, 32]);

        ws.cmd()
            .args(["tip", "train", "--cache", s(&tipc), "--data", s(&data)])
            .args(["--epochs", "3", "--batch-size", "8", "--out", s(&tipf)])
            .assert()
            .success()
            .stdout(contains("tip-adapter-f"));
        let (t, meta) = clipft::io::load(&tipf).unwrap();
        assert_eq!(meta["kind"], "tipf");
        assert_eq!(meta["train"]["settings"]["epochs"], 3);
        assert_eq!(meta["train"]["val_accs"].as_array().unwrap().len(), 3);
        assert_eq!(t["adapter_weight"].dims(), &[16, 32]);

        // Fresh augmented views every epoch (as the paper) instead of the cache's bank.
        let fresh = ws.p("fresh.safetensors");
        ws.cmd()
            .args(["tip", "train", "--cache", s(&tipc), "--data", s(&data)])
            .args(["--epochs", "2", "--fresh-views", "--out", s(&fresh)])
            .assert()
            .success();
        let (_, meta) = clipft::io::load(&fresh).unwrap();
        assert_eq!(meta["train"]["fresh_views"], true);
        // A run that diverges (an absurd lr) is an error naming --lr, and writes nothing: not an
        // artifact whose NaN losses `eval` could not read.
        let bad = ws.p("bad.safetensors");
        ws.cmd()
            .args(["tip", "train", "--cache", s(&tipc), "--data", s(&data)])
            .args(["--epochs", "3", "--lr", "1e6", "--out", s(&bad)])
            .assert()
            .failure()
            .stderr(contains("diverged").and(contains("--lr")));
        assert!(!bad.exists());
        // An output that is the input artifact would destroy it.
        let cache_bytes = std::fs::read(&tipc).unwrap();
        ws.cmd()
            .args(["tip", "train", "--cache", s(&tipc), "--data", s(&data)])
            .args(["--out", s(&tipc)])
            .assert()
            .failure()
            .stderr(contains("the --cache artifact"));
        ws.cmd()
            .args(["eval", "--adapter", s(&tipc), "--data", s(&data)])
            .args(["--save-logits", s(&tipc)])
            .assert()
            .failure()
            .stderr(contains("the --adapter artifact"));
        assert_eq!(std::fs::read(&tipc).unwrap(), cache_bytes);
        // A train image replaced under the same name is not the one the keys were built from.
        let (_, cache_meta) = clipft::io::load(&tipc).unwrap();
        let first = data.join(cache_meta["train_paths"][0].as_str().unwrap());
        let original = std::fs::read(&first).unwrap();
        let mut edited = original.clone();
        edited.extend_from_slice(b"trailer");
        std::fs::write(&first, &edited).unwrap();
        ws.cmd()
            .args(["tip", "train", "--cache", s(&tipc), "--data", s(&data)])
            .args(["--out", s(&ws.p("z.safetensors"))])
            .assert()
            .failure()
            .stderr(contains("changed since the cache was built"));
        std::fs::write(&first, &original).unwrap();
        // Metadata a method would take on trust is checked at load, naming the file.
        let (tensors, meta) = clipft::io::load(&tipc).unwrap();
        let damaged = ws.p("damaged.safetensors");
        let save_damaged = |t: &std::collections::HashMap<String, candle_core::Tensor>,
                            m: &serde_json::Value| {
            let refs: Vec<(&str, &candle_core::Tensor)> =
                t.iter().map(|(n, t)| (n.as_str(), t)).collect();
            clipft::io::save(&damaged, &refs, m).unwrap();
        };
        for (key, value, want) in [
            (
                "augment_epochs",
                serde_json::json!(0),
                "augment_epochs must be between 1 and 1000",
            ),
            (
                "augment_epochs",
                serde_json::json!(100_000_000_000u64),
                "augment_epochs must be between 1 and 1000",
            ),
            (
                "augment",
                serde_json::json!({"scale_min": 0.9, "scale_max": 0.5, "flip_p": 0.5}),
                "scale_min <= scale_max",
            ),
            (
                "alpha",
                serde_json::json!(null),
                "malformed Tip-Adapter metadata",
            ),
        ] {
            let mut m = meta.clone();
            m[key] = value;
            save_damaged(&tensors, &m);
            ws.cmd()
                .args(["tip", "train", "--cache", s(&damaged), "--data", s(&data)])
                .args(["--out", s(&ws.p("w.safetensors"))])
                .assert()
                .failure()
                .stderr(contains(want).and(contains("damaged.safetensors")));
        }
        // Value rows moved against the keys (and the train images) would vote for other
        // classes: the rows' classes are checked against the images' class folders.
        let mut rotated = tensors.clone();
        let values = &tensors["cache_values"];
        let n = values.dim(0).unwrap();
        rotated.insert(
            "cache_values".into(),
            candle_core::Tensor::cat(
                &[
                    values.narrow(0, 1, n - 1).unwrap(),
                    values.narrow(0, 0, 1).unwrap(),
                ],
                0,
            )
            .unwrap(),
        );
        save_damaged(&rotated, &meta);
        ws.cmd()
            .args(["eval", "--adapter", s(&damaged), "--data", s(&data)])
            .assert()
            .failure()
            .stderr(contains("not in that class's folder").and(contains("damaged.safetensors")));
        // An α too large for f32 passes the load checks, but its logits overflow: the error
        // names the artifact they came from.
        let mut m = meta.clone();
        m["alpha"] = serde_json::json!(1e308);
        save_damaged(&tensors, &m);
        ws.cmd()
            .args(["eval", "--adapter", s(&damaged), "--data", s(&data)])
            .assert()
            .failure()
            .stderr(contains("--adapter").and(contains(
                "damaged.safetensors: tip-adapter gives non-finite logits",
            )));
        // A Tip-Adapter-F artifact is not a cache to train from.
        ws.cmd()
            .args(["tip", "train", "--cache", s(&tipf), "--data", s(&data)])
            .args(["--out", s(&ws.p("y.safetensors"))])
            .assert()
            .failure()
            .stderr(contains("already a Tip-Adapter-F artifact"));

        // The artifact's model is used when --model is left out.
        let zs = ws.json(&["eval", "--model", s(&model), "--data", s(&data)]);
        let tip = ws.json(&["eval", "--adapter", s(&tipc), "--data", s(&data)]);
        let logits = ws.p("logits.safetensors");
        let tipf_r = ws.json(&[
            "eval",
            "--adapter",
            s(&tipf),
            "--model",
            s(&model),
            "--data",
            s(&data),
            "--save-logits",
            s(&logits),
        ]);
        assert_eq!(tip["method"], "tip-adapter");
        assert_eq!(tipf_r["method"], "tip-adapter-f");
        assert_eq!(tip["n"], 40);
        let (zs1, tip1) = (zs["top1"].as_f64().unwrap(), tip["top1"].as_f64().unwrap());
        eprintln!("zero-shot {zs1}, tip {tip1}, tipf {}", tipf_r["top1"]);
        assert!(tip1 > zs1 + 20.0, "Tip-Adapter {tip1} vs zero-shot {zs1}");
        let (t, meta) = clipft::io::load(&logits).unwrap();
        assert_eq!(t["logits"].dims(), &[40, 4]);
        assert_eq!(meta["method"], "tip-adapter-f");
        // The artifact that made them is recorded (its resolved path), not templates.
        assert_eq!(meta["adapter"], s(&tipf.canonicalize().unwrap()));
        assert!(meta.get("templates").is_none() && meta.get("head_variant").is_none());

        // A different model is an error naming --model.
        synth::write_checkpoint(&ws.p("other"), &synth::tiny_config(), 1).unwrap();
        ws.cmd()
            .args(["eval", "--adapter", s(&tipc), "--model", s(&ws.p("other"))])
            .args(["--data", s(&data)])
            .assert()
            .failure()
            .stderr(
                contains("--model").and(contains("weights or config.json settings are not those")),
            );
        // A moved model is still the model (its weights are), once --model says where it went.
        std::fs::rename(&model, ws.p("moved")).unwrap();
        ws.cmd()
            .args(["eval", "--adapter", s(&tipc), "--data", s(&data)])
            .assert()
            .failure()
            .stderr(contains("no longer there").and(contains("--model")));
        let moved = ws.json(&[
            "eval",
            "--adapter",
            s(&tipc),
            "--model",
            s(&ws.p("moved")),
            "--data",
            s(&data),
        ]);
        assert_eq!(moved["top1"], tip["top1"]);
        // Tip-F trained with the moved model records where it is now.
        let tipf2 = ws.p("tipf2.safetensors");
        ws.cmd()
            .args(["tip", "train", "--cache", s(&tipc), "--data", s(&data)])
            .args([
                "--model",
                s(&ws.p("moved")),
                "--epochs",
                "2",
                "--out",
                s(&tipf2),
            ])
            .assert()
            .success();
        ws.cmd()
            .args(["eval", "--adapter", s(&tipf2), "--data", s(&data)])
            .assert()
            .success();
        // Another checkpoint of the same shape written where the model was is not it.
        synth::write_checkpoint(&model, &synth::tiny_config(), 7).unwrap();
        ws.cmd()
            .args(["eval", "--adapter", s(&tipc), "--data", s(&data)])
            .assert()
            .failure()
            .stderr(contains("weights or config.json settings are not those"));
        std::fs::remove_dir_all(&model).unwrap();
        std::fs::rename(ws.p("moved"), &model).unwrap();
        // A re-saved copy is the same model: tensors in another order with header metadata,
        // config.json reformatted with a key clipft does not read.
        let weights = model.join("model.safetensors");
        let config = model.join("config.json");
        let (weights_bytes, config_bytes) = (
            std::fs::read(&weights).unwrap(),
            std::fs::read(&config).unwrap(),
        );
        let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        names.reverse();
        let views: Vec<(&str, &candle_core::Tensor)> =
            names.iter().map(|n| (n.as_str(), &tensors[*n])).collect();
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        std::fs::write(&weights, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
        assert_ne!(std::fs::read(&weights).unwrap(), weights_bytes);
        let mut cfg: Value = serde_json::from_slice(&config_bytes).unwrap();
        cfg["transformers_version"] = "9.9.9".into();
        std::fs::write(&config, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
        ws.cmd()
            .args(["eval", "--adapter", s(&tipc), "--data", s(&data)])
            .assert()
            .success();
        std::fs::write(&weights, &weights_bytes).unwrap();
        std::fs::write(&config, &config_bytes).unwrap();
        // An artifact with the byte-for-byte digest of earlier versions is still recognised.
        let (t, mut m) = clipft::io::load(&tipc).unwrap();
        let files = clipft::model::hub::resolve(s(&model), None, false).unwrap();
        m["model_digest"] = clipft::model::load::weights_digest(&files).unwrap().into();
        let old = ws.p("old-digest.safetensors");
        let refs: Vec<(&str, &candle_core::Tensor)> =
            t.iter().map(|(n, x)| (n.as_str(), x)).collect();
        clipft::io::save(&old, &refs, &m).unwrap();
        ws.cmd()
            .args(["eval", "--adapter", s(&old), "--data", s(&data)])
            .assert()
            .success();
        // The same weights behind other preprocessing give other features than the cache's.
        let pre = model.join("preprocessor_config.json");
        let pre_bytes = std::fs::read(&pre).unwrap();
        let mut edited: serde_json::Value = serde_json::from_slice(&pre_bytes).unwrap();
        edited["resample"] = 2.into();
        std::fs::write(&pre, edited.to_string()).unwrap();
        ws.cmd()
            .args(["eval", "--adapter", s(&tipc), "--data", s(&data)])
            .assert()
            .failure()
            .stderr(contains("image preprocessing").and(contains("(then bicubic; now bilinear)")));
        edited["image_mean"] = serde_json::json!([0.5, 0.5, 0.5]);
        std::fs::write(&pre, edited.to_string()).unwrap();
        ws.cmd()
            .args(["eval", "--adapter", s(&tipc), "--data", s(&data)])
            .assert()
            .failure()
            .stderr(
                contains("(then bicubic, mean [0.48145467, 0.4578275, 0.40821072], std")
                    .and(contains("; now bilinear, mean [0.5, 0.5, 0.5], std")),
            );
        std::fs::write(&pre, &pre_bytes).unwrap();
        // A dataset with other classes is an error naming --data.
        synth::write_dataset(
            &ws.p("data3"),
            3,
            [("train", 4), ("val", 2), ("test", 2)],
            0,
        )
        .unwrap();
        ws.cmd()
            .args(["eval", "--adapter", s(&tipf), "--data", s(&ws.p("data3"))])
            .assert()
            .failure()
            .stderr(contains("--data").and(contains("class folders")));
        // The same model folder with another feature dimension is an error too.
        let mut cfg = synth::tiny_config();
        cfg.projection_dim = 16;
        std::fs::remove_dir_all(&model).unwrap();
        synth::write_checkpoint(&model, &cfg, 0).unwrap();
        ws.cmd()
            .args(["eval", "--adapter", s(&tipc), "--data", s(&data)])
            .assert()
            .failure()
            .stderr(contains("feature dimension 16"));
        // Tip-Adapter never tunes on test: no val split, no cache.
        std::fs::remove_dir_all(ws.p("data3").join("val")).unwrap();
        ws.build_cache(&ws.p("data3"))
            .args(["--out", s(&ws.p("x.safetensors"))])
            .assert()
            .failure()
            .stderr(contains("never tunes on test"));
    }
}

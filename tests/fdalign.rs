//! FD-Align end to end on a generated checkpoint and image set: training, the checkpoint folder
//! it writes, evaluation, resuming, gradient accumulation, and a diverging run.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use clipft::data::{Dataset, Sample, Split};
use clipft::methods::fdalign::{FdAlignSettings, LossScaler};
use clipft::methods::fdalign_train::{self, FdAlignOutcome};
use clipft::model::{Clip, DTypeArg, ModelSpec};
use common::{assert_fails_with, stderr, stdout, Workspace};

fn settings() -> FdAlignSettings {
    FdAlignSettings {
        epochs: 3,
        base_lr: 2e-2,
        spurious_keep: 6,
        spurious_clusters: 3,
        ..FdAlignSettings::default()
    }
}

#[test]
fn train_writes_a_complete_checkpoint_that_evaluates() {
    let ws = Workspace::new();
    let out = ws.path().join("fd");
    // The temporary file of a state write killed by Ctrl-C does not block the folder.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join(".clipft-Ab12.tmp"), b"partial").unwrap();
    let train = || {
        ws.bare("fdalign")
            .args(["train", "--model"])
            .arg(ws.model())
            .arg("--data")
            .arg(ws.data())
            .args([
                "--shots",
                "4",
                "--epochs",
                "2",
                "--lr",
                "0.02",
                "--templates",
                "ensemble7",
                "--spurious-keep",
                "6",
                "--spurious-clusters",
                "3",
                "--out",
            ])
            .arg(&out)
            .arg("--quiet")
            .output()
            .unwrap()
    };
    // A folder another run is writing (its lock held, here by this test) is refused, and that
    // run's temporary files are left alone.
    let lock = std::fs::File::create(out.join(".clipft-lock")).unwrap();
    lock.try_lock().unwrap();
    assert_fails_with(&train(), "another clipft run is writing this folder");
    assert!(out.join(".clipft-Ab12.tmp").exists());
    drop(lock);
    let o = train();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!out.join(".clipft-Ab12.tmp").exists());
    assert!(!out.join(".clipft-lock").exists());
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "fdalign_head.safetensors",
        "manifest.json",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    // The vision tower changed, the text tower did not.
    let before =
        candle_core::safetensors::load(ws.model().join("model.safetensors"), &Device::Cpu).unwrap();
    let after =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let diff = |n: &str| common::max_abs_diff(&before[n], &after[n]);
    assert!(diff("vision_model.encoder.layers.0.mlp.fc1.weight") > 0.0);
    assert!(diff("visual_projection.weight") > 0.0);
    assert_eq!(diff("text_model.encoder.layers.0.mlp.fc1.weight"), 0.0);
    assert_eq!(diff("text_projection.weight"), 0.0);
    // Every tensor of the source is there (`logit_scale` too: `transformers` would otherwise
    // initialise it), and nothing else.
    let names = |m: &HashMap<String, Tensor>| {
        let mut v: Vec<String> = m.keys().cloned().collect();
        v.sort();
        v
    };
    assert_eq!(names(&before), names(&after));
    assert_eq!(diff("logit_scale"), 0.0);
    // `--model DIR` works for the other commands, and `eval --adapter DIR` uses the head.
    let o = ws.bare("info").arg("--model").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let o = ws
        .eval_adapter(&out, &ws.data())
        .arg("--json")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(report["n"], 12);
    assert_eq!(report["method"], "fd-align");
    let eval = || ws.eval_adapter(&out, &ws.data()).output().unwrap();
    // The head belongs to the folder's weights and preprocessing: replaced weights (here the
    // source's own) or an edited preprocessor_config.json are refused.
    let weights = out.join("model.safetensors");
    let tuned = std::fs::read(&weights).unwrap();
    std::fs::copy(ws.model().join("model.safetensors"), &weights).unwrap();
    assert_fails_with(&eval(), "weights or config.json settings are not those");
    std::fs::write(&weights, &tuned).unwrap();
    let pre = out.join("preprocessor_config.json");
    let pre_bytes = std::fs::read(&pre).unwrap();
    let mut edited: serde_json::Value = serde_json::from_slice(&pre_bytes).unwrap();
    edited["resample"] = 2.into();
    std::fs::write(&pre, edited.to_string()).unwrap();
    assert_fails_with(
        &eval(),
        "preprocessing (preprocessor_config.json) is not the one",
    );
    std::fs::write(&pre, &pre_bytes).unwrap();
    // A head of the wrong shape is refused naming its file.
    let head = out.join("fdalign_head.safetensors");
    let head_bytes = std::fs::read(&head).unwrap();
    // The folder's files are inputs: logits are not saved over them.
    let o = ws
        .eval_adapter(&out, &ws.data())
        .arg("--save-logits")
        .arg(&head)
        .output()
        .unwrap();
    assert_fails_with(&o, "a file of the --adapter folder");
    assert_eq!(std::fs::read(&head).unwrap(), head_bytes);
    let (mut t, meta) = clipft::io::load(&head).unwrap();
    let w = t["weight"].narrow(1, 0, 3).unwrap();
    t.insert("weight".into(), w);
    let refs: Vec<(&str, &Tensor)> = t.iter().map(|(n, x)| (n.as_str(), x)).collect();
    clipft::io::save(&head, &refs, &meta).unwrap();
    assert_fails_with(&eval(), "fdalign_head.safetensors: a head of");
    std::fs::write(&head, &head_bytes).unwrap();
    assert!(eval().status.success());
    // Training again into the output replaces it (every file it holds is the run's own),
    // unless the folder also holds other files (logits saved there, say): those would stay
    // beside a model they were not made with.
    std::fs::write(out.join("extra.safetensors"), b"logits").unwrap();
    assert_fails_with(
        &train(),
        "holds extra.safetensors, not files of the FD-Align output",
    );
    assert_eq!(std::fs::read(&head).unwrap(), head_bytes);
    std::fs::remove_file(out.join("extra.safetensors")).unwrap();
    let o = train();
    assert!(o.status.success(), "{}", stderr(&o));
    // A dataset with other classes is refused.
    std::fs::write(
        ws.data().join("classnames.txt"),
        "red_vertical_stripes\tcrimson\n",
    )
    .unwrap();
    // The message names the class whose name differs.
    assert_fails_with(&eval(), "`red_vertical_stripes` reads `crimson` here");
}

/// The generated workspace loaded for library-level training runs.
struct Fixture {
    ws: Workspace,
    clip: Clip,
    dataset: Dataset,
    train: Vec<Sample>,
    val: Vec<Sample>,
    templates: Vec<String>,
}

impl Fixture {
    fn new() -> Self {
        Self::with_dtype(DTypeArg::F32)
    }

    fn with_dtype(dtype: DTypeArg) -> Self {
        let ws = Workspace::new();
        let mut spec = ModelSpec::local(ws.model());
        spec.dtype = dtype;
        let clip = Clip::load(&spec).unwrap();
        let dataset = Dataset::open(ws.data()).unwrap();
        Self {
            train: dataset.samples(Split::Train).unwrap(),
            val: dataset.samples(Split::Val).unwrap(),
            templates: clipft::templates::resolve("ensemble7").unwrap(),
            ws,
            clip,
            dataset,
        }
    }

    fn train(
        &self,
        s: &FdAlignSettings,
        out: &std::path::Path,
        resume: bool,
        stop: Option<usize>,
    ) -> anyhow::Result<(HashMap<String, Tensor>, FdAlignOutcome)> {
        self.train_on(&self.clip, &self.train, s, out, resume, stop)
    }

    /// [`Self::train`] with another loaded model or other training images.
    fn train_on(
        &self,
        clip: &Clip,
        train: &[Sample],
        s: &FdAlignSettings,
        out: &std::path::Path,
        resume: bool,
        stop: Option<usize>,
    ) -> anyhow::Result<(HashMap<String, Tensor>, FdAlignOutcome)> {
        fdalign_train::train(
            clip,
            &self.dataset.class_names(),
            &self.templates,
            train,
            &self.val,
            s,
            out,
            resume,
            false,
            stop,
        )
    }
}

#[test]
fn an_interrupted_run_resumes_to_the_same_result() {
    let fx = Fixture::new();
    let ws = &fx.ws;
    let s = settings();
    let run =
        |out: &std::path::Path, resume: bool, stop: Option<usize>| fx.train(&s, out, resume, stop);
    let (full, full_outcome) = run(&ws.path().join("a"), false, None).unwrap();
    let b = ws.path().join("b");
    let err = run(&b, false, Some(1)).unwrap_err().to_string();
    assert!(err.contains("stopped after 1 epoch"), "{err}");
    // The same images spelled another way (`--data ./d`) are the same run.
    let respelled: Vec<Sample> = fx
        .train
        .iter()
        .map(|x| Sample {
            path: x
                .path
                .parent()
                .unwrap()
                .join(".")
                .join(x.path.file_name().unwrap()),
            ..x.clone()
        })
        .collect();
    let (resumed, resumed_outcome) = fx
        .train_on(&fx.clip, &respelled, &s, &b, true, None)
        .unwrap();
    assert_eq!(full_outcome.val_accs, resumed_outcome.val_accs);
    assert_eq!(full_outcome.best_epoch, resumed_outcome.best_epoch);
    // --spurious-clusters 3 of the 6 kept (of ensemble7's 7) templates.
    assert_eq!(full_outcome.prototypes, 3);
    assert_eq!(resumed_outcome.prototypes, 3);
    for (name, t) in &full {
        let d = (t - &resumed[name])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(d < 1e-6, "{name}: {d}");
    }
    // Different settings cannot resume this state.
    let other = FdAlignSettings {
        beta: 1.0,
        ..settings()
    };
    let err = fx.train(&other, &b, true, None).unwrap_err().to_string();
    assert!(err.contains("other settings"), "{err}");
    // Nor can the same settings on other training images (another --shots, --seed or --data).
    let err = fx
        .train_on(&fx.clip, &fx.train[1..], &s, &b, true, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("another run"), "{err}");
    // A damaged state is refused, naming what is wrong, rather than resumed from.
    let state = b.join(fdalign_train::STATE_FILE);
    let (tensors, meta) = clipft::io::load(&state).unwrap();
    let name = |prefix: &str| {
        tensors
            .keys()
            .find(|k| k.starts_with(prefix))
            .unwrap()
            .clone()
    };
    let damage = |edit: &dyn Fn(&mut HashMap<String, Tensor>, &mut serde_json::Value)| {
        let (mut t, mut m) = (tensors.clone(), meta.clone());
        edit(&mut t, &mut m);
        let refs: Vec<(&str, &Tensor)> = t.iter().map(|(n, x)| (n.as_str(), x)).collect();
        clipft::io::save(&state, &refs, &m).unwrap();
        format!("{:#}", fx.train(&s, &b, true, None).unwrap_err())
    };
    let momentum = name("momentum.");
    let e = damage(&|t, _| {
        t.remove(&momentum);
    });
    assert!(e.contains(&format!("no tensor `{momentum}`")), "{e}");
    let best = name("best.");
    let e = damage(&|t, _| {
        let x = t[&best].flatten_all().unwrap().narrow(0, 0, 1).unwrap();
        t.insert(best.clone(), x);
    });
    assert!(e.contains(&best) && e.contains("has shape"), "{e}");
    let e = damage(&|_, m| m["epoch_done"] = 99.into());
    assert!(e.contains("`epoch_done`") && e.contains("damaged"), "{e}");
    let e = damage(&|_, m| m["losses"] = serde_json::json!([1.0]));
    assert!(e.contains("`losses`"), "{e}");
    let e = damage(&|_, m| m["best_epoch"] = serde_json::Value::Null);
    assert!(e.contains("`best_epoch`"), "{e}");
    let e = damage(&|_, m| m["kind"] = "tip".into());
    assert!(e.contains("not an FD-Align training state"), "{e}");
    // A loss scale an f32 run does not take (it would scale the loss and never unscale it).
    let e = damage(&|_, m| m["loss_scaler"]["scale"] = 0.0.into());
    assert!(e.contains("`loss_scaler`"), "{e}");
}

#[test]
fn a_diverging_run_stops_with_a_clear_message_and_writes_no_model() {
    let ws = Workspace::new();
    let out = ws.path().join("new/a/fd");
    let o = ws
        .bare("fdalign")
        .args(["train", "--model"])
        .arg(ws.model())
        .arg("--data")
        .arg(ws.data())
        .args([
            "--shots",
            "4",
            "--epochs",
            "3",
            "--lr",
            "1e30",
            // Several steps per epoch: the step after the first sees the blown-up weights.
            "--batch-size",
            "4",
            "--templates",
            "ensemble7",
            "--spurious-keep",
            "6",
            "--spurious-clusters",
            "3",
            "--quiet",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert_fails_with(&o, "the loss became");
    // Failed in the first epoch, before any state was saved: the folders it made are gone.
    assert!(!ws.path().join("new").exists());
}

/// A source without `preprocessor_config.json` gives an output whose file is in the
/// `CLIPImageProcessor` format, with the defaults the source ran with.
#[test]
fn a_source_without_preprocessor_config_gives_a_loadable_output() {
    let ws = Workspace::new();
    let model = ws.path().join("bare-model");
    common::copy_dir(&ws.model(), &model);
    std::fs::remove_file(model.join("preprocessor_config.json")).unwrap();
    let out = ws.path().join("fd");
    let o = ws
        .bare("fdalign")
        .args(["train", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(ws.data())
        .args(["--shots", "2", "--epochs", "1", "--quiet", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(out.join("preprocessor_config.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["image_processor_type"], "CLIPImageProcessor");
    assert_eq!(json["resample"], 3);
    let clip = Clip::load(&clipft::model::ModelSpec::local(&out)).unwrap();
    let size = clip.config().vision_config.image_size as u32;
    assert_eq!(
        clip.preprocess,
        clipft::preprocess::PreprocessConfig::openai(size)
    );
}

/// The last step of a run can diverge after the last loss was checked: the val check after the
/// epoch stops it before the broken weights become the best state or are written.
#[test]
fn a_run_whose_last_step_diverges_writes_no_model() {
    let fx = Fixture::new();
    let out = fx.ws.path().join("fd");
    let s = FdAlignSettings {
        epochs: 1,
        base_lr: 1e30,
        ..settings()
    };
    let err = format!("{:#}", fx.train(&s, &out, false, None).unwrap_err());
    assert!(
        err.contains("diverged in epoch 1") && err.contains("not finite"),
        "{err}"
    );
    assert!(!out.join("model.safetensors").exists());
}

/// Flags that would train nothing or silently misbehave are refused, naming the flag.
#[test]
fn bad_settings_are_refused() {
    let fx = Fixture::new();
    let out = fx.ws.path().join("fd");
    for (s, flag) in [
        (
            FdAlignSettings {
                base_lr: f64::NAN,
                ..settings()
            },
            "--lr",
        ),
        (
            FdAlignSettings {
                base_lr: -1.0,
                ..settings()
            },
            "--lr",
        ),
        (
            FdAlignSettings {
                beta: -5.0,
                ..settings()
            },
            "--beta",
        ),
        (
            FdAlignSettings {
                batch_size: Some(0),
                ..settings()
            },
            "--batch-size",
        ),
        (
            FdAlignSettings {
                spurious_keep: 0,
                ..settings()
            },
            "--spurious-keep",
        ),
        (
            FdAlignSettings {
                epochs: 0,
                ..settings()
            },
            "--epochs",
        ),
    ] {
        let err = fx.train(&s, &out, false, None).unwrap_err().to_string();
        assert!(err.contains(flag), "{flag}: {err}");
    }
    // One template makes one prototype, whose softmax is 1 whatever the features: the KL term
    // would be 0 and β ignored. Refused unless β = 0.
    let one = clipft::templates::resolve("clip").unwrap();
    assert_eq!(one.len(), 1);
    let run = |beta: f64| {
        fdalign_train::train(
            &fx.clip,
            &fx.dataset.class_names(),
            &one,
            &fx.train,
            &fx.val,
            &FdAlignSettings {
                epochs: 1,
                beta,
                ..settings()
            },
            &out,
            false,
            false,
            None,
        )
    };
    let err = run(20.0).unwrap_err().to_string();
    assert!(err.contains("at least 2 prototypes"), "{err}");
    run(0.0).unwrap();
}

#[test]
fn accumulated_micro_batches_make_the_same_steps_as_whole_batches() {
    let fx = Fixture::new();
    let initial =
        candle_core::safetensors::load(fx.ws.model().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    // 18 images in steps of 8, 8 and 2; with 3 micro-batches per step: 3 + 3 + 2, 3 + 3 + 2, 2.
    let run = |accum_steps: usize, dir: &str| {
        let s = FdAlignSettings {
            epochs: 1,
            base_lr: 0.5,
            batch_size: Some(8),
            accum_steps,
            ..settings()
        };
        fx.train(&s, &fx.ws.path().join(dir), false, None)
            .unwrap()
            .0
    };
    let whole = run(1, "whole");
    let micro = run(3, "micro");
    for name in [
        "visual_projection.weight",
        "vision_model.encoder.layers.0.mlp.fc1.weight",
    ] {
        let moved = common::max_abs_diff(&whole[name], &initial[name]);
        let apart = common::max_abs_diff(&whole[name], &micro[name]);
        assert!(moved > 1e-4, "{name} moved by {moved}");
        // Summation order only (an optimiser step per micro-batch lands further from the
        // whole-batch result than the whole run moved).
        assert!(apart < 1e-3 * moved, "{name}: {apart} apart, moved {moved}");
    }
}

/// `--dtype f16` trains in mixed precision: f32 weights, the trainable tower in f16, the loss
/// scaled against f16 underflow. The scaler is part of the state, so an interrupted run resumes
/// to the same result, and what is written is f32.
#[test]
fn a_mixed_precision_run_trains_f32_weights_and_resumes_to_the_same_result() {
    let fx = Fixture::with_dtype(DTypeArg::F16);
    // Steps of 4 images: the first steps overflow at the initial scale and are skipped (as with
    // PyTorch's GradScaler), the later ones train.
    let s = FdAlignSettings {
        epochs: 2,
        batch_size: Some(4),
        ..settings()
    };
    let a = fx.ws.path().join("a");
    let (full, full_outcome) = fx.train(&s, &a, false, None).unwrap();
    // Both happened: steps skipped (the scale came down from its start) and steps taken.
    let (_, meta) = clipft::io::load(&a.join(fdalign_train::STATE_FILE)).unwrap();
    let scaler = &meta["loss_scaler"];
    assert_eq!(scaler["dynamic"], true, "{meta}");
    assert!(
        scaler["scale"].as_f64().unwrap() < LossScaler::INITIAL,
        "{scaler}"
    );
    assert!(scaler["good_steps"].as_u64().unwrap() > 0, "{scaler}");
    let halvings = (LossScaler::INITIAL / scaler["scale"].as_f64().unwrap()).log2() as usize;
    assert_eq!(full_outcome.skipped_steps, halvings);
    let initial =
        candle_core::safetensors::load(fx.ws.model().join("model.safetensors"), &Device::Cpu)
            .unwrap();
    for (name, t) in &full {
        assert_eq!(t.dtype(), DType::F32, "{name}");
    }
    let name = "vision_model.encoder.layers.0.mlp.fc1.weight";
    assert!(common::max_abs_diff(&full[name], &initial[name]) > 1e-4);
    // Interrupted after one epoch and resumed: the same result.
    let b = fx.ws.path().join("b");
    let err = fx.train(&s, &b, false, Some(1)).unwrap_err().to_string();
    assert!(err.contains("stopped after 1 epoch"), "{err}");
    // Not in f32: the same model and images at another --dtype are another run.
    let f32_clip = Clip::load(&ModelSpec::local(fx.ws.model())).unwrap();
    let err = fx
        .train_on(&f32_clip, &fx.train, &s, &b, true, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("another run") && err.contains("--dtype"),
        "{err}"
    );
    let (resumed, resumed_outcome) = fx.train(&s, &b, true, None).unwrap();
    assert_eq!(full_outcome.val_accs, resumed_outcome.val_accs);
    for (n, t) in &full {
        let d = common::max_abs_diff(t, &resumed[n]);
        assert!(d < 1e-6, "{n}: {d}");
    }
}

/// An interrupt before the first epoch's state is written says no `--resume` hint (there is
/// nothing to resume) and takes back the `--out` folders the run made; once a state exists it
/// says the hint and keeps the folder.
#[cfg(target_os = "linux")]
#[test]
fn an_interrupt_before_any_state_leaves_no_folder_and_no_resume_hint() {
    let ws = Workspace::new();
    let out = ws.path().join("a/fd");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_clipft"));
    cmd.args(["--threads", "1", "fdalign", "train", "--model"])
        .arg(ws.model())
        .arg("--data")
        .arg(ws.data())
        .args(["--shots", "4", "--epochs", "50", "--spurious-keep", "6"])
        .args(["--spurious-clusters", "3", "--out"])
        .arg(&out);
    let at_start = |line: &str| line.starts_with("FD-Align:");
    let (status, _, rest) = common::signal_on_line(cmd, at_start, libc::SIGTERM);
    assert_eq!(status.code(), Some(143), "{rest}");
    let hinted = rest.contains("--resume continues");
    if out.join(fdalign_train::STATE_FILE).exists() {
        // (The first epoch finished before the signal came.)
        assert!(hinted, "{rest}");
        assert!(!out.join(".clipft-lock").exists());
    } else {
        assert!(!hinted, "{rest}");
        assert!(!ws.path().join("a").exists(), "{rest}");
    }
}

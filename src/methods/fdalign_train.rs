//! FD-Align training on a dataset folder, and its output: a complete CLIP checkpoint in the
//! Hugging Face layout (fine-tuned vision tower, original text tower) plus the class head.
//!
//! State is checkpointed atomically after every epoch (`DIR/fdalign-state.safetensors`), so an
//! interrupted run resumes (`resume = true`) from the last finished epoch to the same result:
//! the shuffles and augmentations are seeded per (seed, epoch, image) and the SGD momentum is
//! part of the state. A non-finite loss, or non-finite val logits after an epoch, stop the run
//! before a broken model can be written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::fdalign::{self, FdAlignSettings, Sgd};
use crate::data::Sample;
use crate::features::{image_batches, image_batches_of, text_features, ExtractOptions};
use crate::model::clip::ClipVisionTransformer;
use crate::model::trainable::TrainableVision;
use crate::model::Clip;
use crate::preprocess::{ImageError, View};
use crate::templates;

pub const STATE_FILE: &str = "fdalign-state.safetensors";
pub const HEAD_FILE: &str = "fdalign_head.safetensors";

/// What a finished run reports.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FdAlignOutcome {
    pub val_accs: Vec<f64>,
    pub losses: Vec<f64>,
    pub best_epoch: usize,
    pub best_val: f64,
    /// Optimiser steps skipped by f16 loss scaling (their gradients overflowed).
    #[serde(default)]
    pub skipped_steps: usize,
    /// Spurious prototypes the KL term used: --spurious-clusters, or fewer when the templates
    /// (or --spurious-keep) are fewer.
    #[serde(default)]
    pub prototypes: usize,
}

/// How training and validation images are read: the extraction pipeline's, decoding the next
/// batches on a pool of their own while the model works on this one; by default every image is
/// required, nothing is cached and no progress bar is drawn.
fn read_options() -> ExtractOptions {
    ExtractOptions {
        batch_size: VAL_BATCH,
        ..ExtractOptions::default()
    }
}

/// Images per batch when measuring val accuracy.
const VAL_BATCH: usize = 64;

/// The first read error of a batch, if any: FD-Align needs every image it was given.
fn first_error(errors: Vec<Option<ImageError>>) -> Result<()> {
    match errors.into_iter().flatten().next() {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Val top-1 (percent) of the current tower and head on centre crops; `None` when the logits
/// are not finite (a diverged run).
fn val_accuracy(
    clip: &Clip,
    tower: &ClipVisionTransformer,
    head_w: &Tensor,
    head_b: &Tensor,
    val: &[Sample],
) -> Result<Option<f64>> {
    let paths: Vec<&Path> = val.iter().map(|s| s.path.as_path()).collect();
    let mut hits = 0usize;
    let mut first = 0;
    let mut finite = true;
    image_batches(clip, &paths, &View::Center, &read_options(), |x, errors| {
        let n = errors.len();
        first_error(errors)?;
        let x = x.expect("a batch without errors has images");
        let f = tower.forward(&x)?.to_dtype(DType::F32)?;
        let logits = fdalign::normalized_linear(&f, head_w, Some(head_b))?;
        finite &= logits
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|x| x.is_finite());
        let pred = logits.argmax(1)?.to_vec1::<u32>()?;
        hits += pred
            .iter()
            .zip(&val[first..first + n])
            .filter(|(p, s)| **p as usize == s.label)
            .count();
        first += n;
        Ok(())
    })?;
    Ok(finite.then(|| 100.0 * hits as f64 / val.len().max(1) as f64))
}

/// Raw text features `[T, C, D]` of every (template, class) prompt.
pub fn template_class_features(
    clip: &Clip,
    class_names: &[String],
    template_set: &[String],
) -> Result<Tensor> {
    let prompts: Vec<String> = template_set
        .iter()
        .flat_map(|t| class_names.iter().map(move |c| templates::fill(t, c)))
        .collect();
    let d = clip.config().projection_dim;
    Ok(
        text_features(clip, &prompts, crate::features::TEXT_BATCH)?.reshape((
            template_set.len(),
            class_names.len(),
            d,
        ))?,
    )
}

/// One micro-batch of a training step.
struct Part<'a> {
    step: usize,
    step_len: usize,
    /// Indices into the training set.
    images: &'a [usize],
    ends_step: bool,
}

struct State {
    epoch_done: usize,
    losses: Vec<f64>,
    val_accs: Vec<f64>,
    best: Option<(usize, f64, HashMap<String, Tensor>)>,
    scaler: fdalign::LossScaler,
}

/// What to do after a diverged run. (Not `--resume`: a state only resumes with the settings it
/// was written with, `--lr` included.)
fn restart_hint(epochs_done: usize, state_path: &Path) -> String {
    if epochs_done == 0 {
        "No epoch finished and no model was written; lower --lr and train again".to_string()
    } else {
        format!(
            "No model was written ({} holds the state after epoch {epochs_done}); lower --lr and \
             train again",
            state_path.display()
        )
    }
}

fn snapshot(vars: &[(String, Var)]) -> Result<HashMap<String, Tensor>> {
    vars.iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
        .collect()
}

/// Trains FD-Align; returns the best-val tensors by name (vision tower, projection, `head.weight`,
/// `head.bias`) and the outcome. `out` receives the per-epoch state checkpoint. `stop_after`
/// ends the call with an error after that many epochs, as an interruption would (for tests and
/// time-sliced runs); `resume` continues from the state.
#[allow(clippy::too_many_arguments)]
pub fn train(
    clip: &Clip,
    class_names: &[String],
    template_set: &[String],
    train_set: &[Sample],
    val: &[Sample],
    settings: &FdAlignSettings,
    out: &Path,
    resume: bool,
    progress: bool,
    stop_after: Option<usize>,
) -> Result<(HashMap<String, Tensor>, FdAlignOutcome)> {
    ensure!(!train_set.is_empty(), "no training images");
    ensure!(!val.is_empty(), "FD-Align picks its epoch on val: the dataset needs a non-empty val split (clipft never tunes on test)");
    settings.validate()?;
    // Weights, gradients, optimiser state and loss in f32; the trainable tower computes in the
    // model's dtype (f16/bf16: mixed precision, as under `torch.autocast`).
    let compute = clip.dtype;
    let tv = TrainableVision::from_files(&clip.files, clip.config(), &clip.device, DType::F32)?;
    let text = template_class_features(clip, class_names, template_set)?;
    let prototypes = fdalign::select_prototypes(
        &fdalign::context_weights(&text, clip.logit_scale)?,
        settings.spurious_keep.min(template_set.len()),
        settings
            .spurious_clusters
            .min(settings.spurious_keep.min(template_set.len())),
        settings.seed,
    )?
    .to_dtype(DType::F32)?
    .to_device(&clip.device)?;
    // A softmax over one prototype is 1 whatever the features: the KL term would vanish and
    // β would silently do nothing.
    let n_proto = prototypes.dim(0)?;
    ensure!(
        n_proto >= 2 || settings.beta == 0.0,
        "the spurious-feature term needs at least 2 prototypes, but {} template(s) with \
         --spurious-keep {} and --spurious-clusters {} give {n_proto}: {}, or --beta 0 to train \
         without the term",
        template_set.len(),
        settings.spurious_keep,
        settings.spurious_clusters,
        if template_set.len() < 2 {
            "use a template set with more templates (e.g. --templates imagenet80)"
        } else {
            "raise --spurious-keep / --spurious-clusters to 2 or more (--spurious-clusters 0: \
             every template is a prototype)"
        }
    );
    crate::cli::info(
        format!(
            "spurious prototypes: {n_proto}, from the {} of {} templates kept",
            settings.spurious_keep.min(template_set.len()),
            template_set.len()
        ),
        !progress,
    );
    let head_w = Var::from_tensor(
        &fdalign::class_head_init(&text, clip.logit_scale)?
            .to_dtype(DType::F32)?
            .to_device(&clip.device)?,
    )?;
    let head_b = Var::from_tensor(&Tensor::zeros(class_names.len(), DType::F32, &clip.device)?)?;
    let mut vars = tv.vars();
    vars.push(("head.weight".into(), head_w.clone()));
    vars.push(("head.bias".into(), head_b.clone()));

    let batch = settings.batch(train_set.len());
    let micro = batch.div_ceil(settings.accum_steps).max(1);
    let steps_per_epoch = train_set.len().div_ceil(batch);
    let total_steps = steps_per_epoch * settings.epochs;
    let lr = settings.lr(train_set.len());
    let mut opt = Sgd::new(
        vars.iter().map(|(_, v)| v.clone()).collect(),
        lr,
        settings.momentum,
        settings.weight_decay,
    );
    let mut state = State {
        epoch_done: 0,
        losses: Vec::new(),
        val_accs: Vec::new(),
        best: None,
        scaler: fdalign::LossScaler::for_dtype(compute),
    };
    let state_path = out.join(STATE_FILE);
    let (run, legacy_run) = run_key(clip, class_names, template_set, train_set, val)?;
    if resume {
        let runs = [run.as_str(), legacy_run.as_str()];
        state = load_state(&state_path, &vars, &mut opt, settings, &runs, state.scaler)?;
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let pb = crate::progress::bar(settings.epochs as u64, "FD-Align", progress);
    pb.inc(state.epoch_done as u64);
    let first_epoch = state.epoch_done;
    for epoch in first_epoch..settings.epochs {
        let mut order: Vec<usize> = (0..train_set.len()).collect();
        order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(
            settings.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch as u64,
        ));
        let mut loss_sum = 0.0;
        // The epoch's micro-batches in order, each with its step (index, size) and whether it
        // ends the step; the pipeline decodes the next ones while this one trains.
        let mut parts: Vec<Part> = Vec::new();
        for (s, step) in order.chunks(batch).enumerate() {
            let n = step.len().div_ceil(micro);
            parts.extend(step.chunks(micro).enumerate().map(|(j, images)| Part {
                step: s,
                step_len: step.len(),
                images,
                ends_step: j + 1 == n,
            }));
        }
        let paths: Vec<Vec<&Path>> = parts
            .iter()
            .map(|p| {
                p.images
                    .iter()
                    .map(|&i| train_set[i].path.as_path())
                    .collect()
            })
            .collect();
        let batches: Vec<&[&Path]> = paths.iter().map(Vec::as_slice).collect();
        let (scale_min, scale_max) = settings.scale;
        let view = View::Augment {
            seed: settings.seed,
            epoch: epoch as u64,
            scale_min,
            scale_max,
            flip_p: 0.0,
        };
        let mut next = parts.iter();
        let mut grads: Option<candle_core::backprop::GradStore> = None;
        image_batches_of(clip, &batches, &view, &read_options(), |x, errors| {
            let &Part {
                step: s,
                step_len,
                images: part,
                ends_step,
            } = next.next().expect("one call per micro-batch");
            first_error(errors)?;
            let x = x.expect("a batch without errors has images");
            opt.lr = fdalign::cosine_lr(lr, epoch * steps_per_epoch + s, total_steps);
            let y = Tensor::from_vec(
                part.iter()
                    .map(|&i| train_set[i].label as u32)
                    .collect::<Vec<_>>(),
                part.len(),
                &clip.device,
            )?;
            let f0 = clip.model.image_features(&x)?.to_dtype(DType::F32)?;
            let ft = tv.in_dtype(compute)?.forward(&x)?.to_dtype(DType::F32)?;
            let (total, _, _) = fdalign::loss(
                &ft,
                &f0,
                &y,
                head_w.as_tensor(),
                head_b.as_tensor(),
                &prototypes,
                settings.beta,
            )?;
            let value = total.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                bail!(
                    "the loss became {value} at epoch {}, step {}; stopping. {}",
                    epoch + 1,
                    s + 1,
                    restart_hint(epoch, &state_path)
                );
            }
            loss_sum += value * part.len() as f64 / step_len as f64;
            let weight = part.len() as f64 / step_len as f64;
            let g = tv.backward(&(total * (weight * state.scaler.scale))?)?;
            grads = Some(match grads.take() {
                None => g,
                Some(mut acc) => {
                    for (_, v) in &vars {
                        if let (Some(a), Some(b)) =
                            (acc.get(v.as_tensor()).cloned(), g.get(v.as_tensor()))
                        {
                            acc.insert(v.as_tensor(), (a + b)?);
                        }
                    }
                    acc
                }
            });
            if ends_step {
                let mut g = grads.take().expect("at least one micro-batch");
                // An f16 step whose gradients overflowed is skipped (the scale was lowered).
                if state.scaler.unscale(&mut g, opt.vars())? {
                    opt.step(&g)?;
                }
            }
            Ok(())
        })?;
        // The loss is checked before each step; the weights after the last step of the epoch
        // are checked here, through their val logits, before they can become the best state.
        let tower = tv.frozen(compute)?;
        let Some(acc) = val_accuracy(clip, &tower, head_w.as_tensor(), head_b.as_tensor(), val)?
        else {
            bail!(
                "training diverged in epoch {}: the val logits are not finite (NaN or infinite); \
                 stopping. {}",
                epoch + 1,
                restart_hint(epoch, &state_path)
            );
        };
        state.losses.push(loss_sum / steps_per_epoch as f64);
        state.val_accs.push(acc);
        if state.best.as_ref().is_none_or(|(_, b, _)| acc > *b) {
            state.best = Some((epoch, acc, snapshot(&vars)?));
        }
        state.epoch_done = epoch + 1;
        save_state(&state_path, &vars, &opt, &state, settings, &run)?;
        pb.set_message(format!(
            "loss {:.3} val {acc:.1}%",
            state.losses.last().unwrap()
        ));
        pb.inc(1);
        if stop_after.is_some_and(|n| epoch + 1 - first_epoch >= n) && epoch + 1 < settings.epochs {
            bail!(
                "stopped after {} epoch(s) as asked; resume from {}",
                epoch + 1 - first_epoch,
                state_path.display()
            );
        }
    }
    pb.finish_and_clear();
    let (best_epoch, best_val, best) = state.best.expect("at least one epoch");
    Ok((
        best,
        FdAlignOutcome {
            val_accs: state.val_accs,
            losses: state.losses,
            best_epoch,
            best_val,
            skipped_steps: state.scaler.skipped,
            prototypes: n_proto,
        },
    ))
}

/// What a resumed run must share with the interrupted one beyond the settings: the model and
/// its precision (the fingerprint holds `--dtype`, which is also the compute dtype), its image
/// preprocessing and tokenizer, the classes, the templates and the exact train and val images
/// (other --shots, --seed or --data give other images, and the batch size and learning rate
/// follow the train set's size), each image by its resolved path (`--data d` and `--data ./d`
/// are one dataset). Returns the key and, to resume states written before 2026-11-29, the key
/// those had (paths as given; no preprocessing or tokenizer).
fn run_key(
    clip: &Clip,
    class_names: &[String],
    template_set: &[String],
    train_set: &[Sample],
    val: &[Sample],
) -> Result<(String, String)> {
    use sha2::{Digest, Sha256};
    let images = |s: &[Sample], resolve: bool| -> Vec<(String, usize)> {
        s.iter()
            .map(|s| {
                let p = match resolve {
                    true => s.path.canonicalize().unwrap_or_else(|_| s.path.clone()),
                    false => s.path.clone(),
                };
                (p.to_string_lossy().into_owned(), s.label)
            })
            .collect()
    };
    let hex = |v: &serde_json::Value| -> Result<String> {
        let digest = Sha256::digest(serde_json::to_vec(v)?);
        Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
    };
    let tokenizer = crate::model::load::digest_files(&[&clip.files.tokenizer])?;
    let key = serde_json::json!({
        "model": clip.fingerprint,
        "preprocess": clip.preprocess.cache_key(),
        "tokenizer": tokenizer,
        "classes": class_names,
        "templates": template_set,
        "train": images(train_set, true),
        "val": images(val, true),
    });
    let legacy = serde_json::json!({
        "model": clip.fingerprint,
        "classes": class_names,
        "templates": template_set,
        "train": images(train_set, false),
        "val": images(val, false),
    });
    Ok((hex(&key)?, hex(&legacy)?))
}

fn save_state(
    path: &Path,
    vars: &[(String, Var)],
    opt: &Sgd,
    state: &State,
    settings: &FdAlignSettings,
    run: &str,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for ((name, var), buf) in vars.iter().zip(opt.buffers()) {
        tensors.push((format!("current.{name}"), var.as_tensor().clone()));
        if let Some(b) = buf {
            tensors.push((format!("momentum.{name}"), b.clone()));
        }
    }
    if let Some((_, _, best)) = &state.best {
        tensors.extend(best.iter().map(|(n, t)| (format!("best.{n}"), t.clone())));
    }
    let meta = serde_json::json!({
        "kind": "fdalign-state",
        "epoch_done": state.epoch_done,
        "losses": state.losses,
        "val_accs": state.val_accs,
        "best_epoch": state.best.as_ref().map(|b| b.0),
        "best_val": state.best.as_ref().map(|b| b.1),
        "settings": settings,
        "run": run,
        "loss_scaler": state.scaler,
    });
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    crate::io::save(path, &refs, &meta)
}

fn load_state(
    path: &Path,
    vars: &[(String, Var)],
    opt: &mut Sgd,
    settings: &FdAlignSettings,
    runs: &[&str],
    scaler: fdalign::LossScaler,
) -> Result<State> {
    ensure!(
        path.is_file(),
        "--resume: no {} to resume from",
        path.display()
    );
    let (mut t, meta) = crate::io::load(path)?;
    let saved: FdAlignSettings = serde_json::from_value(meta["settings"].clone())
        .with_context(|| format!("{}: malformed settings", path.display()))?;
    if saved != *settings {
        // Name what differs, in the settings' own terms (`base_lr` is --lr).
        let (a, b) = (
            serde_json::to_value(&saved)?,
            serde_json::to_value(settings)?,
        );
        let differ: Vec<String> = a
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| b.get(k.as_str()) != Some(v))
            .map(|(k, v)| format!("{k} {v} (now {})", b[k.as_str()]))
            .collect();
        bail!(
            "--resume: {} was written with other settings: {}; rerun with the same flags",
            path.display(),
            differ.join(", ")
        );
    }
    ensure!(
        meta["run"].as_str().is_some_and(|r| runs.contains(&r)),
        "--resume: {} was written for another run (another model or --dtype, classes, \
         --templates, or other train/val images: --data, --shots, --val-shots, --seed); rerun \
         with the same flags, or without --resume to start over",
        path.display()
    );
    ensure!(
        meta["kind"].as_str() == Some("fdalign-state"),
        "--resume: {} is not an FD-Align training state",
        path.display()
    );
    let damaged = |what: &str| {
        anyhow::anyhow!(
            "--resume: {}: {what}; the file is damaged. Train without --resume to start over",
            path.display()
        )
    };
    let epoch_done = meta["epoch_done"]
        .as_u64()
        .map(|e| e as usize)
        .filter(|e| (1..=settings.epochs).contains(e))
        .ok_or_else(|| damaged("`epoch_done` is missing or out of range"))?;
    let list = |key: &str| -> Result<Vec<f64>> {
        serde_json::from_value::<Vec<f64>>(meta[key].clone())
            .ok()
            .filter(|v| v.len() == epoch_done)
            .ok_or_else(|| damaged(&format!("`{key}` is not one number per epoch done")))
    };
    let (losses, val_accs) = (list("losses")?, list("val_accs")?);
    let best_epoch = meta["best_epoch"]
        .as_u64()
        .map(|e| e as usize)
        .filter(|&e| e < epoch_done)
        .ok_or_else(|| damaged("`best_epoch` is missing or out of range"))?;
    let best_val = meta["best_val"]
        .as_f64()
        .filter(|v| *v == val_accs[best_epoch])
        .ok_or_else(|| damaged("`best_val` is not the accuracy of `best_epoch`"))?;
    // `scaler` is a fresh one for the run's dtype: a fixed scale of 1 unless f16.
    let scaler = match meta.get("loss_scaler") {
        // (States written before the scaler existed were f32 runs, which need none.)
        None | Some(serde_json::Value::Null) if !scaler.dynamic => scaler,
        None | Some(serde_json::Value::Null) => return Err(damaged("`loss_scaler` is missing")),
        Some(v) => {
            let saved: fdalign::LossScaler = serde_json::from_value(v.clone())
                .map_err(|_| damaged("`loss_scaler` is malformed"))?;
            let valid = match scaler.dynamic {
                true => saved.dynamic && saved.scale.is_finite() && saved.scale > 0.0,
                false => saved == scaler,
            };
            ensure!(
                valid,
                damaged("`loss_scaler` is not one this run's dtype takes")
            );
            saved
        }
    };
    // A tensor of the state, of its variable's shape and finite, in its dtype and device.
    let tensor = |t: &mut HashMap<String, Tensor>, key: String, var: &Var| -> Result<Tensor> {
        let x = crate::io::take(t, &key, path)
            .map_err(|e| anyhow::anyhow!("--resume: {e}. Train without --resume to start over"))?;
        if x.dims() != var.dims() {
            return Err(damaged(&format!(
                "tensor `{key}` has shape {:?}, its parameter {:?}",
                x.dims(),
                var.dims()
            )));
        }
        Ok(x.to_dtype(var.dtype())?.to_device(var.device())?)
    };
    let mut buffers = Vec::new();
    for (name, var) in vars {
        var.set(&tensor(&mut t, format!("current.{name}"), var)?)?;
        let key = format!("momentum.{name}");
        // Every step that was taken made every buffer; only skipped (overflowed) f16 steps
        // leave them unmade.
        let buffer = if t.contains_key(&key) || scaler.skipped == 0 {
            Some(tensor(&mut t, key, var)?)
        } else {
            None
        };
        buffers.push(buffer);
    }
    opt.set_buffers(buffers);
    let mut best = HashMap::new();
    for (name, var) in vars {
        best.insert(name.clone(), tensor(&mut t, format!("best.{name}"), var)?);
    }
    Ok(State {
        epoch_done,
        losses,
        val_accs,
        best: Some((best_epoch, best_val, best)),
        scaler,
    })
}

/// Writes `out` as a complete CLIP checkpoint: `model.safetensors` with the given vision-tower
/// and projection tensors and every other tensor from the source checkpoint (`logit_scale` and
/// buffers included, so `transformers` loads it whole), its `config.json`, `tokenizer.json` and
/// `preprocessor_config.json`, plus the class head and a manifest. Floating-point tensors are
/// written as f32; integer buffers keep their dtype.
pub fn write_checkpoint(
    clip: &Clip,
    tuned: &HashMap<String, Tensor>,
    out: &Path,
    head_meta: serde_json::Value,
) -> Result<PathBuf> {
    let as_f32 = |t: &Tensor| -> Result<Tensor> {
        let t = t.to_device(&Device::Cpu)?;
        Ok(if t.dtype().is_float() {
            t.to_dtype(DType::F32)?
        } else {
            t
        })
    };
    // The head and manifest mark a finished folder: they go first and come back last, so a run
    // killed while replacing an earlier output leaves an incomplete folder that `eval
    // --adapter` refuses, never old markers beside new weights.
    for marker in [HEAD_FILE, "manifest.json"] {
        let p = out.join(marker);
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in crate::model::load::all_tensors(&clip.files.weights)? {
        let t = match tuned.get(&name) {
            Some(tuned) => as_f32(tuned)?,
            None => as_f32(&t)?,
        };
        tensors.push((name, t));
    }
    // Tuned tensors the source lacked (none for a well-formed checkpoint); the head has a file
    // of its own.
    let mut extra: Vec<&String> = tuned
        .keys()
        .filter(|n| !n.starts_with("head.") && !tensors.iter().any(|(m, _)| m == *n))
        .collect();
    extra.sort();
    for name in extra {
        tensors.push((name.clone(), as_f32(&tuned[name])?));
    }
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)?;
    let weights_path = out.join("model.safetensors");
    // (config.json is the source's, so its parsed settings are `clip`'s.)
    let digest = crate::model::load::safetensors_digest(clip.config(), &[(&bytes, &weights_path)])?;
    crate::io::write_atomic(&weights_path, &bytes)?;
    crate::io::write_atomic(
        &out.join("config.json"),
        &std::fs::read(&clip.files.config)?,
    )?;
    crate::io::write_atomic(
        &out.join("tokenizer.json"),
        &std::fs::read(&clip.files.tokenizer)?,
    )?;
    let pre = match &clip.files.preprocessor {
        Some(p) => std::fs::read(p)?,
        // The defaults the model ran with, in the file format (not clipft's own struct).
        None => serde_json::to_vec_pretty(&clip.preprocess.to_hf_json())?,
    };
    crate::io::write_atomic(&out.join("preprocessor_config.json"), &pre)?;
    // The head belongs to these weights and this preprocessing: `eval --adapter` checks both.
    let mut head_meta = head_meta;
    head_meta["model_digest"] = digest.into();
    head_meta["preprocess"] = serde_json::to_value(&clip.preprocess)?;
    let w = tuned
        .get("head.weight")
        .context("no head weight")?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    let b = tuned
        .get("head.bias")
        .context("no head bias")?
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?;
    let head = out.join(HEAD_FILE);
    crate::io::save(&head, &[("weight", &w), ("bias", &b)], &head_meta)?;
    crate::io::write_atomic(
        &out.join("manifest.json"),
        serde_json::to_string_pretty(&head_meta)?.as_bytes(),
    )?;
    Ok(head)
}

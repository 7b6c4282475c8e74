//! `clipft fdalign train` and `clipft eval --adapter DIR` for FD-Align checkpoints.

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::{Args, Subcommand};

use super::fdalign::{self, FdAlignSettings};
use super::fdalign_train::{self, HEAD_FILE};
use crate::cli::{info, load_model, split_samples, ModelArgs, ShotArgs};
use crate::data::{Dataset, Split};
use crate::model::{Clip, ModelSpec};

/// FD-Align's prompt set (its `openai_imagenet_template`).
const DEFAULT_TEMPLATES: &str = "imagenet80";

#[derive(Args, Debug)]
pub struct FdAlignArgs {
    #[command(subcommand)]
    pub command: FdAlignCommand,
}

#[derive(Subcommand, Debug)]
pub enum FdAlignCommand {
    /// Fine-tune the whole image encoder with FD-Align; writes a complete CLIP checkpoint folder.
    Train(TrainArgs),
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Dataset folder (DIR/{train,val,test}/<class>/<image>); needs train/ and val/.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    #[command(flatten)]
    pub shots: ShotArgs,
    /// Val images per class to tune on: a number, or `all` [default: min(--shots, 4), as the
    /// official code's few-shot val set; every val image without --shots].
    #[arg(long, value_name = "K|all")]
    pub val_shots: Option<crate::cli::ValShots>,
    /// Epochs (the best val epoch is kept).
    #[arg(long, default_value_t = 60, value_name = "N")]
    pub epochs: usize,
    /// Learning rate for a batch of 256; scaled by batch/256.
    #[arg(long, default_value_t = 5e-5, value_name = "LR")]
    pub lr: f64,
    /// Images per optimiser step [default: min(256, train size)].
    #[arg(long, value_name = "N")]
    pub batch_size: Option<usize>,
    /// Split each step into this many micro-batches (gradients summed) to save memory; each
    /// holds at least one image, so values above the batch size act as the batch size.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub accum_steps: usize,
    /// Weight β of the spurious-feature KL term.
    #[arg(long, default_value_t = 20.0)]
    pub beta: f64,
    /// Prompt templates for the class head and the spurious prototypes.
    #[arg(long, default_value = DEFAULT_TEMPLATES, value_name = "NAME|FILE")]
    pub templates: String,
    /// Most typical templates kept by the isolation forest (all of them when the set has
    /// fewer).
    #[arg(long, default_value_t = 60, value_name = "N")]
    pub spurious_keep: usize,
    /// k-means prototypes made from the kept templates (at most one per kept template);
    /// 0 = one prototype per template.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub spurious_clusters: usize,
    /// Continue an interrupted run in --out from its last finished epoch (same flags).
    #[arg(long)]
    pub resume: bool,
    /// Output folder: a complete CLIP checkpoint plus the class head.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(args: FdAlignArgs, quiet: bool) -> Result<()> {
    match args.command {
        FdAlignCommand::Train(a) => train_cmd(a, quiet),
    }
}

fn train_cmd(a: TrainArgs, quiet: bool) -> Result<()> {
    let settings = FdAlignSettings {
        epochs: a.epochs,
        base_lr: a.lr,
        batch_size: a.batch_size,
        accum_steps: a.accum_steps,
        beta: a.beta,
        spurious_keep: a.spurious_keep,
        spurious_clusters: a.spurious_clusters,
        seed: a.shots.seed,
        ..FdAlignSettings::default()
    };
    // Bad flags fail before the dataset is scanned and the model loaded.
    settings.validate()?;
    let made = crate::io::missing_folders(&a.out);
    let lock = check_out_folder(&a.out, a.model.model.as_deref(), "--out")?;
    let dataset = crate::cli::open_dataset(&a.data)?;
    let train = split_samples(&dataset, Split::Train, &a.shots, quiet)?;
    let val = crate::cli::val_samples(&dataset, a.val_shots, &a.shots, quiet)
        .context("FD-Align picks its epoch on val (clipft never tunes on test)")?;
    let template_set = crate::templates::resolve(&a.templates)?;
    let clip = load_model(&a.model, quiet)?;
    // (A hub model's snapshot folder, which the check above could not see.)
    let source = clip
        .files
        .config
        .parent()
        .and_then(|p| p.canonicalize().ok());
    ensure!(
        source.is_none() || source != a.out.canonicalize().ok(),
        "--out {}: that is the source model's folder; give another folder",
        a.out.display()
    );
    let precision = match clip.dtype {
        candle_core::DType::F32 => String::new(),
        // (Mixed precision: see fdalign_train::train.)
        d => format!(", f32 weights computing in {}", d.as_str()),
    };
    info(
        format!(
            "FD-Align: {} train images, batch {}, lr {:.3e}, {} epoch(s){precision}",
            train.len(),
            settings.batch(train.len()),
            settings.lr(train.len()),
            settings.epochs
        ),
        quiet,
    );
    // A run that fails or is interrupted before it wrote anything takes back the folders of
    // --out it made, deepest first, while they are empty (one holding a resume state stays,
    // for --resume).
    crate::interrupt::remove_empty_on_interrupt(&made);
    let lock = match lock {
        Some(lock) => lock,
        None => {
            // Under the interrupt gate: an interrupt waits until the folder and its lock both
            // exist, then removes both.
            let _writing = crate::interrupt::writing();
            crate::io::create_folder(&a.out)?;
            OutLock::take(&a.out)?
        }
    };
    let remove_if_empty = |e: anyhow::Error| {
        lock.release();
        crate::io::remove_empty_folders(&made);
        e
    };
    crate::interrupt::say_on_interrupt(
        "interrupted: the same command with --resume continues from the last finished epoch",
        &a.out.join(fdalign_train::STATE_FILE),
    );
    let (best, outcome) = fdalign_train::train(
        &clip,
        &dataset.class_names(),
        &template_set,
        &train,
        &val,
        &settings,
        &a.out,
        a.resume,
        !quiet,
        None,
    )
    .map_err(remove_if_empty)?;
    let meta = head_meta(
        &clip,
        &dataset,
        &template_set,
        &settings,
        a.shots.shots,
        &val,
        &outcome,
    );
    fdalign_train::write_checkpoint(&clip, &best, &a.out, meta)
        .context(
            "training finished, but its outputs were not all written: once the cause is fixed, \
             the same command with --resume writes them without training again",
        )
        .map_err(remove_if_empty)?;
    if outcome.skipped_steps > 0 {
        info(
            format!(
                "f16 loss scaling skipped {} optimiser step(s) whose gradients overflowed (as \
                 PyTorch's GradScaler does); with few steps, --dtype bf16 skips none",
                outcome.skipped_steps
            ),
            quiet,
        );
    }
    info(
        format!(
            "wrote {} (best val epoch {} of {}: {:.2}%); use it with --model {} or --adapter {}",
            a.out.display(),
            outcome.best_epoch + 1,
            settings.epochs,
            outcome.best_val,
            a.out.display(),
            a.out.display()
        ),
        quiet,
    );
    Ok(())
}

/// What the head file records of a run (beside the digests `write_checkpoint` adds).
fn head_meta(
    clip: &Clip,
    dataset: &Dataset,
    templates: &[String],
    settings: &FdAlignSettings,
    shots: Option<u64>,
    val: &[crate::data::Sample],
    outcome: &fdalign_train::FdAlignOutcome,
) -> serde_json::Value {
    serde_json::json!({
        "kind": "fdalign",
        "source_model": clip.files.id,
        "source_revision": clip.files.revision,
        "class_names": dataset.class_names(),
        "class_folders": dataset.class_folders(),
        "templates": templates,
        "settings": settings,
        "shots": shots,
        "val_n": val.len(),
        "outcome": outcome,
    })
}

/// The FD-Align part of `clipft demo`: fine-tunes the image encoder on every train image into
/// `dir` (epoch picked on val), then scores the tuned model and head on test.
pub fn demo(
    clip: &Clip,
    dataset: &Dataset,
    dir: &Path,
    opts: &crate::features::ExtractOptions,
    quiet: bool,
    out: &mut impl std::io::Write,
) -> Result<crate::eval::EvalReport> {
    // The paper's lr (5e-5 per 256 images) barely moves random weights in a few epochs; the
    // demo's generated classes need a larger step to show the method learning.
    let settings = FdAlignSettings {
        epochs: 10,
        base_lr: 0.64,
        batch_size: Some(8),
        ..FdAlignSettings::default()
    };
    settings.validate()?;
    // (A folder of an earlier demo is replaced; files of the user's in it are refused, as by
    // `fdalign train`.)
    let _lock = check_out_folder(dir, None, "the demo's FD-Align folder")?;
    let train = dataset.samples(Split::Train)?;
    let val = dataset.samples(Split::Val)?;
    let templates = crate::templates::resolve(DEFAULT_TEMPLATES)?;
    writeln!(out)?;
    writeln!(
        out,
        "FD-Align: the image encoder fine-tuned on all {} train images ({} epochs, batch {}, lr \
         {:.3e}: the paper's 5e-5 per 256 images is too small a step for random weights)",
        train.len(),
        settings.epochs,
        settings.batch(train.len()),
        settings.lr(train.len())
    )?;
    info("FD-Align: fine-tuning the image encoder", quiet);
    let (best, outcome) = fdalign_train::train(
        clip,
        &dataset.class_names(),
        &templates,
        &train,
        &val,
        &settings,
        dir,
        false,
        !quiet,
        None,
    )?;
    let meta = head_meta(clip, dataset, &templates, &settings, None, &val, &outcome);
    fdalign_train::write_checkpoint(clip, &best, dir, meta)?;
    writeln!(
        out,
        "  val ({} images): best epoch {} of {}, {:.2}%",
        val.len(),
        outcome.best_epoch + 1,
        settings.epochs,
        outcome.best_val
    )?;
    // Scored as `eval --adapter DIR` scores it.
    let (_, run) = eval_adapter(
        dir,
        &ModelArgs::default(),
        dataset,
        Split::Test,
        opts,
        quiet,
    )?;
    crate::eval::write_table(&run.report, out)?;
    Ok(run.report)
}

/// Marks an FD-Align output folder as being written: a second run into it would remove the
/// first one's temporary files (as a killed run's) and mix their outputs. Released when dropped.
struct OutLock {
    file: std::fs::File,
    path: std::path::PathBuf,
    released: std::cell::Cell<bool>,
}

/// The lock file in `--out` (present only while a run holds it, or after a killed run).
const LOCK_FILE: &str = ".clipft-lock";

/// The files an FD-Align run writes into `--out` (besides [`LOCK_FILE`] and temporaries).
const OUTPUT_FILES: [&str; 7] = [
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "preprocessor_config.json",
    fdalign_train::HEAD_FILE,
    "manifest.json",
    fdalign_train::STATE_FILE,
];

impl OutLock {
    fn take(out: &Path) -> Result<Self> {
        // (Under the interrupt gate: an interrupt waits until the lock is made and registered
        // for removal.)
        let _writing = crate::interrupt::writing();
        let path = out.join(LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("--out {}: creating {LOCK_FILE}", out.display()))?;
        match file.try_lock() {
            Ok(()) => {
                // An interrupt ends the process without running `Drop`.
                crate::interrupt::remove_on_interrupt_file(Some(&path));
                Ok(Self {
                    file,
                    path,
                    released: false.into(),
                })
            }
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "--out {}: another clipft run is writing this folder; wait for it to end, or \
                 give another --out",
                out.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("--out {}: locking {LOCK_FILE}", out.display()))
            }
        }
    }

    /// Ends the run's hold: the file goes (it is no output), then the lock with it. Once: a
    /// second removal could take the file of a run that started since.
    fn release(&self) {
        if !self.released.replace(true) {
            crate::interrupt::remove_on_interrupt_file(None);
            let _ = std::fs::remove_file(&self.path);
            let _ = self.file.unlock();
        }
    }
}

impl Drop for OutLock {
    fn drop(&mut self) {
        self.release();
    }
}

/// `--out` must be a new or empty folder, or an earlier FD-Align output (which is replaced), and
/// never the source model's own folder: the run writes a whole checkpoint there. An existing
/// folder is locked for the run ([`OutLock`]) before a killed run's leftovers are removed.
fn check_out_folder(out: &Path, model: Option<&str>, flag: &str) -> Result<Option<OutLock>> {
    if let Some(m) = model {
        let same = Path::new(m).canonicalize().ok();
        ensure!(
            same.is_none() || same != out.canonicalize().ok(),
            "{flag} {}: that is the source model's folder; FD-Align writes a new checkpoint, \
             give another folder",
            out.display()
        );
    }
    let mut lock = None;
    if out.is_dir() {
        let listing =
            || std::fs::read_dir(out).with_context(|| format!("{flag} {}", out.display()));
        // Left by a killed run: the lock file, and temporary files of a write (Ctrl-C during
        // an epoch's state write). Neither is anybody's output.
        let leftover = |p: &Path| crate::io::is_temporary(p) || p.ends_with(LOCK_FILE);
        let earlier = out.join(fdalign_train::STATE_FILE).is_file()
            || std::fs::read(out.join("manifest.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|m| m["kind"] == "fdalign");
        // Everything else: not clipft's, so not replaced, and not to be left beside a model it
        // was not made with (logits saved there by `eval --save-logits`, say).
        let mut foreign: Vec<String> = listing()?
            .filter_map(|e| e.ok())
            .filter(|e| {
                let p = e.path();
                let ours = leftover(&p) || earlier && OUTPUT_FILES.iter().any(|f| p.ends_with(f));
                !ours
            })
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        foreign.sort();
        if !foreign.is_empty() {
            bail!(
                "{flag} {}: the folder holds {}, not {}; give a new or empty folder{}",
                out.display(),
                crate::cli::first_few(foreign.into_iter(), 5),
                if earlier {
                    "files of the FD-Align output in it (which would be replaced, and these \
                     left beside a model they were not made with)"
                } else {
                    "an FD-Align output"
                },
                if earlier {
                    ", or move those files out"
                } else {
                    ""
                }
            );
        }
        // (The run replaces its own earlier files: not those their owner made read-only.)
        if let Some(ro) = OUTPUT_FILES
            .iter()
            .map(|f| out.join(f))
            .find(|p| p.is_file() && !crate::io::may_write(p))
        {
            bail!(
                "{flag} {}: {} is read-only; make it writable (chmod u+w) or give another folder",
                out.display(),
                ro.display()
            );
        }
        crate::io::check_can_make(out, out, flag)?;
        let held = OutLock::take(out)?;
        for entry in listing()? {
            let path = entry
                .with_context(|| format!("{flag} {}", out.display()))?
                .path();
            if crate::io::is_temporary(&path) {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
        lock = Some(held);
    } else {
        ensure!(
            !out.exists(),
            "{flag} {}: not a folder; FD-Align writes a checkpoint folder",
            out.display()
        );
        // Writable? (Probed in the folder it will be made in, so that a run refused later
        // leaves no empty folder behind.)
        crate::io::check_can_make(out, out, flag)?;
    }
    Ok(lock)
}

/// `clipft eval --adapter DIR` for an FD-Align output folder: its own model and class head.
pub fn eval_adapter(
    dir: &Path,
    model: &ModelArgs,
    dataset: &Dataset,
    split: Split,
    opts: &crate::features::ExtractOptions,
    quiet: bool,
) -> Result<(Clip, crate::eval::EvalRun)> {
    let head_path = dir.join(HEAD_FILE);
    ensure!(
        head_path.is_file(),
        "--adapter {}: not an FD-Align folder (no {HEAD_FILE})",
        dir.display()
    );
    if let Some(m) = &model.model {
        ensure!(
            Path::new(m).canonicalize().ok() == dir.canonicalize().ok(),
            "--model {m}: an FD-Align folder is its own model; leave --model out (or pass --model {})",
            dir.display()
        );
    }
    let (mut t, meta) = crate::io::load(&head_path)?;
    ensure!(
        meta["kind"] == "fdalign",
        "{}: not an FD-Align head (kind {})",
        head_path.display(),
        meta["kind"]
    );
    let w = crate::io::take(&mut t, "weight", &head_path)?.to_dtype(candle_core::DType::F32)?;
    let b = crate::io::take(&mut t, "bias", &head_path)?.to_dtype(candle_core::DType::F32)?;
    let folders: Vec<String> = serde_json::from_value(meta["class_folders"].clone())
        .with_context(|| format!("{}: no class folders", head_path.display()))?;
    let names: Vec<String> =
        serde_json::from_value(meta["class_names"].clone()).unwrap_or_default();
    // (Folders written before 2026-11-29 record neither.)
    let digest = &meta["model_digest"];
    ensure!(
        digest.is_null() || digest.is_string(),
        "{}: malformed `model_digest`",
        head_path.display()
    );
    let preprocess: Option<crate::preprocess::PreprocessConfig> = meta
        .get("preprocess")
        .filter(|p| !p.is_null())
        .map(|p| serde_json::from_value(p.clone()))
        .transpose()
        .with_context(|| format!("{}: malformed `preprocess`", head_path.display()))?;
    let mut spec = ModelSpec::local(dir);
    spec.dtype = model.dtype;
    spec.device = model.device;
    let clip = Clip::load(&spec)?;
    let (c, d) = (folders.len(), clip.config().projection_dim);
    ensure!(
        w.dims() == [c, d] && b.dims() == [c],
        "{}: a head of {c} classes on {d}-dimensional features has weight [{c}, {d}] and bias \
         [{c}], not {:?} and {:?}",
        head_path.display(),
        w.dims(),
        b.dims()
    );
    let id = super::ArtifactIdentity {
        model: &clip.files.id,
        model_digest: digest.as_str(),
        preprocess: preprocess.as_ref(),
        projection_dim: d,
        class_folders: &folders,
        class_names: &names,
    };
    let from = super::ModelFrom::Folder(dir);
    super::check_compatible(&id, &clip, dataset, &head_path, from)?;
    info(
        format!("evaluating the FD-Align model in {}", dir.display()),
        quiet,
    );
    let run = crate::eval::evaluate_split(&clip, dataset, split, opts, "fd-align", |f| {
        fdalign::normalized_linear(f, &w, Some(&b))
    })?;
    Ok((clip, run))
}

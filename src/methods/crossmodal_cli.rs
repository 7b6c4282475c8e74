//! `clipft crossmodal train` and the cross-modal part of `clipft eval --adapter` and `clipft
//! demo`: the command line of [`super::crossmodal`].

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use clap::{Args, Subcommand};

use super::crossmodal::{
    self as cm, Adapter, CrossArtifact, CrossMeta, Head, HeadKind, Hyper, Init, Mat, Modality,
    Rows, TrainSettings,
};
use crate::cli::{info, load_model, split_samples, ExtractArgs, ModelArgs, ShotArgs};
use crate::data::{Dataset, Sample, Split};
use crate::features::{image_features, text_features, ExtractOptions};
use crate::model::Clip;
use crate::preprocess::View;

#[derive(Args, Debug)]
pub struct CrossmodalArgs {
    #[command(subcommand)]
    pub command: CrossmodalCommand,
}

#[derive(Subcommand, Debug)]
pub enum CrossmodalCommand {
    /// Train a linear (or CLIP-Adapter) head on few-shot image features plus class-name text
    /// features.
    Train(TrainArgs),
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageViews {
    /// The centre crop only.
    Center,
    /// The centre crop and the same crop flipped (what the official scripts run with).
    Flip,
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
    /// Prompt templates whose text features are training samples: a built-in set (clip,
    /// ensemble7, imagenet80) or a file with one template per line.
    #[arg(long, default_value = "clip", value_name = "NAME|FILE")]
    pub templates: String,
    /// `cross`: text and image features (the method); `image`: image features only (the
    /// uni-modal linear probe, to see the cross-modal gain).
    #[arg(long, value_enum, default_value_t = Modality::Cross)]
    pub modality: Modality,
    /// Head weight init: `zeroshot` (per-class mean of the raw template text features,
    /// normalised, as the official code does) or `random` [default: zeroshot for cross, random for
    /// image].
    #[arg(long, value_enum)]
    pub init: Option<Init>,
    /// Image training views: the centre crop, or it plus its mirror image.
    #[arg(long, value_enum, default_value_t = ImageViews::Flip)]
    pub image_views: ImageViews,
    /// Head: `linear` (normalise, bias-free linear layer D→C, ×100) or `adapter`, the official
    /// CLIP-Adapter head: the normalised feature x goes through a bias-free MLP D→D/4→D with a
    /// ReLU after each layer, blended as 0.2·mlp(x) + 0.8·x, then the same linear layer ×100. The
    /// MLP starts at PyTorch's nn.Linear default (uniform ±1/√fan_in, seeded by --seed), the
    /// linear layer as --init says; AdamW trains all three layers. Its default sweep is the
    /// official adapter grid: lr {1e-4,1e-5,1e-6,1e-7} × wd {0,1e-3,1e-5} × batch 8.
    /// With --wise-ft the official code's rule applies: only the final linear layer is blended,
    /// the learned MLP is kept.
    #[arg(long, value_enum, default_value_t = HeadKind::Linear)]
    pub head: HeadKind,
    /// Training iterations per setting.
    #[arg(long, default_value_t = 12800, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub iters: u64,
    /// Take --lr/--weight-decay/--batch as given instead of sweeping on val (linear: lr
    /// {1e-3,1e-4} × wd {0,1e-2,1e-4} × batch {8,32}; adapter: see --head).
    #[arg(long)]
    pub no_sweep: bool,
    /// Learning rate with --no-sweep.
    #[arg(long, requires = "no_sweep", default_value_t = 1e-3, value_name = "LR")]
    pub lr: f64,
    /// Weight decay with --no-sweep.
    #[arg(long, requires = "no_sweep", default_value_t = 0.0, value_name = "WD")]
    pub weight_decay: f64,
    /// Training batch size (half text, half image) with --no-sweep.
    #[arg(long, requires = "no_sweep", default_value_t = 32, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub batch: u64,
    /// Also store the WiSE-FT head (1−R)·W + R·normalize(W_zeroshot), R the zero-shot head's
    /// weight as the official get_wiseft's wiseft_ratio [R: 0.5 when the flag is given without
    /// a value]; with --head adapter W is the final linear layer, the adapter is kept.
    #[arg(long, value_name = "R", num_args = 0..=1, default_missing_value = "0.5")]
    pub wise_ft: Option<f64>,
    #[command(flatten)]
    pub extract: ExtractArgs,
    /// Output head (safetensors with JSON metadata).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn run(args: CrossmodalArgs, quiet: bool) -> Result<()> {
    match args.command {
        CrossmodalCommand::Train(a) => train_cmd(a, quiet),
    }
}

/// Options of [`train`], independent of clap.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub templates: Vec<String>,
    pub modality: Modality,
    pub init: Init,
    pub head: HeadKind,
    pub flip: bool,
    pub iters: usize,
    /// `None`: the default sweep; `Some`: this one setting.
    pub hyper: Option<Hyper>,
    pub wise_ft: Option<f64>,
    pub shots: Option<usize>,
    pub seed: u64,
}

fn raw_image_rows(
    clip: &Clip,
    samples: &[Sample],
    view: &View,
    opts: &ExtractOptions,
) -> Result<Mat> {
    let strict = ExtractOptions {
        skip_bad_images: false,
        ..opts.clone()
    };
    let paths: Vec<PathBuf> = samples.iter().map(|s| s.path.clone()).collect();
    Mat::from_tensor(&image_features(clip, &paths, view, &strict)?.features)
}

/// `clipft crossmodal train` on a loaded model: features (cached), init, sweep, WiSE-FT.
pub fn train(
    clip: &Clip,
    dataset: &Dataset,
    train: &[Sample],
    val: &[Sample],
    o: &TrainOptions,
    opts: &ExtractOptions,
    quiet: bool,
) -> Result<(CrossArtifact, Vec<String>)> {
    ensure!(!train.is_empty(), "no training images");
    let class_names = dataset.class_names();
    let c = class_names.len();
    let prompts: Vec<String> = class_names
        .iter()
        .flat_map(|n| o.templates.iter().map(|t| crate::templates::fill(t, n)))
        .collect();
    let text_raw = Mat::from_tensor(&text_features(clip, &prompts, crate::features::TEXT_BATCH)?)?;
    let zs = cm::zeroshot_init(&text_raw, c)?;
    let text = Rows::new(&text_raw, cm::text_labels(c, o.templates.len()));
    let mut views = vec![View::Center];
    if o.flip {
        views.push(View::Flip);
    }
    let labels: Vec<usize> = train.iter().map(|s| s.label).collect();
    let mut img_rows = Vec::new();
    let mut img_labels = Vec::new();
    for v in &views {
        let m = raw_image_rows(clip, train, v, opts)?;
        img_rows.extend(m.data);
        img_labels.extend(labels.iter().copied());
    }
    let dim = text_raw.cols;
    let image = Rows::new(&Mat::new(img_labels.len(), dim, img_rows), img_labels);
    let val_paths: Vec<PathBuf> = val.iter().map(|s| s.path.clone()).collect();
    let vf = image_features(clip, &val_paths, &View::Center, opts)?;
    crate::features::warn_skipped(&vf.skipped, "val ");
    let val_labels: Vec<usize> = vf.kept.iter().map(|&i| val[i].label).collect();
    let val_rows = Rows::new(&Mat::from_tensor(&vf.features)?, val_labels);
    let weight = match o.init {
        Init::Zeroshot => zs.clone(),
        Init::Random => cm::random_init(c, dim, o.seed),
    };
    // As the official `make_classifier_head`: --init sets the linear layer only; the adapter
    // always starts at nn.Linear's default.
    let init = Head {
        adapter: match o.head {
            HeadKind::Linear => None,
            HeadKind::Adapter => Some(Adapter::random(
                dim,
                cm::ADAPTER_REDUCTION,
                cm::ADAPTER_RATIO,
                o.seed,
            )?),
        },
        weight,
    };
    let settings = TrainSettings {
        iters: o.iters,
        modality: o.modality,
        init: o.init,
        seed: o.seed,
    };
    let grid = match o.hyper {
        Some(h) => vec![h],
        None => cm::grid_for(o.head),
    };
    // Settings whose batch halves do not fit the rows are skipped (noted after the sweep).
    let runnable = grid
        .iter()
        .filter(|h| {
            cm::batch_split(
                h.batch_size,
                o.modality,
                text.labels.len(),
                image.labels.len(),
            )
            .is_some()
        })
        .count();
    let skipped = match grid.len() - runnable {
        0 => String::new(),
        n => format!(" ({n} more skipped: batch too large for the rows)"),
    };
    info(
        format!(
            "training: {runnable} setting{} × {} iterations{skipped}",
            if runnable == 1 { "" } else { "s" },
            o.iters
        ),
        quiet,
    );
    let out = cm::sweep(&text, &image, &val_rows, &init, &grid, &settings)?;
    let val_acc_zeroshot = cm::accuracy(&cm::logits_normalized(&val_rows.x, &zs), &val_rows.labels);
    let head_wiseft = o
        .wise_ft
        .map(|a| cm::wise_ft_head(&out.best.head, &zs, a as f32));
    let val_acc_wiseft = head_wiseft
        .as_ref()
        .map(|h| cm::accuracy(&h.logits(&val_rows.x), &val_rows.labels));
    let adapter = out.best.head.adapter.clone();
    let meta = CrossMeta {
        kind: "crossmodal".into(),
        version: 1,
        model: clip.files.id.clone(),
        revision: clip.files.revision.clone(),
        model_digest: Some(clip.weights_digest()?.to_string()),
        preprocess: Some(clip.preprocess.clone()),
        projection_dim: dim,
        class_folders: dataset.class_folders(),
        class_names,
        templates: o.templates.clone(),
        shots: o.shots,
        seed: o.seed,
        head: o.head,
        adapter_reduction: adapter.as_ref().map(|_| cm::ADAPTER_REDUCTION),
        adapter_ratio: adapter.as_ref().map(Adapter::ratio_for_meta),
        modality: o.modality,
        init: o.init,
        image_views: views
            .iter()
            .map(|v| format!("{v:?}").to_lowercase())
            .collect(),
        iters: o.iters,
        swept: o.hyper.is_none(),
        hyper: out.best.hyper,
        best_iter: out.best.best_iter,
        val_acc: out.best.val_acc,
        val_acc_zeroshot,
        val_n: val_rows.labels.len(),
        sweep: out.results,
        wise_ft_ratio: o.wise_ft,
        val_acc_wiseft,
        default_head: "head".into(),
        fast_decode: opts.decode != crate::preprocess::Decode::Exact,
    };
    Ok((
        CrossArtifact {
            meta,
            head: out.best.head.weight,
            head_wiseft: head_wiseft.map(|h| h.weight),
            adapter,
        },
        out.notes,
    ))
}

/// The val numbers of a head.
pub fn write_summary(art: &CrossArtifact, out: &mut impl Write) -> std::io::Result<()> {
    let m = &art.meta;
    let name = match (m.modality, m.head) {
        (Modality::Cross, HeadKind::Linear) => "cross-modal linear probe",
        (Modality::Image, HeadKind::Linear) => "image-only linear probe",
        (Modality::Cross, HeadKind::Adapter) => "cross-modal CLIP-Adapter head",
        (Modality::Image, HeadKind::Adapter) => "image-only CLIP-Adapter head",
    };
    writeln!(
        out,
        "{name}: {} classes, {} template(s), init {}, {} iterations",
        m.class_names.len(),
        m.templates.len(),
        format!("{:?}", m.init).to_lowercase(),
        m.iters
    )?;
    writeln!(
        out,
        "  chosen: lr {} weight decay {} batch {} ({}), best iteration {}",
        super::crossmodal::num(m.hyper.lr),
        super::crossmodal::num(m.hyper.weight_decay),
        m.hyper.batch_size,
        if m.swept { "swept on val" } else { "as given" },
        m.best_iter
    )?;
    write!(
        out,
        "  val ({} images): zero-shot {:.2}%, head {:.2}%",
        m.val_n, m.val_acc_zeroshot, m.val_acc
    )?;
    if let (Some(r), Some(acc)) = (m.wise_ft_ratio, m.val_acc_wiseft) {
        write!(out, ", WiSE-FT (ratio {r}) {acc:.2}%")?;
    }
    writeln!(out)
}

fn train_cmd(a: TrainArgs, quiet: bool) -> Result<()> {
    let out = crate::io::check_writable(&a.out, "--out")?;
    if let Some(w) = a.wise_ft {
        ensure!((0.0..=1.0).contains(&w), "--wise-ft must be in [0, 1]");
    }
    ensure!(a.lr > 0.0 && a.lr.is_finite(), "--lr must be positive");
    ensure!(
        a.weight_decay >= 0.0 && a.weight_decay.is_finite(),
        "--weight-decay must be a non-negative number, not {}",
        a.weight_decay
    );
    let templates = crate::templates::resolve(&a.templates)?;
    let templates_file = crate::templates::file(&a.templates).map(|p| (p, "the --templates file"));
    crate::io::ensure_not_input(&a.out, "--out", templates_file)?;
    let dataset = crate::cli::open_dataset(&a.data)?;
    dataset.ensure_not_a_dataset_file(&a.out, "--out")?;
    let val = crate::cli::val_samples(&dataset, a.val_shots, &a.shots, quiet).with_context(|| {
        "cross-modal training sweeps hyperparameters on the val split (clipft never tunes on test)"
    })?;
    let train_s = split_samples(&dataset, Split::Train, &a.shots, quiet)?;
    let clip = load_model(&a.model, quiet)?;
    crate::io::ensure_not_input(&a.out, "--out", clip.files.inputs())?;
    let opts = a.extract.options(quiet);
    let o = TrainOptions {
        templates,
        modality: a.modality,
        init: a.init.unwrap_or(match a.modality {
            Modality::Cross => Init::Zeroshot,
            Modality::Image => Init::Random,
        }),
        head: a.head,
        flip: a.image_views == ImageViews::Flip,
        iters: a.iters as usize,
        hyper: a.no_sweep.then_some(Hyper {
            lr: a.lr,
            weight_decay: a.weight_decay,
            batch_size: a.batch as usize,
        }),
        wise_ft: a.wise_ft,
        shots: a.shots.shots.map(|k| k as usize),
        seed: a.shots.seed,
    };
    let (art, notes) = train(&clip, &dataset, &train_s, &val, &o, &opts, quiet)?;
    for n in notes {
        info(format!("note: {n}"), quiet);
    }
    art.save(&out)?;
    write_summary(&art, &mut crate::cli::stdout())?;
    info(format!("wrote {}", a.out.display()), quiet);
    Ok(())
}

/// Whether a file is a cross-modal head (by its metadata `kind`).
pub fn is_crossmodal(path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    let Ok((_, header)) = safetensors::SafeTensors::read_metadata(&bytes) else {
        return false;
    };
    header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(crate::io::META_KEY))
        .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        .is_some_and(|v| v.get("kind").and_then(|k| k.as_str()) == Some("crossmodal"))
}

/// `clipft eval --adapter HEAD`: loads the head and its model, checks them, scores the split.
pub fn eval_adapter(
    path: &Path,
    variant: &str,
    model: &ModelArgs,
    dataset: &Dataset,
    split: Split,
    opts: &ExtractOptions,
    quiet: bool,
) -> Result<(Clip, crate::eval::EvalRun)> {
    let art = CrossArtifact::load(path)?;
    let (head, method) = art.pick(variant)?;
    let args = super::model_for(
        model,
        &art.identity(),
        art.meta.revision.as_deref(),
        path,
        quiet,
    )?;
    let clip = load_model(&args, quiet)?;
    super::check_compatible(
        &art.identity(),
        &clip,
        dataset,
        path,
        super::ModelFrom::flag(model.model.is_some()),
    )?;
    // The rows arrive L2-normalised; the head applies its adapter (if any), W and ×100, as
    // trained.
    let run = crate::eval::evaluate_split(&clip, dataset, split, opts, method, |f| {
        head.logits(&Mat::from_tensor(f)?).to_tensor()
    })?;
    Ok((clip, run))
}

/// The cross-modal part of `clipft demo`: image-only linear probe vs cross-modal (1 shot, no
/// sweep, short training), scored on test.
pub fn demo(
    clip: &Clip,
    dataset: &Dataset,
    opts: &ExtractOptions,
    quiet: bool,
    out: &mut impl Write,
) -> Result<Vec<crate::eval::EvalReport>> {
    let all = dataset.samples(Split::Train)?;
    let (train_s, _) = crate::data::few_shot(dataset, &all, 1, 1, false)?;
    let val = dataset.samples(Split::Val)?;
    writeln!(out)?;
    writeln!(
        out,
        "linear probes, 1 shot: image-only (random init) vs cross-modal (text features as extra \
         samples, zero-shot init). With the demo's random weights the text features carry no \
         class information, so no cross-modal gain is expected here; with a real CLIP it helps."
    )?;
    let mut reports = Vec::new();
    for (modality, init) in [
        (Modality::Image, Init::Random),
        (Modality::Cross, Init::Zeroshot),
    ] {
        info(format!("linear probe ({modality:?}), 1 shot"), quiet);
        let o = TrainOptions {
            templates: crate::templates::resolve("clip")?,
            modality,
            init,
            head: HeadKind::Linear,
            flip: true,
            iters: 1000,
            hyper: Some(Hyper {
                lr: 1e-3,
                weight_decay: 0.0,
                batch_size: 2,
            }),
            wise_ft: None,
            shots: Some(1),
            seed: 1,
        };
        let (art, _) = train(clip, dataset, &train_s, &val, &o, opts, true)?;
        writeln!(out)?;
        write_summary(&art, out)?;
        let (head, _) = art.pick("learned")?;
        let name = match modality {
            Modality::Image => "linear-probe",
            Modality::Cross => "crossmodal",
        };
        let run = crate::eval::evaluate_split(clip, dataset, Split::Test, opts, name, |f| {
            head.logits(&Mat::from_tensor(f)?).to_tensor()
        })?;
        crate::eval::write_table(&run.report, out)?;
        reports.push(run.report);
    }
    Ok(reports)
}

//! `clipft tip build-cache`, `clipft tip train` and `clipft eval --adapter`: the command line of
//! [`super::tip`].

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use clap::{Args, Subcommand};

use super::tip::{self, TipArtifact, TipConfig, TipFSettings};
use crate::cli::{info, load_model, split_samples, ExtractArgs, ModelArgs, ReadArgs, ShotArgs};
use crate::data::{Dataset, Split};
use crate::features::ExtractOptions;
use crate::model::Clip;

#[derive(Args, Debug)]
pub struct TipArgs {
    #[command(subcommand)]
    pub command: TipCommand,
}

#[derive(Subcommand, Debug)]
pub enum TipCommand {
    /// Build a Tip-Adapter cache from K-shot train images and search α/β on val.
    BuildCache(BuildCacheArgs),
    /// Fine-tune the cache keys of a Tip-Adapter artifact (Tip-Adapter-F).
    Train(TrainArgs),
}

#[derive(Args, Debug)]
pub struct BuildCacheArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Dataset folder (DIR/{train,val,test}/<class>/<image>); needs train/ and val/.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    #[command(flatten)]
    pub shots: ShotArgs,
    /// Augmented views of each train image averaged into its cache key [default: the config's, 10].
    #[arg(long, value_name = "E", value_parser = clap::value_parser!(u64).range(1..=tip::MAX_AUGMENT_EPOCHS as u64))]
    pub augment_epochs: Option<u64>,
    /// Settings: a built-in config (default, imagenet, oxford_pets, ucf101, caltech101, dtd,
    /// eurosat, sun397, fgvc_aircraft, food101, oxford_flowers, stanford_cars) or a JSON file.
    #[arg(long, default_value = "default", value_name = "NAME|FILE")]
    pub config: String,
    /// Prompt templates instead of the config's: a built-in set (clip, ensemble7, imagenet80) or a
    /// file with one template per line.
    #[arg(long, value_name = "NAME|FILE")]
    pub templates: Option<String>,
    #[command(flatten)]
    pub extract: ExtractArgs,
    /// Output artifact (safetensors with JSON metadata).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tip-Adapter artifact from `clipft tip build-cache`.
    #[arg(long, value_name = "FILE")]
    pub cache: PathBuf,
    /// Dataset folder the cache was built from.
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Training epochs [default: the config's, 20 (100 for eurosat)].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub epochs: Option<u64>,
    /// Peak learning rate of AdamW's cosine schedule [default: the config's, 0.001].
    #[arg(long, value_name = "LR")]
    pub lr: Option<f64>,
    /// Training batch size [default: the config's, 256].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: Option<u64>,
    /// Encode new augmented views of the train images every epoch (as the paper does) instead of
    /// reusing the cache's pre-encoded views (epoch e uses view e mod E).
    #[arg(long)]
    pub fresh_views: bool,
    /// Images per forward pass when encoding.
    #[arg(long, default_value_t = 32, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub encode_batch_size: u64,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Output artifact.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

pub fn run(args: TipArgs, quiet: bool) -> Result<()> {
    match args.command {
        TipCommand::BuildCache(a) => build_cache_cmd(a, quiet),
        TipCommand::Train(a) => train_cmd(a, quiet),
    }
}

fn build_cache_cmd(a: BuildCacheArgs, quiet: bool) -> Result<()> {
    let out = crate::io::check_writable(&a.out, "--out")?;
    let config_file = TipConfig::file(&a.config).map(|p| (p, "the --config file"));
    let templates_file = (a.templates.as_deref())
        .and_then(crate::templates::file)
        .map(|p| (p, "the --templates file"));
    crate::io::ensure_not_input(
        &a.out,
        "--out",
        config_file.into_iter().chain(templates_file),
    )?;
    let mut config = TipConfig::resolve(&a.config)?;
    if let Some(t) = &a.templates {
        config.templates = crate::templates::resolve(t)?;
    }
    let dataset = crate::cli::open_dataset(&a.data)?;
    dataset.ensure_not_a_dataset_file(&a.out, "--out")?;
    dataset.samples(Split::Val).with_context(|| {
        "Tip-Adapter searches α/β on the val split (clipft never tunes on test)"
    })?;
    let train = split_samples(&dataset, Split::Train, &a.shots, quiet)?;
    let clip = load_model(&a.model, quiet)?;
    crate::io::ensure_not_input(&a.out, "--out", clip.files.inputs())?;
    let opts = a.extract.options(quiet);
    // The recorded config says what ran.
    if let Some(e) = a.augment_epochs {
        config.augment_epochs = e as usize;
    }
    let build = tip::BuildOptions {
        augment_epochs: config.augment_epochs,
        config,
        shots: a.shots.shots.map(|k| k as usize),
        seed: a.shots.seed,
        allow_fewer_shots: a.shots.allow_fewer_shots,
        augment: tip::OFFICIAL_AUGMENT,
    };
    info(
        format!(
            "building the cache: {} images × {} augmented views",
            train.len(),
            build.augment_epochs
        ),
        quiet,
    );
    let art = tip::build_cache(&clip, &dataset, &train, &build, &opts)?;
    art.save(&out)?;
    let mut out = crate::cli::stdout();
    write_summary(&art, &mut out)?;
    if let Some(note) = search_note(&art.meta) {
        info(note, quiet);
    }
    info(format!("wrote {}", a.out.display()), quiet);
    Ok(())
}

/// The val numbers of an artifact.
pub fn write_summary(art: &TipArtifact, out: &mut impl Write) -> std::io::Result<()> {
    let m = &art.meta;
    let (nk, _) = art.cache_keys.dims2().unwrap_or((0, 0));
    writeln!(
        out,
        "{}: {} cache entries, {} classes, config `{}`",
        m.kind.method_name(),
        nk,
        m.class_names.len(),
        m.config.name
    )?;
    writeln!(
        out,
        "  val ({} images): zero-shot {:.2}%",
        m.val_n, m.val_acc_zeroshot
    )?;
    match &m.train {
        None => writeln!(
            out,
            "  val: initial β {} α {} {:.2}%; searched β {:.4} α {:.4} {:.2}%",
            m.config.init_beta, m.config.init_alpha, m.val_acc_init, m.beta, m.alpha, m.val_acc
        ),
        Some(t) => writeln!(
            out,
            "  val: best epoch {} of {} ({:.2}% at initial β/α); searched β {:.4} α {:.4} {:.2}%",
            t.best_epoch + 1,
            t.settings.epochs,
            m.val_acc_init,
            m.beta,
            m.alpha,
            m.val_acc
        ),
    }
}

/// A note when the searched β/α score below the initial ones on val (a grid that does not reach
/// them, or steps past them): surprising, but what the official `search_hp` keeps too.
fn search_note(m: &tip::TipMeta) -> Option<String> {
    if m.val_acc >= m.val_acc_init {
        return None;
    }
    let c = &m.config;
    let outside = c.init_beta > c.search_scale[0] || c.init_alpha > c.search_scale[1];
    Some(format!(
        "note: on val the searched β/α ({:.2}%) score below the initial β {} α {} ({:.2}%){}; \
         the searched values are used all the same, as the official code does",
        m.val_acc,
        c.init_beta,
        c.init_alpha,
        m.val_acc_init,
        if outside {
            format!(
                ", which lie outside the search grid (search_scale [{}, {}])",
                c.search_scale[0], c.search_scale[1]
            )
        } else {
            String::new()
        }
    ))
}

fn load_for(
    args: &ModelArgs,
    art: &TipArtifact,
    dataset: &Dataset,
    path: &Path,
    quiet: bool,
) -> Result<Clip> {
    let clip = load_model(
        &super::model_for(
            args,
            &art.identity(),
            art.meta.revision.as_deref(),
            path,
            quiet,
        )?,
        quiet,
    )?;
    super::check_compatible(
        &art.identity(),
        &clip,
        dataset,
        path,
        super::ModelFrom::flag(args.model.is_some()),
    )?;
    Ok(clip)
}

fn train_cmd(a: TrainArgs, quiet: bool) -> Result<()> {
    let out = crate::io::check_writable(&a.out, "--out")?;
    crate::io::ensure_not_input(
        &a.out,
        "--out",
        [(a.cache.as_path(), "the --cache artifact")],
    )?;
    ensure!(
        a.cache.is_file(),
        "--cache {}: {}; pass the file from `clipft tip build-cache`",
        a.cache.display(),
        if a.cache.is_dir() {
            "a folder, not a file"
        } else {
            "no such file"
        }
    );
    let cache = TipArtifact::load_cache(&a.cache)?;
    ensure!(
        cache.meta.kind == tip::Kind::Tip,
        "--cache {}: already a Tip-Adapter-F artifact; pass the file from `clipft tip build-cache`",
        a.cache.display()
    );
    let dataset = crate::cli::open_dataset(&a.data)?;
    dataset.ensure_not_a_dataset_file(&a.out, "--out")?;
    let m = &cache.meta;
    let shots = ShotArgs {
        shots: m.shots.map(|k| k as u64),
        seed: m.seed,
        allow_fewer_shots: m.allow_fewer_shots,
    };
    // The model and classes first (`load_for`): the sample below would fail on other classes
    // with a less telling message.
    let clip = load_for(&a.model, &cache, &dataset, &a.cache, quiet)?;
    // The cache's sample is drawn again: the shot count is the cache's, not a flag of this
    // command.
    let train = split_samples(&dataset, Split::Train, &shots, true).map_err(|e| {
        match e.downcast_ref::<crate::data::DataError>() {
            Some(crate::data::DataError::TooFewShots { shots, count, list }) => anyhow::anyhow!(
                "--data {}: {count} class(es) have fewer training images than the {shots} shots \
                 per class --cache {} was built with: {list}. tip train draws the cache's sample \
                 again: pass the dataset the cache was built from, or rebuild the cache with \
                 fewer --shots",
                a.data.display(),
                a.cache.display()
            ),
            _ => e,
        }
    })?;
    crate::io::ensure_not_input(&a.out, "--out", clip.files.inputs())?;
    let opts = a.read.options(a.encode_batch_size as usize, quiet);
    let mut settings = TipFSettings::from_config(&m.config, m.seed);
    if let Some(e) = a.epochs {
        settings.epochs = e as usize;
    }
    if let Some(lr) = a.lr {
        ensure!(lr > 0.0 && lr.is_finite(), "--lr must be positive");
        settings.lr = lr;
    }
    if let Some(b) = a.batch_size {
        settings.batch_size = b as usize;
    }
    let train_opts = tip::TrainOptions {
        settings,
        fresh_views: a.fresh_views,
    };
    let art = tip::train(&clip, &dataset, &cache, &train, &train_opts, &opts)?;
    art.save(&out)?;
    write_summary(&art, &mut crate::cli::stdout())?;
    if let Some(note) = search_note(&art.meta) {
        info(note, quiet);
    }
    info(format!("wrote {}", a.out.display()), quiet);
    Ok(())
}

/// `clipft eval --adapter FILE`: loads the artifact and its model, checks them against the
/// dataset, and scores the split.
pub fn eval_adapter(
    path: &Path,
    model: &ModelArgs,
    dataset: &Dataset,
    split: Split,
    opts: &ExtractOptions,
    quiet: bool,
) -> Result<(Clip, crate::eval::EvalRun)> {
    let art = TipArtifact::load(path)?;
    let clip = load_for(model, &art, dataset, path, quiet)?;
    let run = tip::evaluate_adapter(&clip, dataset, &art, split, opts)?;
    Ok((clip, run))
}

/// The Tip-Adapter part of `clipft demo`: Tip-Adapter and Tip-Adapter-F (default config, all
/// train images, α/β and epoch on val) scored on test, after the zero-shot table. Returns their
/// test reports for the demo's summary.
pub fn demo(
    clip: &Clip,
    dataset: &Dataset,
    opts: &ExtractOptions,
    quiet: bool,
    out: &mut impl Write,
) -> Result<Vec<crate::eval::EvalReport>> {
    let config = TipConfig::resolve("default")?;
    let train = dataset.samples(Split::Train)?;
    let build = tip::BuildOptions {
        augment_epochs: config.augment_epochs,
        shots: None,
        seed: 1,
        allow_fewer_shots: false,
        augment: tip::OFFICIAL_AUGMENT,
        config,
    };
    info(
        format!(
            "Tip-Adapter: caching {} train images × {} augmented views",
            train.len(),
            build.augment_epochs
        ),
        quiet,
    );
    let cache = tip::build_cache(clip, dataset, &train, &build, opts)?;
    writeln!(out)?;
    write_summary(&cache, out)?;
    let run = tip::evaluate_adapter(clip, dataset, &cache, Split::Test, opts)?;
    crate::eval::write_table(&run.report, out)?;
    info("Tip-Adapter-F: fine-tuning the cache keys", quiet);
    let train_opts = tip::TrainOptions {
        settings: TipFSettings::from_config(&cache.meta.config, build.seed),
        fresh_views: false,
    };
    let tipf = tip::train(clip, dataset, &cache, &train, &train_opts, opts)?;
    writeln!(out)?;
    write_summary(&tipf, out)?;
    let run_f = tip::evaluate_adapter(clip, dataset, &tipf, Split::Test, opts)?;
    crate::eval::write_table(&run_f.report, out)?;
    Ok(vec![run.report, run_f.report])
}

//! The command line: clap derive structs per subcommand, each a thin layer over the library.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::data::{few_shot, Dataset, Sample, Split};
use crate::features::{image_features, l2_normalize, ExtractOptions, PixelTransfer};
use crate::model::hub::DEFAULT_MODEL;
use crate::model::{Clip, DTypeArg, DeviceArg, ModelSpec};
use crate::preprocess::Decode;
use crate::preprocess::View;

/// The text after `clipft --help`; the image extensions come from the list that is read.
fn after_help() -> String {
    format!(
        "\
Dataset layout: DIR/{{train,val,test}}/<class>/<image>, images with the extensions {} (any case).
Classes are the folder names ('_' becomes a space) unless DIR/classnames.txt maps
'<folder>\\t<readable name>'. Models: a local folder in the Hugging Face layout (config.json,
model.safetensors, tokenizer.json) or a hub id such as openai/clip-vit-base-patch32.

Try `clipft demo` for an end-to-end run on a generated model and image set (no network).",
        crate::data::IMAGE_EXTENSIONS.join(", ")
    )
}

#[derive(Parser, Debug)]
#[command(name = "clipft", version, about = "Few-shot adaptation of CLIP: zero-shot, Tip-Adapter, cross-modal and FD-Align in one binary", after_help = after_help())]
pub struct Cli {
    /// No progress bars or informational messages on stderr.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// Worker threads for decoding and the CPU backend (default, or 0: all cores).
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Extract L2-normalised CLIP image features of a split into a safetensors file.
    Features(FeaturesArgs),
    /// Evaluate a method on a split: top-1, top-5 and per-class accuracy.
    Eval(EvalArgs),
    /// Generate a small random CLIP checkpoint and image set, then run zero-shot, Tip-Adapter(-F),
    /// linear probes, cross-modal adaptation and FD-Align on it end to end.
    Demo(DemoArgs),
    /// Load a checkpoint and print what it is (architecture, dims, dtype, device).
    Info(InfoArgs),
    /// Tip-Adapter: build the training-free cache (`build-cache`) or fine-tune it (`train`).
    Tip(crate::methods::tip_cli::TipArgs),
    /// FD-Align: fine-tune the image encoder (`train`), keeping spurious features aligned.
    Fdalign(crate::methods::fdalign_cli::FdAlignArgs),
    /// Cross-modal linear probing: train a head on image and class-name text features (`train`).
    Crossmodal(crate::methods::crossmodal_cli::CrossmodalArgs),
}

/// Which checkpoint, on which device, in which precision.
#[derive(Args, Debug, Clone, Default)]
pub struct ModelArgs {
    /// CLIP checkpoint: a folder in the Hugging Face layout or a hub repo id [default:
    /// openai/clip-vit-base-patch32; for `eval --adapter` and `tip train --cache`: the artifact's
    /// model]. Hub files go to the standard cache (HF_HOME, HF_HUB_CACHE); HF_HUB_OFFLINE=1 uses
    /// the cache only.
    #[arg(long, value_name = "ID|DIR", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub model: Option<String>,
    /// Hub revision (branch, tag, commit or PR ref). Default: `main`, except
    /// openai/clip-vit-base-patch32, whose safetensors weights are on `refs/pr/15`.
    #[arg(long, value_name = "REV")]
    pub revision: Option<String>,
    /// Compute precision: f32, f16 or bf16. On the CPU, bf16 takes the dense layers' products in
    /// bf16 with f32 in between (needs AVX512-BF16, otherwise f32 with a warning): about 2x f32
    /// on AMD, f32's speed or more on Intel (far more with AMX); f16 there is slower than f32.
    /// `fdalign train` keeps f32 weights and computes the trained encoder in this dtype (mixed
    /// precision; f16 with loss scaling).
    #[arg(long, default_value = "f32", value_name = "DTYPE")]
    pub dtype: DTypeArg,
    /// auto, cpu, cuda (alias gpu) or cuda:N (cuda needs a build with `--features cuda`).
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: DeviceArg,
}

impl ModelArgs {
    /// `--model`, or the default model.
    pub fn id(&self) -> &str {
        self.model.as_deref().unwrap_or(DEFAULT_MODEL)
    }

    fn spec(&self, quiet: bool) -> ModelSpec {
        ModelSpec {
            model: self.id().to_string(),
            revision: self.revision.clone(),
            dtype: self.dtype,
            device: self.device,
            progress: !quiet,
        }
    }
}

/// How images are read and encoded.
#[derive(Args, Debug, Clone)]
pub struct ExtractArgs {
    /// Images per forward pass.
    #[arg(long, default_value_t = 32, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub batch_size: u64,
    #[command(flatten)]
    pub read: ReadArgs,
}

impl ExtractArgs {
    pub(crate) fn options(&self, quiet: bool) -> ExtractOptions {
        self.read.options(self.batch_size as usize, quiet)
    }
}

/// How image files are read and their features cached; with `ExtractArgs`'s `--batch-size`, or
/// on its own where `--batch-size` means something else (`tip train`).
#[derive(Args, Debug, Clone)]
pub struct ReadArgs {
    /// Skip unreadable or corrupt images (they are counted and listed) instead of failing; train
    /// images of an adapter are never skipped.
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Feature cache folder [default: $XDG_CACHE_HOME/clipft/features or ~/.cache/clipft/features].
    #[arg(long, env = "CLIPFT_CACHE_DIR", value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Encode every image again; neither read nor write the feature cache.
    #[arg(long)]
    pub no_cache: bool,
    /// Decode large JPEGs at 1/2, 1/4 or 1/8 size inside the JPEG decoder (as Pillow's
    /// `Image.draft`) where that still covers the resize size: 2-3x faster decoding and
    /// preprocessing of 1000+ px photos; images under twice the resize size (448 px for 224-px
    /// models, e.g. most of ImageNet) are unchanged. Pixels of reduced images differ slightly
    /// from `CLIPImageProcessor`'s (README "Fast decoding" has the measured effect); features
    /// are cached apart. Augmented train views always decode in full.
    #[arg(long)]
    pub fast_decode: bool,
}

impl ReadArgs {
    pub(crate) fn options(&self, batch_size: usize, quiet: bool) -> ExtractOptions {
        ExtractOptions {
            batch_size,
            skip_bad_images: self.skip_bad_images,
            progress: !quiet,
            cache_dir: if self.no_cache {
                None
            } else {
                Some(self.cache_dir.clone().unwrap_or_else(default_cache_dir))
            },
            decode: if self.fast_decode {
                Decode::Reduced
            } else {
                Decode::Exact
            },
            transfer: PixelTransfer::Auto,
        }
    }
}

pub fn default_cache_dir() -> PathBuf {
    crate::model::download::user_cache_dir()
        .join("clipft")
        .join("features")
}

/// Few-shot sampling of the train split.
#[derive(Args, Debug, Clone)]
pub struct ShotArgs {
    /// Images per class, sampled from the split (all images if not given).
    #[arg(long, value_name = "K", value_parser = clap::value_parser!(u64).range(1..))]
    pub shots: Option<u64>,
    /// Seed of the few-shot sample; the same seed always picks the same files.
    #[arg(long, default_value_t = 1, value_name = "S")]
    pub seed: u64,
    /// Use all images of classes with fewer than --shots images (with a warning) instead of failing.
    #[arg(long)]
    pub allow_fewer_shots: bool,
}

#[derive(Args, Debug)]
pub struct FeaturesArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Dataset folder (DIR/{train,val,test}/<class>/<image>).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Split to encode: train, val (also spelled validation or valid) or test.
    #[arg(long, default_value = "train", value_name = "SPLIT")]
    pub split: Split,
    #[command(flatten)]
    pub shots: ShotArgs,
    /// Which view of each image: the CLIP centre crop, or the same crop mirrored.
    #[arg(long, value_enum, default_value_t = ViewArg::Center)]
    pub view: ViewArg,
    #[command(flatten)]
    pub extract: ExtractArgs,
    /// Output safetensors file: image_features (N×E, L2-normalised), labels (N, i64) and metadata.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViewArg {
    Center,
    Flip,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// CLIP zero-shot: 100 · cos(image, class prompt ensemble).
    Zeroshot,
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Dataset folder (DIR/{train,val,test}/<class>/<image>).
    #[arg(long, value_name = "DIR")]
    pub data: PathBuf,
    /// Split to evaluate: train, val (also spelled validation or valid) or test.
    #[arg(long, default_value = "test", value_name = "SPLIT")]
    pub split: Split,
    /// How to classify without --adapter: `zeroshot`, CLIP's text classifier (the only such
    /// method; the adapted ones are evaluated with --adapter) [default: zeroshot].
    #[arg(long, value_enum)]
    pub method: Option<Method>,
    /// Prompt templates: a built-in set (clip, ensemble7, imagenet80) or a file with one template
    /// per line, `{}` standing for the class name [default: clip; not with --adapter, whose
    /// artifact holds its own].
    #[arg(long, value_name = "NAME|FILE")]
    pub templates: Option<String>,
    /// Print one JSON object instead of the table: top1, top5 and each per_class top1 in
    /// percent (0-100), n, ...
    #[arg(long)]
    pub json: bool,
    /// Also write the logits (N×C: the method's, e.g. 100·cos for zero-shot) and labels, with
    /// image paths, to a safetensors file.
    #[arg(long, value_name = "FILE")]
    pub save_logits: Option<PathBuf>,
    /// Evaluate an adapter instead of zero-shot: a Tip-Adapter / Tip-Adapter-F artifact (`clipft
    /// tip`), a cross-modal head (`clipft crossmodal train`) or an FD-Align output folder
    /// (`clipft fdalign train`). Its model, classes and templates are used; another model or a
    /// dataset with other classes is an error.
    #[arg(long, value_name = "FILE|DIR")]
    pub adapter: Option<PathBuf>,
    /// Which head of a cross-modal artifact to use: `default` (the artifact's), `learned` or
    /// `wiseft` (the WiSE-FT head from `crossmodal train --wise-ft`) [default: default].
    #[arg(long, value_name = "VARIANT")]
    pub head_variant: Option<String>,
    #[command(flatten)]
    pub extract: ExtractArgs,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Where to write the generated checkpoint and images, the feature cache and the FD-Align
    /// checkpoint (default: a temporary folder that is removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The command line as clap's derive reads it, except that a value may be a negative number
/// (`--lr -1` reaches the flag's own check, which names the flag and says what it takes,
/// instead of clap's "unexpected argument '-1'").
pub fn command() -> clap::Command {
    fn negatives(c: clap::Command) -> clap::Command {
        // (Only on arguments that take a value: clap asserts that in debug builds.)
        c.mut_args(|a| match a.get_action().takes_values() {
            true => a.allow_negative_numbers(true),
            false => a,
        })
        .mut_subcommands(negatives)
    }
    negatives(<Cli as clap::CommandFactory>::command())
}

fn parse_args() -> Cli {
    let matches = command().get_matches();
    <Cli as clap::FromArgMatches>::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// Entry point of the binary: parses arguments, runs, prints errors with their causes.
pub fn main() -> ExitCode {
    let cli = parse_args();
    crate::interrupt::install();
    crate::interrupt::explain_bus_errors();
    let result = run(cli);
    crate::interrupt::finish();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout went away (`clipft eval | head`): nothing left to say, as any
        // Unix filter.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            crate::say!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    if let Some(n) = cli.threads {
        let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
        // Each thread reserves a stack: tens of thousands exhaust memory and abort mid-spawn.
        let most = (16 * cores).max(1024);
        anyhow::ensure!(
            n <= most,
            "--threads {n}: at most {most} here ({cores} core(s)); the default uses all cores"
        );
        if n > 4 * cores && !cli.quiet {
            // Idle pool threads spin before sleeping: thousands of them starve the workers.
            crate::say!(
                "warning: --threads {n} is more than 4× the {cores} core(s) here; expect the run \
                 to be much slower than with --threads {cores}"
            );
        }
        // candle's CPU kernels size their pool from RAYON_NUM_THREADS; set both before any work.
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .ok();
    }
    let quiet = cli.quiet;
    match cli.command {
        Command::Features(a) => features_cmd(a, quiet),
        Command::Eval(a) => eval_cmd(a, quiet),
        Command::Demo(a) => crate::demo::run(a.dir.as_deref(), quiet, &mut stdout()),
        Command::Info(a) => info_cmd(a, quiet),
        Command::Tip(a) => crate::methods::tip_cli::run(a, quiet),
        Command::Fdalign(a) => crate::methods::fdalign_cli::run(a, quiet),
        Command::Crossmodal(a) => crate::methods::crossmodal_cli::run(a, quiet),
    }
}

/// Standard output whose write errors say so: a full disk behind `> file` would otherwise be
/// reported as a bare "No space left on device". (The error keeps its kind: a reader that went
/// away is still `BrokenPipe`.)
pub fn stdout() -> impl Write {
    struct Named<W>(W);
    fn name(e: std::io::Error) -> std::io::Error {
        std::io::Error::new(e.kind(), format!("writing to standard output: {e}"))
    }
    impl<W: Write> Write for Named<W> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.write(b).map_err(name)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.0.flush().map_err(name)
        }
    }
    Named(std::io::stdout().lock())
}

/// `eprintln!` that ignores a failed write: a closed or full stderr (`2>&1 | head -1`) must not
/// stop a run, which `eprintln!` would, by panicking.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub fn info(msg: impl AsRef<str>, quiet: bool) {
    if !quiet {
        crate::say!("{}", msg.as_ref());
    }
}

pub(crate) fn load_model(args: &ModelArgs, quiet: bool) -> Result<Clip> {
    let clip =
        Clip::load(&args.spec(quiet)).with_context(|| format!("loading model `{}`", args.id()))?;
    for w in &clip.warnings {
        crate::say!("warning: {w}");
    }
    Ok(clip)
}

fn info_cmd(args: InfoArgs, quiet: bool) -> Result<()> {
    let clip = load_model(&args.model, quiet)?;
    let c = clip.config();
    let mut out = stdout();
    writeln!(out, "model        {}", clip.files.id)?;
    if let Some(rev) = &clip.files.revision {
        writeln!(out, "revision     {rev}")?;
    }
    writeln!(out, "architecture {}", c.arch_name())?;
    let v = &c.vision_config;
    let t = &c.text_config;
    // config.json's own spelling (`quick_gelu`), not Rust's.
    let act = |a: crate::model::config::Activation| {
        serde_json::to_value(a)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("{a:?}"))
    };
    writeln!(
        out,
        "vision       {}x{} px, patch {}, hidden {}, {}, {}, {}",
        v.image_size,
        v.image_size,
        v.patch_size,
        v.hidden_size,
        count(v.num_hidden_layers, "layer"),
        count(v.num_attention_heads, "head"),
        act(v.hidden_act)
    )?;
    writeln!(
        out,
        "text         context {}, vocab {}, hidden {}, {}, {}, {}",
        t.max_position_embeddings,
        t.vocab_size,
        t.hidden_size,
        count(t.num_hidden_layers, "layer"),
        count(t.num_attention_heads, "head"),
        act(t.hidden_act)
    )?;
    writeln!(out, "embedding    {}", c.projection_dim)?;
    writeln!(
        out,
        "weights      {}",
        clip.files
            .weights
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    let (steps, pixels) = clip.preprocess.describe();
    writeln!(out, "preprocess   {steps}")?;
    writeln!(out, "pixels       {pixels}")?;
    writeln!(
        out,
        "dtype        {} (weights stored as {})",
        clip.precision,
        clip.stored_dtypes.join(", ")
    )?;
    writeln!(
        out,
        "jpeg decode  libjpeg-turbo, {}",
        if crate::preprocess::jpeg_simd() {
            "SIMD"
        } else {
            "no SIMD (build with `nasm` installed for about twice the decoding speed)"
        }
    )?;
    // (The external BLAS multiplies f32 only; `--dtype bf16` on the CPU is f32 in between.)
    if clip.device.is_cpu()
        && clip.precision.dtype == candle_core::DType::F32
        && !clip.precision.bf16_matmul
    {
        writeln!(
            out,
            "cpu gemm     {}",
            match crate::model::blas::get() {
                Some(blas) => format!("{} ({})", blas.path().display(), crate::model::blas::ENV),
                None => "built-in (gemm crate)".into(),
            }
        )?;
    }
    writeln!(
        out,
        "device       {}",
        crate::model::load::device_name(&clip.device)
    )?;
    Ok(())
}

/// The first `shown` of `items` joined with commas, then "and N more" for the rest: a list in a
/// message that stays readable for thousands of names.
pub fn first_few(items: impl ExactSizeIterator<Item = String>, shown: usize) -> String {
    let n = items.len();
    let mut list: Vec<String> = items.take(shown).collect();
    if n > shown {
        list.push(format!("and {} more", n - shown));
    }
    list.join(", ")
}

/// Opens a dataset folder for a command, warning about classes `classnames.txt` leaves unnamed.
pub(crate) fn open_dataset(root: &Path) -> Result<Dataset> {
    let dataset = Dataset::open(root)?;
    if let Some(w) = dataset.unnamed_warning() {
        crate::say!("warning: {w}");
    }
    Ok(dataset)
}

/// Samples of a split, few-shot sampled when `--shots` is given; warnings go to stderr.
pub(crate) fn split_samples(
    dataset: &Dataset,
    split: Split,
    shots: &ShotArgs,
    quiet: bool,
) -> Result<Vec<Sample>> {
    let all = dataset.samples(split)?;
    let Some(k) = shots.shots else { return Ok(all) };
    let (picked, warnings) = few_shot(
        dataset,
        &all,
        k as usize,
        shots.seed,
        shots.allow_fewer_shots,
    )?;
    // With --allow-fewer-shots some classes may have given all they had.
    let per_class = if warnings.is_empty() {
        format!("{k} per class")
    } else {
        format!("up to {k} per class")
    };
    for w in warnings {
        crate::say!("warning: {w}");
    }
    info(
        format!(
            "{split}: {} of {} images ({per_class}, seed {})",
            picked.len(),
            all.len(),
            shots.seed
        ),
        quiet,
    );
    Ok(picked)
}

/// `--val-shots K|all`: how many val images per class a method tunes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValShots {
    All,
    PerClass(usize),
}

impl std::str::FromStr for ValShots {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            _ => match s.parse::<usize>() {
                Ok(k) if k >= 1 => Ok(Self::PerClass(k)),
                _ => Err(format!(
                    "`{s}`: give a number of images per class (1 or more) or `all`"
                )),
            },
        }
    }
}

/// Val images per class by default when training on `--shots K`: min(K, 4), as the official
/// cross-modal (`--max-val-shot 4`) and FD-Align code sample their few-shot val sets.
pub const DEFAULT_MAX_VAL_SHOTS: usize = 4;

/// The val images a method tunes on: `--val-shots K` per class (seeded like the train sample),
/// `all`, or by default min(--shots, 4) per class (every val image without --shots). A class
/// with fewer val images keeps all of them.
pub(crate) fn val_samples(
    dataset: &Dataset,
    val_shots: Option<ValShots>,
    shots: &ShotArgs,
    quiet: bool,
) -> Result<Vec<Sample>> {
    let all = dataset.samples(Split::Val)?;
    let k = match (val_shots, shots.shots) {
        (Some(ValShots::PerClass(k)), _) => k,
        (None, Some(s)) => (s as usize).min(DEFAULT_MAX_VAL_SHOTS),
        _ => {
            info(format!("val: all {} images", all.len()), quiet);
            return Ok(all);
        }
    };
    let (picked, _) = few_shot(dataset, &all, k, shots.seed, true)?;
    info(
        format!(
            "val: {} of {} images (up to {k} per class{}; --val-shots all uses every one)",
            picked.len(),
            all.len(),
            if val_shots.is_none() {
                ", min(--shots, 4) as the official code"
            } else {
                ""
            }
        ),
        quiet,
    );
    Ok(picked)
}

/// Metadata shared by every file that stores per-image rows.
fn rows_metadata(
    clip: &Clip,
    dataset: &Dataset,
    split: Split,
    paths: &[PathBuf],
    decode: Decode,
) -> serde_json::Value {
    // Absolute, so the file still says where its rows came from when read from elsewhere.
    let abs = |p: &Path| {
        std::path::absolute(p)
            .unwrap_or_else(|_| p.to_path_buf())
            .display()
            .to_string()
    };
    serde_json::json!({
        "class_names": dataset.class_names(),
        "class_folders": dataset.class_folders(),
        "paths": paths.iter().map(|p| abs(p)).collect::<Vec<_>>(),
        "model": clip.files.id,
        "revision": clip.files.revision,
        "dtype": clip.precision.to_string(),
        "preprocess": clip.preprocess,
        // `reduced` (--fast-decode): large JPEGs were not decoded to the reference pixels.
        "decode": decode,
        "data": abs(&dataset.root),
        "split": split.as_str(),
    })
}

fn labels_tensor(labels: &[usize]) -> Result<Tensor> {
    let v: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    Ok(Tensor::new(v.as_slice(), &candle_core::Device::Cpu)?)
}

fn features_cmd(a: FeaturesArgs, quiet: bool) -> Result<()> {
    let out = crate::io::check_writable(&a.out, "--out")?;
    let dataset = open_dataset(&a.data)?;
    dataset.ensure_not_a_dataset_file(&a.out, "--out")?;
    let samples = split_samples(&dataset, a.split, &a.shots, quiet)?;
    let clip = load_model(&a.model, quiet)?;
    crate::io::ensure_not_input(&a.out, "--out", clip.files.inputs())?;
    let view = match a.view {
        ViewArg::Center => View::Center,
        ViewArg::Flip => View::Flip,
    };
    let opts = a.extract.options(quiet);
    let paths: Vec<PathBuf> = samples.iter().map(|s| s.path.clone()).collect();
    let feats = image_features(&clip, &paths, &view, &opts)?;
    crate::features::warn_skipped(&feats.skipped, "");
    let kept_paths: Vec<PathBuf> = feats.kept.iter().map(|&i| paths[i].clone()).collect();
    let labels: Vec<usize> = feats.kept.iter().map(|&i| samples[i].label).collect();
    // The sample was drawn before any image was read; skipping can leave classes short.
    if let Some(k) = a.shots.shots.filter(|_| !feats.skipped.is_empty()) {
        if let Some(w) = crate::data::shots_left_warning(&dataset, &labels, k as usize) {
            crate::say!("warning: {w}");
        }
    }
    let normalized = l2_normalize(&feats.features)?.to_dtype(DType::F32)?;
    let mut meta = rows_metadata(&clip, &dataset, a.split, &kept_paths, opts.decode);
    meta["kind"] = "features".into();
    meta["view"] = serde_json::to_value(view)?;
    meta["shots"] = a.shots.shots.into();
    meta["seed"] = a.shots.seed.into();
    meta["skipped"] = feats.skipped.len().into();
    crate::io::save(
        &out,
        &[
            ("image_features", &normalized),
            ("labels", &labels_tensor(&labels)?),
        ],
        &meta,
    )?;
    info(
        format!(
            "wrote {} ({} × {}; {} encoded, {} from cache, {} skipped)",
            a.out.display(),
            kept_paths.len(),
            clip.config().projection_dim,
            feats.encoded,
            feats.cache_hits,
            feats.skipped.len()
        ),
        quiet,
    );
    Ok(())
}

/// "1 layer", "12 layers".
fn count(n: usize, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

fn eval_cmd(a: EvalArgs, quiet: bool) -> Result<()> {
    let mut save_to = None;
    if let Some(p) = &a.save_logits {
        save_to = Some(crate::io::check_writable(p, "--save-logits")?);
        let adapter = a.adapter.as_deref().map(|f| (f, "the --adapter artifact"));
        let templates = (a.templates.as_deref())
            .and_then(crate::templates::file)
            .map(|f| (f, "the --templates file"));
        crate::io::ensure_not_input(p, "--save-logits", adapter.into_iter().chain(templates))?;
        // An FD-Align adapter is a folder of inputs (weights, head, config, tokenizer).
        if let Some(dir) = a.adapter.as_deref().filter(|d| d.is_dir()) {
            let inside = (crate::io::resolved(p), dir.canonicalize().ok());
            anyhow::ensure!(
                !(p.exists() && matches!(inside, (Some(o), Some(d)) if o.starts_with(&d))),
                "--save-logits {}: that is a file of the --adapter folder {}, which this command \
                 reads; give another path",
                p.display(),
                dir.display()
            );
        }
    }
    let dataset = open_dataset(&a.data)?;
    if let Some(p) = &a.save_logits {
        dataset.ensure_not_a_dataset_file(p, "--save-logits")?;
    }
    // Fail on a missing split before the (possibly slow) model load.
    dataset.samples(a.split)?;
    if let Some(p) = &a.adapter {
        anyhow::ensure!(
            p.exists(),
            "--adapter {}: no such file or folder",
            p.display()
        );
        if let Some(m) = a.method {
            anyhow::bail!(
                "--method {} cannot be combined with --adapter, which evaluates the adapter's \
                 own method",
                m.to_possible_value().expect("not skipped").get_name()
            );
        }
    }
    if a.adapter.is_some() && a.templates.is_some() {
        anyhow::bail!("--templates cannot be combined with --adapter: the artifact's classifier was built from its own templates");
    }
    if a.head_variant.is_some()
        && !a
            .adapter
            .as_ref()
            .is_some_and(|p| crate::methods::crossmodal_cli::is_crossmodal(p))
    {
        anyhow::bail!(
            "--head-variant picks a head of a cross-modal artifact (`--adapter HEAD` from \
             `clipft crossmodal train`); it does not apply here"
        );
    }
    let template_set = crate::templates::resolve(a.templates.as_deref().unwrap_or("clip"))?;
    let opts = a.extract.options(quiet);
    let (clip, run) =
        adapter_or_zero_shot(&a, &dataset, &template_set, &opts, quiet).map_err(|e| {
            match &a.adapter {
                // The logits were the adapter's: say which file made them.
                Some(p) if e.is::<crate::eval::NonFiniteLogits>() => {
                    e.context(format!("--adapter {}", p.display()))
                }
                _ => e,
            }
        })?;
    crate::features::warn_skipped(&run.skipped, "");
    // (`save_to`: --save-logits with its links followed.)
    if let (Some(path), Some(to)) = (&a.save_logits, &save_to) {
        crate::io::ensure_not_input(path, "--save-logits", clip.files.inputs())?;
        // What made the logits, beside the method's name.
        let made_by = match &a.adapter {
            Some(p) => serde_json::json!({
                "adapter": crate::io::resolved(p).unwrap_or_else(|| p.clone()),
                "head_variant": a.head_variant,
            }),
            None => serde_json::json!({ "templates": template_set }),
        };
        save_logits(to, &clip, &dataset, a.split, &run, opts.decode, made_by)?;
        info(format!("wrote {}", path.display()), quiet);
    }
    let mut out = stdout();
    if a.json {
        writeln!(out, "{}", serde_json::to_string(&run.report)?)?;
    } else {
        crate::eval::write_table(&run.report, &mut out)?;
    }
    Ok(())
}

/// `eval`'s logits: the adapter's (FD-Align folder, cross-modal head or Tip artifact) with
/// --adapter, else zero-shot CLIP's.
fn adapter_or_zero_shot(
    a: &EvalArgs,
    dataset: &Dataset,
    template_set: &[String],
    opts: &crate::features::ExtractOptions,
    quiet: bool,
) -> Result<(Clip, crate::eval::EvalRun)> {
    use crate::methods::{crossmodal_cli, fdalign_cli, tip_cli};
    let Some(adapter) = &a.adapter else {
        let clip = load_model(&a.model, quiet)?;
        let run = match a.method.unwrap_or(Method::Zeroshot) {
            Method::Zeroshot => {
                crate::eval::zero_shot(&clip, dataset, a.split, template_set, opts)?
            }
        };
        return Ok((clip, run));
    };
    if adapter.is_dir() {
        fdalign_cli::eval_adapter(adapter, &a.model, dataset, a.split, opts, quiet)
    } else if crossmodal_cli::is_crossmodal(adapter) {
        let variant = a.head_variant.as_deref().unwrap_or("default");
        crossmodal_cli::eval_adapter(adapter, variant, &a.model, dataset, a.split, opts, quiet)
    } else {
        tip_cli::eval_adapter(adapter, &a.model, dataset, a.split, opts, quiet)
    }
}

/// Writes `eval --save-logits`: the logits and labels, with the rows' metadata, the method, and
/// `made_by`'s fields (the adapter's path and head variant, or zero-shot's templates).
fn save_logits(
    path: &Path,
    clip: &Clip,
    dataset: &Dataset,
    split: Split,
    run: &crate::eval::EvalRun,
    decode: Decode,
    made_by: serde_json::Value,
) -> Result<()> {
    let mut meta = rows_metadata(clip, dataset, split, &run.paths, decode);
    meta["kind"] = "logits".into();
    meta["method"] = run.report.method.clone().into();
    if let serde_json::Value::Object(fields) = made_by {
        for (k, v) in fields.into_iter().filter(|(_, v)| !v.is_null()) {
            meta[k.as_str()] = v;
        }
    }
    meta["view"] = "center".into();
    meta["skipped"] = run.skipped.len().into();
    crate::io::save(
        path,
        &[
            ("logits", &run.logits),
            ("labels", &labels_tensor(&run.labels)?),
        ],
        &meta,
    )
}

//! Turning resolved checkpoint files into a ready [`Clip`]: config, validated weights, tokenizer
//! and image processor, on the requested device and dtype.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::hub::{self, ModelFiles, WeightFiles};
use super::{ClipConfig, ClipModel, ClipTokenizer, LoadError};
use crate::preprocess::{PreprocessConfig, ResizeTo};

/// `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeArg {
    #[default]
    F32,
    F16,
    Bf16,
}

impl FromStr for DTypeArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(Self::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            _ => Err(format!("unknown dtype `{s}` (expected f32, f16 or bf16)")),
        }
    }
}

impl fmt::Display for DTypeArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

impl DTypeArg {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceArg {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.to_ascii_lowercase();
        match s.as_str() {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown device `{s}` (expected auto, cpu, cuda or cuda:N)"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceArg {
    pub fn device(self) -> anyhow::Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto => {
                if candle_core::utils::cuda_is_available() {
                    if let Ok(d) = Device::new_cuda(0) {
                        return Ok(d);
                    }
                }
                Ok(Device::Cpu)
            }
            Self::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    bail!("--device cuda:{n}: this clipft was built without CUDA support; rebuild with `cargo build --release --features cuda`")
                }
                Device::new_cuda(n)
                    .with_context(|| format!("--device cuda:{n}: could not open the CUDA device"))
            }
        }
    }
}

/// How a model computes on a device: its tensors' dtype, and whether its dense layers take
/// their products in bf16 on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    pub dtype: DType,
    pub bf16_matmul: bool,
}

impl Precision {
    /// Resolves `--dtype` for a device. candle 0.11 has no bf16 matmul on the CPU, so bf16 there
    /// means clipft's bf16 dense layers with f32 activations, on CPUs with AVX512-BF16; other
    /// CPUs fall back to f32 with a warning (the one message the user sees) instead of running
    /// a slower emulation.
    pub fn resolve(requested: DTypeArg, device: &Device) -> (Self, Option<String>) {
        let plain = |dtype| Self {
            dtype,
            bf16_matmul: false,
        };
        match (requested, device) {
            (DTypeArg::Bf16, Device::Cpu) if super::gemm_bf16::native() => (
                Self {
                    dtype: DType::F32,
                    bf16_matmul: true,
                },
                None,
            ),
            (DTypeArg::Bf16, Device::Cpu) => (
                plain(DType::F32),
                Some(
                    "--dtype bf16 on the CPU needs AVX512-BF16 (AMD Zen 4, Intel Cooper Lake or \
                     Sapphire Rapids and later), which this CPU lacks; using f32"
                        .into(),
                ),
            ),
            (r, _) => (plain(r.dtype()), None),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.bf16_matmul {
            write!(
                f,
                "BF16 matmuls ({}), F32 activations",
                super::gemm_bf16::kernel().name()
            )
        } else {
            write!(f, "{:?}", self.dtype)
        }
    }
}

/// What to load: `--model`, `--revision`, `--dtype`, `--device`.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub model: String,
    pub revision: Option<String>,
    pub dtype: DTypeArg,
    pub device: DeviceArg,
    /// Show hub download progress.
    pub progress: bool,
}

impl ModelSpec {
    pub fn local(dir: impl AsRef<Path>) -> Self {
        Self {
            model: dir.as_ref().display().to_string(),
            revision: None,
            dtype: DTypeArg::F32,
            device: DeviceArg::Cpu,
            progress: false,
        }
    }
}

/// A loaded CLIP checkpoint with everything needed to turn images and prompts into features.
pub struct Clip {
    pub model: ClipModel,
    pub tokenizer: ClipTokenizer,
    pub preprocess: PreprocessConfig,
    pub files: ModelFiles,
    pub device: Device,
    /// The dtype of the model's tensors (and of the pixels it takes).
    pub dtype: DType,
    /// `dtype` and how the dense layers multiply: what to report and to key caches on.
    pub precision: Precision,
    /// Stable identity of the weights (paths, sizes, mtimes) and dtype, for feature caches.
    pub fingerprint: String,
    /// Warnings produced while loading (e.g. a dtype fallback), for the caller to show.
    pub warnings: Vec<String>,
    /// The dtypes the checkpoint's weights are stored in (e.g. `["F16"]`), whatever `dtype`
    /// they are computed in.
    pub stored_dtypes: Vec<String>,
    /// `logit_scale.exp()`: the checkpoint's learned temperature (100 for the released CLIP
    /// models), or the config's initial value where the checkpoint has none, as `transformers`.
    pub logit_scale: f64,
    /// [`content_digest`], computed on first use.
    digest: std::sync::OnceLock<String>,
}

impl Clip {
    /// The identity of this checkpoint's content ([`content_digest`]): what artifacts record of
    /// their model, so that a moved or re-saved model is still recognised and another one at
    /// the same path is not taken for it.
    pub fn weights_digest(&self) -> anyhow::Result<&str> {
        if let Some(d) = self.digest.get() {
            return Ok(d);
        }
        let d = content_digest(self.config(), &self.files.weights)?;
        Ok(self.digest.get_or_init(|| d))
    }

    /// Whether an artifact's recorded `digest` is this model: its [`content_digest`], or the
    /// byte-for-byte [`weights_digest`] artifacts recorded before 2026-11-29.
    pub fn has_digest(&self, digest: &str) -> anyhow::Result<bool> {
        Ok(self.weights_digest()? == digest || weights_digest(&self.files)? == digest)
    }

    pub fn load(spec: &ModelSpec) -> anyhow::Result<Self> {
        let mut files = hub::resolve(&spec.model, spec.revision.as_deref(), spec.progress)?;
        let device = spec.device.device()?;
        let (precision, warning) = Precision::resolve(spec.dtype, &device);
        let mut warnings = std::mem::take(&mut files.notes);
        warnings.extend(warning);
        Self::from_files(files, device, precision, warnings)
    }

    pub fn from_files(
        files: ModelFiles,
        device: Device,
        precision: Precision,
        mut warnings: Vec<String>,
    ) -> anyhow::Result<Self> {
        let dtype = precision.dtype;
        let config_text =
            std::fs::read_to_string(&files.config).map_err(|e| LoadError::BadFile {
                path: files.config.clone(),
                msg: e.to_string(),
            })?;
        let config = ClipConfig::from_json(&config_text).map_err(|msg| LoadError::BadFile {
            path: files.config.clone(),
            msg,
        })?;
        let TensorCheck {
            dtypes: stored_dtypes,
            warnings: tensor_warnings,
        } = check_tensors(&files.weights, &config)?;
        warnings.extend(tensor_warnings);
        let vb = weights_var_builder(&files.weights, dtype, &device)?;
        let logit_scale = logit_scale(&vb, &config, &files)?;
        let mut model = ClipModel::new(vb, &config).with_context(|| {
            format!(
                "building the CLIP model from {}",
                files.weights.paths()[0].display()
            )
        })?;
        if precision.bf16_matmul {
            model.pack_bf16()?;
        }
        let tokenizer =
            ClipTokenizer::from_file(&files.tokenizer, config.text_config.max_position_embeddings)?;
        if let Some((id, token)) = tokenizer
            .max_id()
            .filter(|(id, _)| *id as usize >= config.text_config.vocab_size)
        {
            return Err(LoadError::BadFile {
                path: files.tokenizer.clone(),
                msg: format!(
                    "token id {id} (`{token}`) does not fit the text tower's {} embeddings \
                     (config.json)",
                    config.text_config.vocab_size
                ),
            }
            .into());
        }
        check_end_token(&tokenizer, &config, &files.tokenizer)?;
        let preprocess = match &files.preprocessor {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| LoadError::BadFile {
                    path: p.clone(),
                    msg: e.to_string(),
                })?;
                let pre = PreprocessConfig::from_json(&text, config.vision_config.image_size)
                    .map_err(|msg| LoadError::BadFile {
                        path: p.clone(),
                        msg,
                    })?;
                if pre.declines_rgb {
                    warnings.push(format!(
                        "{} sets do_convert_rgb false, which clipft does not follow: every image \
                         is converted to RGB (transformers would refuse grey, palette and \
                         alpha images)",
                        p.display()
                    ));
                }
                pre
            }
            None => PreprocessConfig::openai(config.vision_config.image_size as u32),
        };
        if preprocess.crop
            != (
                config.vision_config.image_size as u32,
                config.vision_config.image_size as u32,
            )
        {
            let path = files.preprocessor.clone().unwrap_or_default();
            return Err(LoadError::BadFile {
                path,
                msg: format!(
                    "crop size {:?} does not match the vision tower's image_size {}",
                    preprocess.crop, config.vision_config.image_size
                ),
            }
            .into());
        }
        if let (false, Some(ResizeTo::Exact(h, w))) = (preprocess.do_center_crop, preprocess.resize)
        {
            if (h, w) != preprocess.crop {
                return Err(LoadError::BadFile {
                    path: files.preprocessor.clone().unwrap_or_default(),
                    msg: format!(
                        "do_center_crop is false and `size` resizes to {w}x{h}, but the vision \
                         tower takes {0}x{0} images",
                        config.vision_config.image_size
                    ),
                }
                .into());
            }
        }
        let fingerprint = fingerprint(&files, precision)?;
        Ok(Self {
            model,
            tokenizer,
            preprocess,
            files,
            device,
            dtype,
            precision,
            fingerprint,
            warnings,
            stored_dtypes,
            logit_scale,
            digest: std::sync::OnceLock::new(),
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.model.config
    }

    /// A short, human-readable description of what was loaded.
    pub fn describe(&self) -> String {
        let c = self.config();
        format!(
            "{} ({}), vision {}x{} hidden {} ({} layers), text hidden {} ({} layers, context {}), embedding dim {}, {} on {}",
            self.files.id,
            c.arch_name(),
            c.vision_config.image_size,
            c.vision_config.image_size,
            c.vision_config.hidden_size,
            c.vision_config.num_hidden_layers,
            c.text_config.hidden_size,
            c.text_config.num_hidden_layers,
            c.text_config.max_position_embeddings,
            c.projection_dim,
            self.precision,
            device_name(&self.device),
        )
    }
}

/// The text tower pools the hidden state of the end token, so a tokenizer that does not end each
/// prompt with it (a `tokenizer.json` without CLIP's post-processor, or an `eos_token_id` in
/// config.json that names another token) would give silently wrong text features.
fn check_end_token(
    tokenizer: &ClipTokenizer,
    config: &ClipConfig,
    path: &Path,
) -> anyhow::Result<()> {
    let ids = tokenizer
        .encode_batch(&["a photo of a dog.".to_string()])?
        .remove(0);
    let last = ids.last().copied();
    let eos = config.text_config.eos_token_id;
    let ok = if eos == 2 {
        // Legacy configs pool at the argmax of the ids: the end token must be the largest id.
        last.is_some_and(|l| ids.iter().all(|&i| i <= l))
    } else {
        last == Some(eos)
    };
    if !ok {
        return Err(LoadError::BadFile {
            path: path.to_path_buf(),
            msg: format!(
                "prompts do not end with the end-of-text token that config.json's text_config.eos_token_id ({eos}) names \
                 (`a photo of a dog.` tokenises to {ids:?}); the text features would be pooled at the wrong token"
            ),
        }
        .into());
    }
    Ok(())
}

/// `logit_scale.exp()` of the checkpoint, or of config.json's `logit_scale_init_value` when the
/// weights have no `logit_scale` (`transformers` initialises it so).
fn logit_scale(vb: &VarBuilder, config: &ClipConfig, files: &ModelFiles) -> anyhow::Result<f64> {
    let log_scale = if vb.contains_tensor("logit_scale") {
        vb.get((), "logit_scale")
            .or_else(|_| vb.get(1, "logit_scale").and_then(|t| t.squeeze(0)))
            .with_context(|| {
                format!(
                    "{}: reading logit_scale",
                    files.weights.paths()[0].display()
                )
            })?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?
    } else {
        config.logit_scale_init_value
    };
    let scale = log_scale.exp();
    anyhow::ensure!(
        scale.is_finite() && scale > 0.0,
        "{}: logit_scale {log_scale} gives a temperature of {scale}",
        files.weights.paths()[0].display()
    );
    Ok(scale)
}

/// A read-only `VarBuilder` over a checkpoint's weight files (memory-mapped safetensors, or a
/// PyTorch pickle read without executing code).
pub fn weights_var_builder(
    weights: &WeightFiles,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<VarBuilder<'static>> {
    Ok(match weights {
        // SAFETY: the files are memory-mapped read-only; clipft never writes to a checkpoint
        // while it is loaded (see candle's `MmapedSafetensors`).
        WeightFiles::Safetensors(paths) => {
            unsafe { VarBuilder::from_mmaped_safetensors(paths, dtype, device) }
                .with_context(|| format!("reading {}", paths[0].display()))?
        }
        WeightFiles::Pth(path) => VarBuilder::from_pth(path, dtype, device)
            .with_context(|| format!("reading {}", path.display()))?,
    })
}

/// Every tensor of a checkpoint's weight files, by name (sorted), on the CPU in its stored dtype:
/// what a derived checkpoint must carry over beyond the tensors clipft's model uses
/// (`logit_scale`, buffers such as `position_ids`).
pub fn all_tensors(weights: &WeightFiles) -> anyhow::Result<Vec<(String, candle_core::Tensor)>> {
    let mut out = Vec::new();
    match weights {
        WeightFiles::Safetensors(paths) => {
            // SAFETY: read-only maps of files clipft does not modify.
            let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(paths) }
                .with_context(|| format!("reading {}", paths[0].display()))?;
            for (name, _) in st.tensors() {
                let t = st
                    .load(&name, &Device::Cpu)
                    .with_context(|| format!("reading tensor {name} of {}", paths[0].display()))?;
                out.push((name, t));
            }
        }
        WeightFiles::Pth(path) => {
            let pth = candle_core::pickle::PthTensors::new(path, None)
                .with_context(|| format!("reading {}", path.display()))?;
            for name in pth.tensor_infos().keys() {
                if let Some(t) = pth
                    .get(name)
                    .with_context(|| format!("reading tensor {name} of {}", path.display()))?
                {
                    out.push((name.clone(), t));
                }
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

pub fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// Whether a file starts like a zip archive (PyTorch's checkpoint format since 1.6).
fn is_zip(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok_and(|_| magic == *b"PK\x03\x04")
}

/// What [`check_tensors`] found beyond errors.
struct TensorCheck {
    /// The dtypes the expected tensors are stored in (sorted, e.g. `["F16"]`), for `clipft info`.
    dtypes: Vec<String>,
    /// Tensors that are there but not used, or optional and missing, as `transformers` warns.
    warnings: Vec<String>,
}

/// Checks every tensor the config calls for against the files' headers before anything is
/// loaded, so a mismatch names the file and tensor instead of failing deep inside the model.
fn check_tensors(weights: &WeightFiles, config: &ClipConfig) -> Result<TensorCheck, LoadError> {
    let mut found: HashMap<String, (PathBuf, Vec<usize>, String)> = HashMap::new();
    match weights {
        WeightFiles::Safetensors(paths) => {
            for p in paths {
                let bad = |msg: String| LoadError::BadFile {
                    path: p.clone(),
                    msg,
                };
                let file = std::fs::File::open(p).map_err(|e| bad(e.to_string()))?;
                // SAFETY: read-only map of a file we do not modify.
                let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| bad(e.to_string()))?;
                let st = safetensors::SafeTensors::deserialize(&mmap)
                    .map_err(|e| bad(crate::io::safetensors_problem(&e)))?;
                for (name, view) in st.tensors() {
                    let dtype = format!("{:?}", view.dtype());
                    found.insert(name, (p.clone(), view.shape().to_vec(), dtype));
                }
            }
        }
        WeightFiles::Pth(p) => {
            let pth =
                candle_core::pickle::PthTensors::new(p, None).map_err(|e| LoadError::BadFile {
                    path: p.clone(),
                    msg: if is_zip(p) {
                        format!("not a readable PyTorch checkpoint: {e}")
                    } else {
                        // torch.save before PyTorch 1.6 (or with the zip format turned off)
                        // wrote a bare pickle stream, which candle does not read.
                        "a legacy (non-zip) PyTorch checkpoint, which clipft cannot read; \
                         convert it once with `CLIPModel.from_pretrained(DIR).save_pretrained(DIR, \
                         safe_serialization=True)` (writes model.safetensors)"
                            .to_string()
                    },
                })?;
            for (name, info) in pth.tensor_infos() {
                found.insert(
                    name.clone(),
                    (
                        p.clone(),
                        info.layout.shape().dims().to_vec(),
                        format!("{:?}", info.dtype).to_uppercase(),
                    ),
                );
            }
        }
    }
    // A layer past the config's count would be silently dropped: the config describes another
    // checkpoint (transformers would refuse the shapes or warn about unused weights).
    let mut names: Vec<&String> = found.keys().collect();
    names.sort();
    for name in names {
        let file = &found[name].0;
        for (tower, layers) in [
            ("vision_model", config.vision_config.num_hidden_layers),
            ("text_model", config.text_config.num_hidden_layers),
        ] {
            let layer = name
                .strip_prefix(tower)
                .and_then(|r| r.strip_prefix(".encoder.layers."))
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok());
            if layer.is_some_and(|i| i >= layers) {
                return Err(LoadError::BadFile {
                    path: file.clone(),
                    msg: format!(
                        "has tensor `{name}`, but config.json gives the {tower} {layers} layer(s): \
                         the config does not describe these weights"
                    ),
                });
            }
        }
    }
    let first = weights.paths()[0].to_path_buf();
    let mut dtypes = std::collections::BTreeSet::new();
    let expected_tensors = config.expected_tensors();
    let mut warnings = Vec::new();
    // Names no CLIP model of this config reads: another architecture's tensors, or damaged
    // names (a flipped byte in `logit_scale` would otherwise silently give the default
    // temperature). Buffers older transformers saved are expected.
    let mut unused: Vec<&String> = found
        .keys()
        .filter(|n| {
            *n != "logit_scale"
                && !n.ends_with(".position_ids")
                && !expected_tensors.iter().any(|(e, _)| e == *n)
        })
        .collect();
    unused.sort();
    if !unused.is_empty() {
        let list = crate::cli::first_few(unused.iter().map(|n| format!("`{n}`")), 5);
        warnings.push(format!(
            "{}: {} tensor(s) that this CLIP model does not use, ignored: {} (another \
             architecture's weights, or a damaged file)",
            first.display(),
            unused.len(),
            list
        ));
    }
    if !found.contains_key("logit_scale") {
        warnings.push(format!(
            "{}: no `logit_scale`; the temperature is exp(logit_scale_init_value {}) = {:.2} from \
             config.json, as transformers initialises it (FD-Align's head uses it)",
            first.display(),
            config.logit_scale_init_value,
            config.logit_scale_init_value.exp()
        ));
    }
    for (name, expected) in expected_tensors {
        if let Some((_, _, dtype)) = found.get(&name) {
            dtypes.insert(dtype.clone());
        }
        match found.get(&name) {
            None => {
                return Err(LoadError::MissingTensor {
                    file: first,
                    name,
                    expected,
                })
            }
            Some((file, shape, _)) if *shape != expected => {
                return Err(LoadError::ShapeMismatch {
                    file: file.clone(),
                    name,
                    expected,
                    found: shape.clone(),
                })
            }
            // (candle's own error names neither the tensor nor what it should be.)
            Some((file, _, dtype)) if !matches!(dtype.as_str(), "F16" | "BF16" | "F32" | "F64") => {
                return Err(LoadError::BadFile {
                    path: file.clone(),
                    msg: format!(
                        "tensor `{name}` is stored as {dtype}; CLIP weights are floating point \
                         (F16, BF16, F32 or F64)"
                    ),
                })
            }
            Some(_) => {}
        }
    }
    Ok(TensorCheck {
        dtypes: dtypes.into_iter().collect(),
        warnings,
    })
}

/// SHA-256 over config.json and every weight file, byte for byte (about 0.3 s per GB with the
/// CPU's SHA instructions; the files are in the page cache once the model is loaded): the
/// digest artifacts recorded before [`content_digest`].
pub fn weights_digest(files: &ModelFiles) -> anyhow::Result<String> {
    let mut paths: Vec<&Path> = vec![&files.config];
    paths.extend(files.weights.paths());
    digest_files(&paths)
}

/// SHA-256 of what a checkpoint computes with: the settings clipft reads from config.json (the
/// parsed [`ClipConfig`], so formatting and keys clipft does not read do not count) and every
/// weight tensor by name, dtype, shape and bytes, in name order (so a re-save with the tensors in
/// another order or other header metadata is the same model). A PyTorch `.bin` counts byte for
/// byte.
pub fn content_digest(config: &ClipConfig, weights: &WeightFiles) -> anyhow::Result<String> {
    use sha2::Digest;
    match weights {
        WeightFiles::Safetensors(paths) => {
            let maps = paths
                .iter()
                .map(|p| {
                    let file = std::fs::File::open(p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    // SAFETY: read-only map of a file clipft does not modify.
                    unsafe { memmap2::Mmap::map(&file) }
                        .with_context(|| format!("reading {}", p.display()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let files: Vec<(&[u8], &Path)> = maps
                .iter()
                .zip(paths)
                .map(|(m, p)| (&m[..], p.as_path()))
                .collect();
            safetensors_digest(config, &files)
        }
        WeightFiles::Pth(p) => {
            let mut h = digest_start(config)?;
            digest_field(&mut h, digest_files(&[p])?.as_bytes());
            Ok(format!("{:x}", h.finalize()))
        }
    }
}

/// [`content_digest`] of a model whose safetensors files hold these bytes (each named by the path
/// it is, or will be, at): for weights still in memory.
pub fn safetensors_digest(config: &ClipConfig, files: &[(&[u8], &Path)]) -> anyhow::Result<String> {
    use sha2::Digest;
    let mut h = digest_start(config)?;
    let mut tensors = Vec::new();
    for (bytes, p) in files {
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| crate::io::bad_safetensors(p, &e))?;
        tensors.extend(st.tensors());
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in tensors {
        digest_field(&mut h, name.as_bytes());
        digest_field(
            &mut h,
            format!("{:?} {:?}", view.dtype(), view.shape()).as_bytes(),
        );
        digest_field(&mut h, view.data());
    }
    Ok(format!("{:x}", h.finalize()))
}

fn digest_field(h: &mut sha2::Sha256, bytes: &[u8]) {
    use sha2::Digest;
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

fn digest_start(config: &ClipConfig) -> anyhow::Result<sha2::Sha256> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    digest_field(&mut h, b"clipft content digest 1");
    digest_field(&mut h, &serde_json::to_vec(config)?);
    Ok(h)
}

/// SHA-256 over the files in order, each as its length and bytes: [`weights_digest`] of a model
/// whose config and weight files these are.
pub fn digest_files(paths: &[&Path]) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in paths {
        let file = std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
        // SAFETY: read-only map of a file clipft does not modify.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("reading {}", p.display()))?;
        h.update((map.len() as u64).to_le_bytes());
        h.update(&map[..]);
    }
    Ok(format!("{:x}", h.finalize()))
}

fn fingerprint(files: &ModelFiles, precision: Precision) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    // f32 keeps the key it always had, so existing caches stay valid.
    h.update(format!("{:?}\n", precision.dtype).as_bytes());
    if precision.bf16_matmul {
        h.update(b"bf16 matmul\n");
        // The kernels round their sums differently (`CLIPFT_BF16_KERNEL` compares them); the
        // `vdpbf16ps` one keeps the key it had before the others.
        let kernel = super::gemm_bf16::kernel();
        if kernel != super::gemm_bf16::Kernel::Avx512Bf16 {
            h.update(format!("{}\n", kernel.name()).as_bytes());
        }
    }
    let mut paths: Vec<&Path> = files.weights.paths();
    paths.push(&files.config);
    for p in paths {
        let meta = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.update(
            format!(
                "{}\t{}\t{}\n",
                p.canonicalize()
                    .unwrap_or_else(|_| p.to_path_buf())
                    .display(),
                meta.len(),
                mtime
            )
            .as_bytes(),
        );
    }
    Ok(format!("{:x}", h.finalize())[..16].to_string())
}

//! Model loading: CLIP checkpoints in the Hugging Face layout, from a folder or the hub.

pub mod attention_cpu;
pub mod clip;
pub mod config;
pub mod cuda;
pub mod gemm_bf16;
pub mod hub;
pub mod kernels;
pub mod load;
pub mod synth;
pub mod tokenizer;
pub mod trainable;
pub mod vmath;

use std::path::PathBuf;

pub use clip::ClipModel;
pub use config::ClipConfig;
pub use load::{Clip, DTypeArg, DeviceArg, ModelSpec, Precision};
pub use tokenizer::ClipTokenizer;

/// What can go wrong while locating or reading a checkpoint. Callers branch on these (e.g. tests
/// and the CLI tell "not downloaded" apart from "corrupt").
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },
    #[error("{}: missing tensor `{name}` (config.json expects shape {expected:?})", file.display())]
    MissingTensor {
        file: PathBuf,
        name: String,
        expected: Vec<usize>,
    },
    #[error("{}: tensor `{name}` has shape {found:?} but config.json expects {expected:?}", file.display())]
    ShapeMismatch {
        file: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{}: required file `{file}` is missing", dir.display())]
    MissingFile { dir: PathBuf, file: String },
    #[error(
        "{}: no weights found (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)",
        dir.display()
    )]
    NoWeights { dir: PathBuf },
    #[error("model directory {} does not exist", .0.display())]
    NoSuchDir(PathBuf),
    #[error(
        "model `{repo}` (revision {revision}) is not in the Hugging Face cache at {} and downloads are \
         disabled (HF_HUB_OFFLINE is set): missing `{file}`.\n  Download it once with network access \
         (`clipft info --model {repo} --revision {revision}`, or `huggingface-cli download {repo} --revision {revision}`), or pass a local folder \
         with config.json, model.safetensors and tokenizer.json to --model",
        cache.display()
    )]
    NotCached {
        repo: String,
        revision: String,
        cache: PathBuf,
        file: String,
    },
    #[error(
        "could not download `{file}` of model `{repo}` (revision {revision}): {msg}\n  If this machine has \
         no network access, download the model elsewhere into the Hugging Face cache ({}) or pass a \
         local folder to --model; set HF_HUB_OFFLINE=1 to skip the network",
        cache.display()
    )]
    Download {
        repo: String,
        revision: String,
        cache: PathBuf,
        file: String,
        msg: String,
    },
    #[error("{0}")]
    Unsupported(String),
}

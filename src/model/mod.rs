//! Model loading: CLIP checkpoints in the Hugging Face layout, from a folder or the hub.

pub mod attention_cpu;
pub mod blas;
pub mod clip;
pub mod config;
pub mod cuda;
pub mod download;
pub mod fused_layer;
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
        "model `{repo}` (revision {revision}) is not in the Hugging Face cache at {} and downloads \
         are disabled (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set): missing {what}.{}\n  \
         Download it once with network access (`clipft info --model {repo} --revision {revision}`, \
         or `hf download {repo} --revision {revision}`), or pass a local folder with config.json, \
         model.safetensors and tokenizer.json to --model",
        cache.display(),
        hub::cached_hint(repo, revision, cached)
    )]
    NotCached {
        repo: String,
        revision: String,
        cache: PathBuf,
        /// The first file missing, or the weights.
        what: String,
        /// The revisions of the repo the cache does hold.
        cached: Vec<hub::CachedRevision>,
    },
    #[error(transparent)]
    Download(Box<DownloadFailure>),
    #[error(
        "revision `{revision}` does not exist in `{repo}` on {endpoint}{}\n  Pass a branch, tag, \
         commit hash or `refs/pr/N` of the repo to --revision",
        hub::cached_hint(repo, revision, cached)
    )]
    RevisionNotFound {
        repo: String,
        revision: String,
        endpoint: String,
        cached: Vec<hub::CachedRevision>,
    },
    #[error(
        "repo `{repo}` not found on {endpoint} (HTTP {status}), or it is private or gated: {}\n  \
         (No folder `{repo}` exists here either, if a local checkpoint was meant.)",
        if *token {
            "the token sent (HF_TOKEN or `hf auth login`) has no access to it"
        } else {
            "set HF_TOKEN to a token with access (or log in with `hf auth login`)"
        }
    )]
    RepoNotFound {
        repo: String,
        endpoint: String,
        status: u16,
        /// Whether a token was sent.
        token: bool,
    },
    #[error(
        "model `{repo}` is gated on {endpoint}: accept its terms at {endpoint}/{repo} with your \
         account, then set HF_TOKEN to a token of that account (or log in with `hf auth login`)"
    )]
    GatedRepo { repo: String, endpoint: String },
    #[error("{0}")]
    Unsupported(String),
}

/// A hub file that could not be had: network, timeout, HTTP error or a body that did not check
/// out ([`LoadError::Download`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "could not download `{file}` of model `{repo}` (revision {revision}) from {url}: {msg}{}{}\n  \
     Check the network connection (timeouts: HF_HUB_ETAG_TIMEOUT, HF_HUB_DOWNLOAD_TIMEOUT, in \
     seconds), or download the model where there is network (`hf download {repo} --revision \
     {revision}`) into the Hugging Face cache ({}), or pass a local folder to --model; set \
     HF_HUB_OFFLINE=1 to use the cache only",
    cache_lacks.as_ref().map_or(String::new(), |(commit, what)| format!(
        "\n  The cache has revision {revision} (commit {}) without {what}, which was to be \
         downloaded (the request above is the revision lookup that comes first)",
        &commit[..commit.len().min(12)]
    )),
    hub::cached_hint(repo, revision, cached),
    cache.display()
)]
pub struct DownloadFailure {
    pub repo: String,
    pub revision: String,
    pub cache: PathBuf,
    pub file: String,
    /// The hub URL of the file (never a signed CDN URL).
    pub url: String,
    pub msg: String,
    /// The revisions of the repo the cache does hold.
    pub cached: Vec<hub::CachedRevision>,
    /// When the cache has the revision's commit but not all of it: the commit and what is
    /// missing (the failed request, the revision lookup, names another file).
    pub cache_lacks: Option<(String, String)>,
}

//! Locating checkpoint files: a local folder, or a Hugging Face repo id resolved through the
//! standard HF cache (`HF_HUB_CACHE`, `HF_HOME`, `HF_HUB_OFFLINE`, `HF_ENDPOINT`, `HF_TOKEN`).

use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use super::LoadError;

/// The default model and the revision used for it when none is given: `openai/clip-vit-base-patch32`
/// keeps only `pytorch_model.bin` on `main`; its safetensors conversion is the PR ref below (the one
/// candle's own CLIP example pins). Other repos default to `main`, where `pytorch_model.bin` is
/// read with candle's pickle reader (which executes no code) if there is no safetensors file.
pub const DEFAULT_MODEL: &str = "openai/clip-vit-base-patch32";
pub const DEFAULT_MODEL_REVISION: &str = "refs/pr/15";

/// Where the weights of a checkpoint live.
#[derive(Debug, Clone, PartialEq)]
pub enum WeightFiles {
    Safetensors(Vec<PathBuf>),
    /// A PyTorch pickle (`pytorch_model.bin`), read without executing code.
    Pth(PathBuf),
}

impl WeightFiles {
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            WeightFiles::Safetensors(v) => v.iter().map(|p| p.as_path()).collect(),
            WeightFiles::Pth(p) => vec![p.as_path()],
        }
    }
}

/// Resolved files of a checkpoint.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// What the user asked for (a repo id or the canonical folder path).
    pub id: String,
    pub revision: Option<String>,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    pub preprocessor: Option<PathBuf>,
    pub weights: WeightFiles,
}

impl ModelFiles {
    /// Every file of the checkpoint, each with what it is (for error messages).
    pub fn inputs(&self) -> Vec<(&Path, &'static str)> {
        let mut v = vec![
            (self.config.as_path(), "the model's config.json"),
            (self.tokenizer.as_path(), "the model's tokenizer.json"),
        ];
        if let Some(p) = &self.preprocessor {
            v.push((p.as_path(), "the model's preprocessor_config.json"));
        }
        v.extend(
            self.weights
                .paths()
                .into_iter()
                .map(|p| (p, "a weights file of the model")),
        );
        v
    }
}

/// The hub cache folder, as `huggingface_hub` computes it.
pub fn hub_cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|s| !s.is_empty()) {
        return PathBuf::from(p);
    }
    Cache::from_env().path().clone()
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

fn looks_like_path(s: &str) -> bool {
    s.starts_with('.') || s.starts_with('/') || s.starts_with('~') || s.matches('/').count() != 1
}

/// Resolves `--model` (a folder or a repo id) and `--revision` to files on disk, downloading from
/// the hub if needed and allowed.
pub fn resolve(
    model: &str,
    revision: Option<&str>,
    progress: bool,
) -> Result<ModelFiles, LoadError> {
    let path = Path::new(model);
    if path.is_dir() {
        return resolve_dir(path);
    }
    if path.exists() {
        return Err(LoadError::BadFile {
            path: path.to_path_buf(),
            msg: "--model must be a checkpoint folder or a Hugging Face repo id, not a file".into(),
        });
    }
    if looks_like_path(model) {
        return Err(LoadError::NoSuchDir(path.to_path_buf()));
    }
    let revision = revision.map(str::to_string).unwrap_or_else(|| {
        if model == DEFAULT_MODEL {
            DEFAULT_MODEL_REVISION
        } else {
            "main"
        }
        .to_string()
    });
    resolve_hub(model, &revision, progress)
}

fn resolve_dir(dir: &Path) -> Result<ModelFiles, LoadError> {
    let dir = dir.canonicalize().map_err(|e| LoadError::BadFile {
        path: dir.to_path_buf(),
        msg: e.to_string(),
    })?;
    let need = |name: &str| {
        let p = dir.join(name);
        if p.is_file() {
            Ok(p)
        } else {
            Err(LoadError::MissingFile {
                dir: dir.clone(),
                file: name.to_string(),
            })
        }
    };
    let config = need("config.json")?;
    let tokenizer = need("tokenizer.json")?;
    let preprocessor = Some(dir.join("preprocessor_config.json")).filter(|p| p.is_file());
    let weights = if dir.join("model.safetensors").is_file() {
        WeightFiles::Safetensors(vec![dir.join("model.safetensors")])
    } else if dir.join("model.safetensors.index.json").is_file() {
        let index = dir.join("model.safetensors.index.json");
        let shards = shard_names(&index)?;
        let files = shards
            .iter()
            .map(|s| need(s))
            .collect::<Result<Vec<_>, _>>()?;
        WeightFiles::Safetensors(files)
    } else if dir.join("pytorch_model.bin").is_file() {
        WeightFiles::Pth(dir.join("pytorch_model.bin"))
    } else {
        return Err(LoadError::NoWeights { dir });
    };
    Ok(ModelFiles {
        id: dir.display().to_string(),
        revision: None,
        config,
        tokenizer,
        preprocessor,
        weights,
    })
}

/// Shard file names listed in a `model.safetensors.index.json`, sorted and deduplicated.
pub fn shard_names(index: &Path) -> Result<Vec<String>, LoadError> {
    let bad = |msg: String| LoadError::BadFile {
        path: index.to_path_buf(),
        msg,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut names: Vec<String> = map
        .values()
        .map(|f| {
            f.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad("`weight_map` values must be file names".into()))
        })
        .collect::<Result<_, _>>()?;
    names.sort();
    names.dedup();
    if names.iter().any(|n| n.contains("..") || n.starts_with('/')) {
        return Err(bad("shard names must be plain file names".into()));
    }
    Ok(names)
}

/// Whether a revision is a full commit hash (40 hex digits) rather than a branch, tag or ref.
fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

fn resolve_hub(repo_id: &str, revision: &str, progress: bool) -> Result<ModelFiles, LoadError> {
    let cache_dir = hub_cache_dir();
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let cached = Cache::new(cache_dir.clone()).repo(repo.clone());
    let offline = offline();
    let api = if offline {
        None
    } else {
        let token = std::env::var("HF_TOKEN").ok().filter(|t| !t.is_empty());
        let mut builder = ApiBuilder::from_env()
            .with_cache_dir(cache_dir.clone())
            .with_progress(progress);
        if token.is_some() {
            builder = builder.with_token(token);
        }
        Some(builder.build().map_err(|e| LoadError::Download {
            repo: repo_id.into(),
            revision: revision.into(),
            cache: cache_dir.clone(),
            file: "config.json".into(),
            msg: e.to_string(),
        })?)
    };
    // Ok(None) = the file does not exist in the repo (HTTP 404); errors are real failures.
    let fetch = |file: &str| -> Result<Option<PathBuf>, LoadError> {
        if let Some(p) = cached.get(file) {
            return Ok(Some(p));
        }
        // A commit hash names its snapshot folder directly; `huggingface_hub` writes no ref
        // for it.
        if is_commit_hash(revision) {
            let p = cache_dir
                .join(repo.folder_name())
                .join("snapshots")
                .join(revision)
                .join(file);
            if p.exists() {
                return Ok(Some(p));
            }
        }
        let Some(api) = &api else {
            return Err(LoadError::NotCached {
                repo: repo_id.into(),
                revision: revision.into(),
                cache: cache_dir.clone(),
                file: file.into(),
            });
        };
        match api.repo(repo.clone()).get(file) {
            Ok(p) => Ok(Some(p)),
            // Only the status code says "no such file" (the URL itself may contain "404").
            Err(ApiError::RequestError(e)) if matches!(*e, ureq::Error::Status(404, _)) => Ok(None),
            Err(e) => Err(LoadError::Download {
                repo: repo_id.into(),
                revision: revision.into(),
                cache: cache_dir.clone(),
                file: file.into(),
                msg: e.to_string(),
            }),
        }
    };
    let required = |file: &str| -> Result<PathBuf, LoadError> {
        fetch(file)?.ok_or_else(|| LoadError::MissingFile {
            dir: PathBuf::from(format!("{repo_id}@{revision}")),
            file: file.into(),
        })
    };
    let config = required("config.json")?;
    let tokenizer = required("tokenizer.json")?;
    // Optional: the processor defaults follow from the vision config when it is absent.
    let preprocessor = match fetch("preprocessor_config.json") {
        Ok(p) => p,
        Err(LoadError::NotCached { .. }) => None,
        Err(e) => return Err(e),
    };
    // Offline, a weights format that is not cached is just "not this one"; report the first.
    let try_fetch = |file: &str| match fetch(file) {
        Err(LoadError::NotCached { .. }) => Ok(None),
        other => other,
    };
    let weights = if let Some(p) = try_fetch("model.safetensors")? {
        WeightFiles::Safetensors(vec![p])
    } else if let Some(index) = try_fetch("model.safetensors.index.json")? {
        let files = shard_names(&index)?
            .iter()
            .map(|s| required(s))
            .collect::<Result<Vec<_>, _>>()?;
        WeightFiles::Safetensors(files)
    } else if let Some(p) = try_fetch("pytorch_model.bin")? {
        WeightFiles::Pth(p)
    } else if offline {
        return Err(LoadError::NotCached {
            repo: repo_id.into(),
            revision: revision.into(),
            cache: cache_dir,
            file: "model.safetensors".into(),
        });
    } else {
        return Err(LoadError::NoWeights {
            dir: PathBuf::from(format!("{repo_id}@{revision}")),
        });
    };
    Ok(ModelFiles {
        id: repo_id.to_string(),
        revision: Some(revision.to_string()),
        config,
        tokenizer,
        preprocessor,
        weights,
    })
}

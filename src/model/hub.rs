//! Locating checkpoint files: a local folder, or a Hugging Face repo id resolved through the
//! standard HF cache, cache first, downloading what is missing ([`super::download`]) unless
//! offline. Environment as `huggingface_hub`: `HF_HUB_CACHE`, `HF_HOME`, `HF_HUB_OFFLINE`,
//! `TRANSFORMERS_OFFLINE`, `HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_ETAG_TIMEOUT`,
//! `HF_HUB_DOWNLOAD_TIMEOUT`, `HF_HUB_DISABLE_PROGRESS_BARS`.

use std::path::{Path, PathBuf};

pub use super::download::CachedRevision;
use super::download::{self, env_truthy, env_var, expand_home, Client, HubError, RepoCache};
use super::{DownloadFailure, LoadError};

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
    /// Warnings about how the files were found (offline without `preprocessor_config.json`),
    /// for the loader to pass on.
    pub notes: Vec<String>,
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

/// The hub cache folder, as `huggingface_hub` computes it: `HF_HUB_CACHE`, else the legacy
/// `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub` (`HF_HOME`: else `$XDG_CACHE_HOME/huggingface`,
/// else `~/.cache/huggingface`), a leading `~` expanded.
pub fn hub_cache_dir() -> PathBuf {
    env_var("HF_HUB_CACHE")
        .or_else(|| env_var("HUGGINGFACE_HUB_CACHE"))
        .map(|p| expand_home(&p))
        .unwrap_or_else(|| download::hf_home().join("hub"))
}

/// `HF_HUB_OFFLINE`, else `TRANSFORMERS_OFFLINE` (the first one set decides, as in
/// `huggingface_hub`), truthy: 1, true, yes or on in any case.
pub fn offline() -> bool {
    env_truthy(env_var("HF_HUB_OFFLINE").or_else(|| env_var("TRANSFORMERS_OFFLINE")))
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
    // It names files under refs/ in the cache.
    if revision.is_empty()
        || revision.starts_with('/')
        || revision
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(LoadError::Unsupported(format!(
            "--revision `{revision}` is not a branch, tag, commit hash or ref"
        )));
    }
    resolve_hub(model, &revision, progress)
}

/// Why `path`, which is not a regular file, cannot be read as one: `None` when nothing is there.
fn not_a_file(path: &Path) -> Option<LoadError> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    let msg = if meta.is_dir() {
        "a folder, not a file"
    } else if meta.file_type().is_symlink() {
        match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => "a link to a folder, not a file",
            Ok(_) => "a link to something that is not a file",
            Err(_) => "a link to a file that does not exist",
        }
    } else {
        "not a regular file"
    };
    Some(LoadError::BadFile {
        path: path.to_path_buf(),
        msg: msg.into(),
    })
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
            Err(not_a_file(&p).unwrap_or_else(|| LoadError::MissingFile {
                dir: dir.clone(),
                file: name.to_string(),
            }))
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
        // A weight file that is there but cannot be read as one says so.
        let there = [
            "model.safetensors",
            "model.safetensors.index.json",
            "pytorch_model.bin",
        ]
        .into_iter()
        .find_map(|name| not_a_file(&dir.join(name)));
        return Err(there.unwrap_or(LoadError::NoWeights { dir }));
    };
    Ok(ModelFiles {
        id: dir.display().to_string(),
        revision: None,
        config,
        tokenizer,
        preprocessor,
        weights,
        notes: Vec::new(),
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

const CONFIG: &str = "config.json";
const TOKENIZER: &str = "tokenizer.json";
const PREPROCESSOR: &str = "preprocessor_config.json";
const SAFETENSORS: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";
const PICKLE: &str = "pytorch_model.bin";

/// The "cached revisions" part of hub messages: what else of `repo` the cache holds, and the
/// `--revision` that takes it. (The default model asks for `refs/pr/15`; `transformers` users
/// have its `main`.)
pub fn cached_hint(repo: &str, revision: &str, cached: &[CachedRevision]) -> String {
    if cached.is_empty() {
        return format!("\n  No complete revision of `{repo}` is in the cache.");
    }
    let list: Vec<String> = cached
        .iter()
        .map(|r| match r.name == r.commit {
            true => format!("commit {}", r.commit),
            false => format!(
                "{} (commit {})",
                r.name,
                &r.commit[..r.commit.len().min(12)]
            ),
        })
        .collect();
    let mut s = format!("\n  Cached revisions of `{repo}`: {}.", list.join(", "));
    if let Some(other) = cached
        .iter()
        .find(|r| r.name != revision && r.commit != revision)
    {
        s += &format!(" To use one, pass `--revision {}`", other.name);
        if repo == DEFAULT_MODEL && revision == DEFAULT_MODEL_REVISION {
            s += &format!(
                " (without --revision, clipft asks for {DEFAULT_MODEL_REVISION}, the safetensors \
                 conversion of {DEFAULT_MODEL})"
            );
        }
        s.push('.');
    }
    s
}

/// What the cache holds of one commit.
enum Cached {
    Found(ModelFiles),
    /// The first file (or the weights) absent, for messages.
    Missing(String),
}

/// A repo id at a revision, resolved against its folder in the hub cache.
struct HubModel<'a> {
    repo_id: &'a str,
    revision: &'a str,
    cache_dir: PathBuf,
    cache: RepoCache,
}

fn resolve_hub(repo_id: &str, revision: &str, progress: bool) -> Result<ModelFiles, LoadError> {
    let cache_dir = hub_cache_dir();
    let m = HubModel {
        repo_id,
        revision,
        cache: RepoCache::new(&cache_dir, repo_id),
        cache_dir,
    };
    let offline = offline();
    // Cache first: a complete checkpoint needs no network (nor can a network failure stop it).
    // A commit hash names its snapshot; `huggingface_hub` writes no ref for one.
    let commit = match download::is_commit_hash(revision) {
        true => Some(revision.to_string()),
        false => m.cache.ref_commit(revision),
    };
    let mut lacks = None;
    if let Some(commit) = commit {
        match m.cached(&commit, offline)? {
            Cached::Found(files) => return Ok(files),
            Cached::Missing(what) => lacks = Some((commit, what)),
        }
    }
    if offline {
        return Err(LoadError::NotCached {
            repo: repo_id.into(),
            revision: revision.into(),
            cache: m.cache_dir.clone(),
            what: lacks.map_or_else(
                || format!("every file (revision {revision} was never downloaded)"),
                |(_, what)| what,
            ),
            cached: m.complete_revisions(),
        });
    }
    m.download(&Client::from_env(progress), lacks)
}

impl HubModel<'_> {
    /// The resolved files of this repo at this revision.
    fn files(
        &self,
        config: PathBuf,
        tokenizer: PathBuf,
        preprocessor: Option<PathBuf>,
        weights: WeightFiles,
        notes: Vec<String>,
    ) -> ModelFiles {
        ModelFiles {
            id: self.repo_id.to_string(),
            revision: Some(self.revision.to_string()),
            config,
            tokenizer,
            preprocessor,
            weights,
            notes,
        }
    }

    fn id(&self) -> PathBuf {
        PathBuf::from(format!("{}@{}", self.repo_id, self.revision))
    }

    /// The revisions of the repo with a whole checkpoint in the cache (what a message may
    /// suggest instead: not the snapshot a failed download left).
    fn complete_revisions(&self) -> Vec<CachedRevision> {
        let mut v = self.cache.revisions();
        v.retain(|r| matches!(self.cached(&r.commit, true), Ok(Cached::Found(_))));
        v
    }

    fn missing(&self, file: &str) -> LoadError {
        LoadError::MissingFile {
            dir: self.id(),
            file: file.into(),
        }
    }

    /// The checkpoint at `commit` from the cache alone. A `.no_exist` marker of a required file
    /// is an error when `offline` (else the hub is asked again: the marker may be of an older
    /// commit of a branch); offline, a preprocessor config neither cached nor marked missing is
    /// taken as absent, with a note.
    fn cached(&self, commit: &str, offline: bool) -> Result<Cached, LoadError> {
        let c = &self.cache;
        let need = |file: &str| match c.file(commit, file) {
            Some(p) => Ok(Some(p)),
            None if offline && c.known_missing(commit, file) => Err(self.missing(file)),
            None => Ok(None),
        };
        let absent = |file: &str| Ok(Cached::Missing(format!("`{file}`")));
        let Some(config) = need(CONFIG)? else {
            return absent(CONFIG);
        };
        let Some(tokenizer) = need(TOKENIZER)? else {
            return absent(TOKENIZER);
        };
        let mut notes = Vec::new();
        let preprocessor = match c.file(commit, PREPROCESSOR) {
            Some(p) => Some(p),
            None if c.known_missing(commit, PREPROCESSOR) => None,
            None if offline => {
                notes.push(format!(
                    "`{PREPROCESSOR}` of `{}` (revision {}) is not in the Hugging Face cache and \
                     downloads are disabled: using the default CLIP preprocessing (bicubic \
                     resize, centre crop, OpenAI mean and std), which may not be this model's",
                    self.repo_id, self.revision
                ));
                None
            }
            None => return absent(PREPROCESSOR),
        };
        let Some(weights) = self.cached_weights(commit, offline)? else {
            return Ok(Cached::Missing(format!(
                "the weights (none of `{SAFETENSORS}`, `{INDEX}` with its shards, `{PICKLE}` is cached)"
            )));
        };
        Ok(Cached::Found(self.files(
            config,
            tokenizer,
            preprocessor,
            weights,
            notes,
        )))
    }

    /// The first weights format complete in the snapshot of `commit`, in clipft's order. When
    /// `definitive` and the hub said none exists, [`LoadError::NoWeights`].
    fn cached_weights(
        &self,
        commit: &str,
        definitive: bool,
    ) -> Result<Option<WeightFiles>, LoadError> {
        let c = &self.cache;
        if let Some(p) = c.file(commit, SAFETENSORS) {
            return Ok(Some(WeightFiles::Safetensors(vec![p])));
        }
        if let Some(index) = c.file(commit, INDEX) {
            let shards: Option<Vec<PathBuf>> = shard_names(&index)?
                .iter()
                .map(|s| c.file(commit, s))
                .collect();
            if let Some(shards) = shards {
                return Ok(Some(WeightFiles::Safetensors(shards)));
            }
        }
        if let Some(p) = c.file(commit, PICKLE) {
            return Ok(Some(WeightFiles::Pth(p)));
        }
        if definitive
            && [SAFETENSORS, INDEX, PICKLE]
                .iter()
                .all(|f| c.known_missing(commit, f))
        {
            return Err(LoadError::NoWeights { dir: self.id() });
        }
        Ok(None)
    }

    /// Online: resolves the revision to a commit (with the metadata of `config.json`), then
    /// takes each file from that commit's snapshot, or downloads it, asking for it at the commit
    /// so that every file comes from the same one.
    /// `lacks`: what the cache holds of the revision's commit but not (for messages).
    fn download(
        &self,
        client: &Client,
        lacks: Option<(String, String)>,
    ) -> Result<ModelFiles, LoadError> {
        let first = match client.head(self.repo_id, self.revision, CONFIG) {
            Ok(r) => r,
            Err(HubError::EntryNotFound { commit: Some(c) }) if download::is_commit_hash(&c) => {
                self.cache.mark_missing(&c, CONFIG);
                return Err(self.missing(CONFIG));
            }
            Err(e) => {
                return Err(match self.hub_error(client, CONFIG, e) {
                    LoadError::Download(mut f) => {
                        f.cache_lacks = lacks;
                        LoadError::Download(f)
                    }
                    other => other,
                })
            }
        };
        let commit = first.commit.clone();
        // Ok(None): the hub says the file does not exist (recorded in `.no_exist`).
        let fetch = |file: &str| -> Result<Option<PathBuf>, LoadError> {
            if let Some(p) = self.cache.file(&commit, file) {
                return Ok(Some(p));
            }
            if self.cache.known_missing(&commit, file) {
                return Ok(None);
            }
            let remote = match file {
                CONFIG => first.clone(),
                _ => match client.head(self.repo_id, &commit, file) {
                    Ok(r) => r,
                    Err(HubError::EntryNotFound { .. }) => {
                        self.cache.mark_missing(&commit, file);
                        return Ok(None);
                    }
                    Err(e) => return Err(self.hub_error(client, file, e)),
                },
            };
            client
                .download(&self.cache, &remote, file)
                .map(Some)
                .map_err(|e| self.hub_error(client, file, e))
        };
        let required = |file: &str| fetch(file)?.ok_or_else(|| self.missing(file));
        let config = required(CONFIG)?;
        let tokenizer = required(TOKENIZER)?;
        // Optional, but a network error on it is an error like any: only the hub's "no such
        // file" means the defaults apply.
        let preprocessor = fetch(PREPROCESSOR)?;
        let weights = if let Some(w) = self.cached_weights(&commit, true)? {
            w
        } else if let Some(p) = fetch(SAFETENSORS)? {
            WeightFiles::Safetensors(vec![p])
        } else if let Some(index) = fetch(INDEX)? {
            let files = shard_names(&index)?
                .iter()
                .map(|s| required(s))
                .collect::<Result<Vec<_>, _>>()?;
            WeightFiles::Safetensors(files)
        } else if let Some(p) = fetch(PICKLE)? {
            WeightFiles::Pth(p)
        } else {
            return Err(LoadError::NoWeights { dir: self.id() });
        };
        // Only now that the checkpoint is whole does the revision point at its commit (the
        // snapshot of a failed run is reused, but no ref claims it). Best effort, as
        // `huggingface_hub`: a read-only cache that had every file still serves.
        let _ = self.cache.write_ref(self.revision, &commit);
        Ok(self.files(config, tokenizer, preprocessor, weights, Vec::new()))
    }

    fn hub_error(&self, client: &Client, file: &str, e: HubError) -> LoadError {
        let repo = self.repo_id.to_string();
        let endpoint = client.endpoint().to_string();
        match e {
            HubError::RevisionNotFound => LoadError::RevisionNotFound {
                repo,
                revision: self.revision.into(),
                endpoint,
                cached: self.complete_revisions(),
            },
            HubError::RepoNotFound { status } => LoadError::RepoNotFound {
                repo,
                endpoint,
                status,
                token: client.has_token(),
            },
            HubError::Gated => LoadError::GatedRepo { repo, endpoint },
            HubError::EntryNotFound { .. } => self.missing(file),
            HubError::Failed { url, msg } => LoadError::Download(Box::new(DownloadFailure {
                repo,
                revision: self.revision.into(),
                cache: self.cache_dir.clone(),
                file: file.into(),
                url,
                msg,
                cached: self.complete_revisions(),
                cache_lacks: None,
            })),
        }
    }
}

//! clipft's client for the Hugging Face hub's file endpoint
//! (`{HF_ENDPOINT}/{repo}/resolve/{revision}/{file}`) and writer of the standard hub cache, in
//! the layout `huggingface_hub` reads and writes (so Python tools share the files):
//!
//! ```text
//! models--org--name/
//!   blobs/<etag>              the bytes (etag: git sha1, or the sha256 of an LFS file)
//!   blobs/<etag>.incomplete   a download in progress; the next attempt resumes from it
//!   snapshots/<commit>/<file> relative symlink to ../../blobs/<etag>
//!   refs/<revision>           the commit a branch, tag or PR ref pointed to
//!   .no_exist/<commit>/<file> empty: the hub said the file does not exist at that commit
//! ```
//!
//! It follows `huggingface_hub`'s `hf_hub_download` (`file_download.py`) where hf-hub 0.4's sync
//! API fell short: every request has connect and read timeouts, the body is retried from where it
//! stopped, its size (and the sha256 of an LFS file) is checked before anything enters the cache,
//! the token never leaves the hub on a redirect, and hub errors are told apart by `X-Error-Code`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::interrupt;

/// Redirects followed before giving up (httpx's default, as `huggingface_hub`).
const MAX_REDIRECTS: usize = 20;
/// Retries of a metadata request answered with one of [`RETRY_STATUS`].
const RETRIES: usize = 5;
/// `huggingface_hub`'s `_DEFAULT_RETRY_ON_STATUS_CODES`.
const RETRY_STATUS: [u16; 6] = [408, 429, 500, 502, 503, 504];
/// Body attempts after the first that brought no new bytes (`huggingface_hub` allows 5 with a
/// 10 s timeout; 3 keeps a dead server's cost near 4 timeouts). An attempt that got further than
/// any before resets the count, so a slow but moving download is never cut.
const BODY_RETRIES: u32 = 3;
const RETRY_PAUSE: Duration = Duration::from_secs(1);
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// `huggingface_hub`'s `CACHEDIR_TAG_CONTENT`: backup tools skip the cache.
const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by huggingface_hub.\n\
# For information about cache directory tags, see:\n\
#\thttps://bford.info/cachedir/\n";

/// What went wrong talking to the hub; [`super::hub`] turns it into a [`super::LoadError`].
#[derive(Debug)]
pub enum HubError {
    /// `X-Error-Code: RevisionNotFound`.
    RevisionNotFound,
    /// `X-Error-Code: RepoNotFound`, or a 401: missing, private or gated without a token.
    RepoNotFound { status: u16 },
    /// `X-Error-Code: GatedRepo` (403).
    Gated,
    /// `X-Error-Code: EntryNotFound`: the file is not in the repo at `commit`.
    EntryNotFound { commit: Option<String> },
    /// Any other failure of `url` (network, timeout, HTTP status, a bad or short body, disk).
    Failed { url: String, msg: String },
}

/// A file as the hub describes it (`huggingface_hub`'s `HfFileMetadata`).
#[derive(Debug, Clone)]
pub struct Remote {
    /// `X-Repo-Commit`: the commit the revision resolved to.
    pub commit: String,
    /// `X-Linked-Etag` or `ETag`, unquoted: the blob's name in the cache.
    pub etag: String,
    /// `X-Linked-Size`, else `Content-Length` of a non-redirect answer.
    pub size: Option<u64>,
    /// The hub URL asked (for messages: never a signed CDN URL).
    pub url: String,
    /// Where the body is fetched: the hub URL, or the CDN a redirect pointed to.
    location: String,
    /// Whether `location` may see the token (a hub origin).
    auth: bool,
}

/// Hub settings from the environment, read as `huggingface_hub`'s `constants.py` does.
pub struct Client {
    /// Metadata requests: `HF_HUB_ETAG_TIMEOUT` for connecting and for each read.
    meta: [ureq::Agent; 2],
    /// Bodies: `HF_HUB_DOWNLOAD_TIMEOUT` likewise (a stall longer than that is retried).
    body: [ureq::Agent; 2],
    endpoint: String,
    token: Option<String>,
    etag_timeout: u64,
    download_timeout: u64,
    progress: bool,
}

/// `huggingface_hub`'s `_is_true`: 1, true, yes, on in any case.
pub fn env_truthy(value: Option<String>) -> bool {
    value.is_some_and(|v| matches!(v.to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE"))
}

/// A non-empty environment variable.
pub fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `os.path.expanduser` for the leading `~` of a path from the environment.
pub fn expand_home(p: &str) -> PathBuf {
    let home = || std::env::var_os("HOME").map(PathBuf::from);
    match p.strip_prefix('~') {
        Some("") => home().unwrap_or_else(|| p.into()),
        Some(rest) if rest.starts_with('/') => match home() {
            Some(h) => h.join(&rest[1..]),
            None => p.into(),
        },
        _ => p.into(),
    }
}

/// `$XDG_CACHE_HOME`, else `~/.cache` (the temporary folder without a home): the base of both
/// the Hugging Face cache and clipft's feature cache.
pub fn user_cache_dir() -> PathBuf {
    match env_var("XDG_CACHE_HOME") {
        Some(x) => expand_home(&x),
        None => std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cache"))
            .unwrap_or_else(std::env::temp_dir),
    }
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    match env_var("HF_HOME") {
        Some(h) => expand_home(&h),
        None => user_cache_dir().join("huggingface"),
    }
}

/// `HF_TOKEN` (or the legacy `HUGGING_FACE_HUB_TOKEN`), else the file at `HF_TOKEN_PATH`, else
/// `$HF_HOME/token` (what `hf auth login` writes); line breaks and spaces removed, as
/// `huggingface_hub`'s `_clean_token`.
fn token() -> Option<String> {
    let clean =
        |t: String| Some(t.replace(['\r', '\n'], "").trim().to_string()).filter(|t| !t.is_empty());
    if let Some(t) = env_var("HF_TOKEN").or_else(|| env_var("HUGGING_FACE_HUB_TOKEN")) {
        return clean(t);
    }
    let path = env_var("HF_TOKEN_PATH")
        .map(|p| expand_home(&p))
        .unwrap_or_else(|| hf_home().join("token"));
    std::fs::read_to_string(path).ok().and_then(clean)
}

/// A whole number of seconds from the environment, else `default` (`constants._as_int(..) or
/// default`: 0 or a bad value means the default).
fn env_secs(name: &str, default: u64) -> u64 {
    env_var(name)
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .unwrap_or(default)
}

/// Two agents with the same timeouts: `[direct, through the proxy]`. The proxy is the one
/// `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` name (as `requests` reads them for
/// `huggingface_hub`); ureq 2 does not read `NO_PROXY`, so [`bypasses_proxy`] does.
fn agents(timeout: u64) -> [ureq::Agent; 2] {
    let t = Duration::from_secs(timeout);
    let build = |proxy: bool| {
        ureq::AgentBuilder::new()
            .timeout_connect(t)
            .timeout_read(t)
            .timeout_write(t)
            .try_proxy_from_env(proxy)
            // Redirects are followed by hand: the token must not follow one off the hub.
            .redirects(0)
            .user_agent(concat!("clipft/", env!("CARGO_PKG_VERSION")))
            .build()
    };
    [build(false), build(true)]
}

/// Whether `url`'s host is reached directly: loopback, or listed in `NO_PROXY` (host names and
/// domain suffixes, comma separated, `*` for all), as `requests` decides.
fn bypasses_proxy(url: &str) -> bool {
    let Some(host) = url::Url::parse(url).ok().and_then(|u| {
        u.host_str()
            .map(|h| h.trim_matches(['[', ']']).to_ascii_lowercase())
    }) else {
        return true;
    };
    if host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
    {
        return true;
    }
    let no_proxy = env_var("NO_PROXY").or_else(|| env_var("no_proxy"));
    no_proxy_lists(&host, &no_proxy.unwrap_or_default())
}

/// Whether a `NO_PROXY` list names `host` (lower case): an entry equal to it, a domain it is
/// in (`example.com` or `.example.com`), or `*`.
fn no_proxy_lists(host: &str, list: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .any(|entry| {
            let entry = entry.trim_start_matches('.').to_ascii_lowercase();
            entry == "*" || host == entry || host.ends_with(&format!(".{entry}"))
        })
}

impl Client {
    pub fn from_env(progress: bool) -> Self {
        let etag_timeout = env_secs("HF_HUB_ETAG_TIMEOUT", 10);
        let download_timeout = env_secs("HF_HUB_DOWNLOAD_TIMEOUT", 10);
        let endpoint = env_var("HF_ENDPOINT").unwrap_or_else(|| DEFAULT_ENDPOINT.into());
        Self {
            meta: agents(etag_timeout),
            body: agents(download_timeout),
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token: token(),
            etag_timeout,
            download_timeout,
            progress: progress && !env_truthy(std::env::var("HF_HUB_DISABLE_PROGRESS_BARS").ok()),
        }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// `hf_hub_url`: the revision quoted whole (`refs/pr/15` -> `refs%2Fpr%2F15`), the file name
    /// with its slashes kept.
    pub fn file_url(&self, repo_id: &str, revision: &str, file: &str) -> String {
        format!(
            "{}/{repo_id}/resolve/{}/{}",
            self.endpoint,
            quote(revision, false),
            quote(file, true)
        )
    }

    fn request(
        &self,
        agents: &[ureq::Agent; 2],
        method: &str,
        url: &str,
        auth: bool,
    ) -> ureq::Request {
        let agent = &agents[usize::from(!bypasses_proxy(url))];
        // The exact bytes: sizes are checked against the hub's, and a range of a compressed
        // body could not be resumed.
        let req = agent
            .request(method, url)
            .set("Accept-Encoding", "identity");
        match (&self.token, auth) {
            (Some(t), true) => req.set("Authorization", &format!("Bearer {t}")),
            _ => req,
        }
    }

    /// `get_hf_file_metadata`: a HEAD request that follows redirects staying on the hub (a
    /// renamed repo) with the token, and stops at one to another host (the CDN holding an LFS
    /// file), whose answer carries the metadata and whose target gets no token.
    pub fn head(&self, repo_id: &str, revision: &str, file: &str) -> Result<Remote, HubError> {
        let start = self.file_url(repo_id, revision, file);
        let mut url = start.clone();
        let (mut redirects, mut retries) = (0, 0);
        loop {
            let resp = match self.request(&self.meta, "HEAD", &url, true).call() {
                Ok(r) => r,
                // "Try again later" (rate limit, overload): retried as `huggingface_hub`'s
                // `http_backoff` does, waiting 1, 2, 4, 8, 8 s or what Retry-After asks.
                Err(ureq::Error::Status(status, r))
                    if RETRY_STATUS.contains(&status) && retries < RETRIES =>
                {
                    let wait = retry_after(&r).map_or(1 << retries.min(3), |s| s + 1);
                    retries += 1;
                    crate::say!(
                        "the hub answered HTTP {status} for {url}; retrying in {wait} s \
                         ({retries}/{RETRIES})"
                    );
                    std::thread::sleep(std::time::Duration::from_secs(wait));
                    continue;
                }
                Err(ureq::Error::Status(status, r)) => {
                    return Err(status_error(status, &r, &start))
                }
                Err(ureq::Error::Transport(t)) => {
                    return Err(HubError::Failed {
                        url: start,
                        msg: transport_msg(&t, "HF_HUB_ETAG_TIMEOUT", self.etag_timeout),
                    })
                }
            };
            let target = redirect_target(&resp, &url);
            match target {
                Some(_) if redirects == MAX_REDIRECTS => {
                    return Err(HubError::Failed {
                        url: start,
                        msg: format!("more than {MAX_REDIRECTS} redirects"),
                    })
                }
                Some(t) if self.is_hub_origin(&t, &url) => {
                    redirects += 1;
                    url = t;
                }
                Some(t) => return remote(&resp, &start, t, false),
                None => return remote(&resp, &start, url, true),
            }
        }
    }

    /// `_is_same_or_hub_host`: `target` has `from`'s origin (scheme, host, port) or a hub's.
    fn is_hub_origin(&self, target: &str, from: &str) -> bool {
        let t = origin(target);
        t == origin(from)
            || [
                DEFAULT_ENDPOINT,
                "https://hub-ci.huggingface.co",
                "https://hf.co",
                &self.endpoint,
            ]
            .iter()
            .any(|h| origin(h) == t)
    }

    /// Downloads `remote` (a `file` of the repo cached at `cache`) unless its blob is cached, and
    /// links it into the snapshot of its commit. Nothing enters `blobs/` or `snapshots/` unless
    /// the whole file arrived and checked out. (The caller writes `refs/<revision>`.)
    pub fn download(
        &self,
        cache: &RepoCache,
        remote: &Remote,
        file: &str,
    ) -> Result<PathBuf, HubError> {
        let failed = |path: &Path, e: std::io::Error| HubError::Failed {
            url: remote.url.clone(),
            msg: format!("{}: {e}", path.display()),
        };
        let blobs = cache.root.join("blobs");
        std::fs::create_dir_all(&blobs).map_err(|e| failed(&blobs, e))?;
        if let Some(top) = cache.root.parent() {
            let tag = top.join("CACHEDIR.TAG");
            if !tag.exists() {
                let _ = std::fs::write(tag, CACHEDIR_TAG);
            }
        }
        let blob = blobs.join(&remote.etag);
        // `huggingface_hub`'s lock (flock, as Python's filelock): one process downloads a blob,
        // another waits and then finds it. A file system without locks just goes unlocked.
        let lock_path = cache.locks.join(format!("{}.lock", remote.etag));
        let _lock = std::fs::create_dir_all(&cache.locks)
            .and_then(|_| File::create(&lock_path))
            .ok()
            .filter(|f| match f.try_lock() {
                Ok(()) => true,
                Err(std::fs::TryLockError::WouldBlock) => {
                    crate::say!(
                        "waiting for another process downloading {file} ({})",
                        lock_path.display()
                    );
                    f.lock().is_ok()
                }
                Err(_) => false,
            });
        if !blob.is_file() {
            self.fetch_blob(remote, &blob, file)?;
        }
        // A Ctrl-C waits for the links to be made (see `interrupt`).
        let _writing = interrupt::writing();
        cache
            .link(&remote.commit, file, &remote.etag)
            .map_err(|(p, e)| failed(&p, e))
    }

    /// Fills `<blob>.incomplete` (resuming what an earlier attempt or run left), checks it and
    /// renames it to `blob`. A body that does not check out is deleted; one cut by the network is
    /// kept for the next run to resume, as `huggingface_hub` did.
    fn fetch_blob(&self, remote: &Remote, blob: &Path, file: &str) -> Result<(), HubError> {
        let part = PathBuf::from(format!("{}.incomplete", blob.display()));
        let io = |e: std::io::Error| HubError::Failed {
            url: remote.url.clone(),
            msg: format!("{}: {e}", part.display()),
        };
        let mut out = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part)
            .map_err(io)?;
        let mut dl = Body {
            have: out.seek(SeekFrom::End(0)).map_err(io)?,
            size: remote.size,
            bar: bytes_bar(remote.size, file, self.progress),
        };
        if dl.size.is_some_and(|n| dl.have > n) {
            dl.restart(&mut out).map_err(io)?;
        }
        dl.bar.set_position(dl.have);
        let mut best = dl.have;
        let mut retries = BODY_RETRIES;
        let inconsistent = |msg: String| {
            let _ = std::fs::remove_file(&part);
            HubError::Failed {
                url: remote.url.clone(),
                msg: format!(
                    "consistency check failed: {msg} (nothing was cached; this is usually a \
                     network problem: run again)"
                ),
            }
        };
        loop {
            let err = match self.attempt(remote, &mut out, &mut dl) {
                Ok(()) => match dl.size {
                    // The body ended early with no error (no Content-Length to go by).
                    Some(n) if dl.have < n => Attempt::Short,
                    _ => break,
                },
                Err(e) => e,
            };
            if matches!(err, Attempt::Retry(_) | Attempt::Short) && dl.have > best {
                // Got further than ever: a moving download, go on at once.
                best = dl.have;
                retries = BODY_RETRIES;
                continue;
            }
            if matches!(err, Attempt::Retry(_) | Attempt::Short) && retries > 0 {
                retries -= 1;
                std::thread::sleep(RETRY_PAUSE);
                continue;
            }
            dl.bar.abandon();
            return Err(match err {
                // Bytes that stopped with no error to tell cannot be trusted to be a prefix
                // worth resuming.
                Attempt::Short => inconsistent(format!(
                    "`{file}` should be {} bytes but the server sent {} and closed the connection",
                    dl.size.unwrap_or_default(),
                    dl.have
                )),
                Attempt::Inconsistent(msg) => inconsistent(msg),
                Attempt::Retry(msg) => HubError::Failed {
                    url: remote.url.clone(),
                    msg: format!(
                        "{msg} (after {BODY_RETRIES} retries; the {} bytes received are kept in \
                         {} and the next run resumes from them)",
                        dl.have,
                        part.display()
                    ),
                },
                Attempt::Fatal(e) => e,
            });
        }
        dl.bar.finish_and_clear();
        out.flush().map_err(io)?;
        out.sync_all().map_err(io)?;
        drop(out);
        if let Some(n) = dl.size.filter(|&n| n != dl.have) {
            return Err(inconsistent(format!(
                "`{file}` should be {n} bytes but has {}",
                dl.have
            )));
        }
        // An LFS file's etag is the sha256 of its bytes (`huggingface_hub` checks only the size).
        if is_sha256(&remote.etag) {
            let digest = sha256_file(&part).map_err(io)?;
            if digest != remote.etag {
                return Err(inconsistent(format!(
                    "the sha256 of `{file}` is {digest} but the hub's is {}",
                    remote.etag
                )));
            }
        }
        std::fs::rename(&part, blob).map_err(io)
    }

    /// One GET of the rest of the body into `out`.
    fn attempt(&self, remote: &Remote, out: &mut File, dl: &mut Body) -> Result<(), Attempt> {
        let io = |e: std::io::Error| {
            Attempt::Fatal(HubError::Failed {
                url: remote.url.clone(),
                msg: e.to_string(),
            })
        };
        let resp = self.get(remote, dl.have)?;
        match resp.status() {
            206 => {
                // `bytes START-END/TOTAL`: it must start where the file stops.
                let range = resp.header("Content-Range").unwrap_or("");
                let (start, total) = parse_content_range(range).unwrap_or((u64::MAX, None));
                if start != dl.have {
                    dl.restart(out).map_err(io)?;
                    return Err(Attempt::Retry(format!(
                        "the server sent the range `{range}`"
                    )));
                }
                dl.size = dl.size.or(total);
            }
            // Already whole (a run stopped between the last byte and the rename).
            416 if dl.size == Some(dl.have) => return Ok(()),
            416 => {
                dl.restart(out).map_err(io)?;
                return Err(Attempt::Retry("the server refused to resume".into()));
            }
            _ => {
                // The range was ignored (or not asked): the body starts at byte 0.
                if dl.have > 0 {
                    dl.restart(out).map_err(io)?;
                }
                let len = resp.header("Content-Length").and_then(|l| l.parse().ok());
                dl.size = dl.size.or(len);
            }
        }
        if let Some(n) = dl.size {
            dl.bar.set_length(n);
        }
        let mut reader = resp.into_reader();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(Attempt::Retry(io_msg(
                        &e,
                        "HF_HUB_DOWNLOAD_TIMEOUT",
                        self.download_timeout,
                    )))
                }
            };
            out.write_all(&buf[..n]).map_err(io)?;
            dl.have += n as u64;
            dl.bar.inc(n as u64);
            if let Some(size) = dl.size.filter(|&s| dl.have > s) {
                return Err(Attempt::Inconsistent(format!(
                    "more than the {size} bytes the hub announced arrived"
                )));
            }
        }
    }

    /// GET from `have` on, following redirects; the token goes only to hub origins.
    fn get(&self, remote: &Remote, have: u64) -> Result<ureq::Response, Attempt> {
        let mut url = remote.location.clone();
        let mut auth = remote.auth;
        for _ in 0..MAX_REDIRECTS {
            let mut req = self.request(&self.body, "GET", &url, auth);
            if have > 0 {
                req = req.set("Range", &format!("bytes={have}-"));
            }
            let resp = match req.call() {
                Ok(r) => r,
                Err(ureq::Error::Status(416, r)) => return Ok(r),
                // Rate limits and server errors pass; the retry asks again.
                Err(ureq::Error::Status(s, _)) if s == 408 || s == 429 || s >= 500 => {
                    return Err(Attempt::Retry(format!("HTTP {s}")))
                }
                Err(ureq::Error::Status(s, r)) => {
                    return Err(Attempt::Fatal(status_error(s, &r, &remote.url)))
                }
                Err(ureq::Error::Transport(t)) => {
                    return Err(Attempt::Retry(transport_msg(
                        &t,
                        "HF_HUB_DOWNLOAD_TIMEOUT",
                        self.download_timeout,
                    )))
                }
            };
            match redirect_target(&resp, &url) {
                Some(t) => {
                    auth = auth && self.is_hub_origin(&t, &url);
                    url = t;
                }
                None => return Ok(resp),
            }
        }
        Err(Attempt::Fatal(HubError::Failed {
            url: remote.url.clone(),
            msg: format!("more than {MAX_REDIRECTS} redirects"),
        }))
    }
}

enum Attempt {
    /// Worth another try, resuming (timeout, reset, 5xx).
    Retry(String),
    /// The body ended cleanly but short of the announced size: tried again, but if it stays
    /// short the bytes are not kept.
    Short,
    /// The bytes cannot be the file's: deleted.
    Inconsistent(String),
    Fatal(HubError),
}

/// A body being written to its `.incomplete` file.
struct Body {
    have: u64,
    size: Option<u64>,
    bar: indicatif::ProgressBar,
}

impl Body {
    fn restart(&mut self, out: &mut File) -> std::io::Result<()> {
        out.set_len(0)?;
        out.seek(SeekFrom::Start(0))?;
        self.have = 0;
        self.bar.set_position(0);
        Ok(())
    }
}

fn bytes_bar(size: Option<u64>, file: &str, enabled: bool) -> indicatif::ProgressBar {
    if !enabled {
        return indicatif::ProgressBar::hidden();
    }
    // indicatif's stderr target draws nothing when stderr is not a terminal.
    let bar = indicatif::ProgressBar::new(size.unwrap_or(0));
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(file.to_string());
    bar
}

/// The metadata of a HEAD answer (`get_hf_file_metadata`); `location` is where the body is.
fn remote(
    resp: &ureq::Response,
    url: &str,
    location: String,
    auth: bool,
) -> Result<Remote, HubError> {
    let bad = |msg: &str| HubError::Failed {
        url: url.to_string(),
        msg: format!("{msg}; is HF_ENDPOINT a Hugging Face hub?"),
    };
    let commit = resp
        .header("X-Repo-Commit")
        .ok_or_else(|| bad("the answer has no X-Repo-Commit header"))?;
    // Both name files in the cache: nothing but a hash may come through.
    if !is_commit_hash(commit) {
        return Err(bad(&format!(
            "X-Repo-Commit `{commit}` is not a commit hash"
        )));
    }
    let etag = resp
        .header("X-Linked-Etag")
        .or_else(|| resp.header("ETag"))
        .map(|e| e.trim_start_matches("W/").trim_matches('"').to_string())
        .ok_or_else(|| bad("the answer has no ETag"))?;
    if etag.is_empty()
        || etag.len() > 128
        || !etag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(bad(&format!("ETag `{etag}` cannot name a cache file")));
    }
    let redirect = (300..400).contains(&resp.status());
    let size = resp
        .header("X-Linked-Size")
        .or_else(|| (!redirect).then(|| resp.header("Content-Length")).flatten())
        .and_then(|s| s.trim().parse().ok());
    Ok(Remote {
        commit: commit.to_string(),
        etag,
        size,
        url: url.to_string(),
        location,
        auth,
    })
}

/// `Retry-After` in seconds (the HTTP-date form is ignored, as `huggingface_hub` does), at most
/// a minute.
fn retry_after(resp: &ureq::Response) -> Option<u64> {
    let s: u64 = resp.header("Retry-After")?.trim().parse().ok()?;
    Some(s.min(60))
}

/// `hf_raise_for_status`, for the errors clipft tells apart.
fn status_error(status: u16, resp: &ureq::Response, url: &str) -> HubError {
    let message = resp.header("X-Error-Message").map(str::to_string);
    match resp.header("X-Error-Code") {
        Some("RevisionNotFound") => HubError::RevisionNotFound,
        Some("EntryNotFound") => HubError::EntryNotFound {
            commit: resp.header("X-Repo-Commit").map(str::to_string),
        },
        Some("GatedRepo") => HubError::Gated,
        Some("RepoNotFound") => HubError::RepoNotFound { status },
        _ if status == 401
            && message.as_deref() != Some("Invalid credentials in Authorization header") =>
        {
            HubError::RepoNotFound { status }
        }
        _ => HubError::Failed {
            url: url.to_string(),
            msg: match message {
                Some(m) => format!("HTTP {status}: {m}"),
                None => format!("HTTP {status} {}", resp.status_text()),
            },
        },
    }
}

/// Where a 3xx answer points, made absolute.
fn redirect_target(resp: &ureq::Response, url: &str) -> Option<String> {
    if !(300..400).contains(&resp.status()) {
        return None;
    }
    let loc = resp.header("Location")?;
    let base = url::Url::parse(url).ok()?;
    base.join(loc).ok().map(String::from)
}

/// (scheme, host, port) with the scheme's default port.
fn origin(url: &str) -> Option<(String, String, u16)> {
    let u = url::Url::parse(url).ok()?;
    Some((
        u.scheme().to_string(),
        u.host_str()?.to_ascii_lowercase(),
        u.port_or_known_default()?,
    ))
}

fn transport_msg(t: &ureq::Transport, var: &str, secs: u64) -> String {
    use std::error::Error;
    if let Some(io) = t.source().and_then(|s| s.downcast_ref::<std::io::Error>()) {
        return io_msg(io, var, secs);
    }
    match t.message() {
        Some(m) => format!("{}: {m}", t.kind()),
        None => t.kind().to_string(),
    }
}

fn io_msg(e: &std::io::Error, var: &str, secs: u64) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        TimedOut | WouldBlock => format!("timed out: nothing for {secs} s ({var})"),
        _ => e.to_string(),
    }
}

/// `urllib.parse.quote` (`safe="/"` for file names, `safe=""` for the revision).
fn quote(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"_.-~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let (range, total) = v.strip_prefix("bytes ")?.split_once('/')?;
    let start = range.split_once('-')?.0.trim().parse().ok()?;
    Some((start, total.trim().parse().ok()))
}

/// A full commit hash (40 hex digits) rather than a branch, tag or ref.
pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf)? {
            0 => break,
            n => h.update(&buf[..n]),
        }
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// One repo's folder in the hub cache.
pub struct RepoCache {
    pub root: PathBuf,
    /// `.locks/models--org--name` next to the repo folders.
    locks: PathBuf,
}

/// A revision found in the cache: a ref and its commit, or a bare snapshot (`name == commit`).
#[derive(Debug, Clone, PartialEq)]
pub struct CachedRevision {
    pub name: String,
    pub commit: String,
}

type IoAt = (PathBuf, std::io::Error);

impl RepoCache {
    pub fn new(cache_dir: &Path, repo_id: &str) -> Self {
        let folder = hf_hub::Repo::model(repo_id.to_string()).folder_name();
        Self {
            root: cache_dir.join(&folder),
            locks: cache_dir.join(".locks").join(folder),
        }
    }

    /// The commit `refs/<revision>` names (what `try_to_load_from_cache` reads).
    pub fn ref_commit(&self, revision: &str) -> Option<String> {
        let c = std::fs::read_to_string(self.root.join("refs").join(revision)).ok()?;
        let c = c.trim();
        (!c.is_empty() && !c.contains(['/', '\\']) && c != "..").then(|| c.to_string())
    }

    /// The snapshot's file, if it is there and its blob too.
    pub fn file(&self, commit: &str, file: &str) -> Option<PathBuf> {
        let p = self.root.join("snapshots").join(commit).join(file);
        p.is_file().then_some(p)
    }

    /// Whether the hub said `file` does not exist at `commit`.
    pub fn known_missing(&self, commit: &str, file: &str) -> bool {
        self.root
            .join(".no_exist")
            .join(commit)
            .join(file)
            .is_file()
    }

    /// Records that `file` does not exist at `commit`, as `huggingface_hub` does on
    /// `EntryNotFound`. Best effort: a read-only cache only costs a request next time.
    pub fn mark_missing(&self, commit: &str, file: &str) {
        let p = self.root.join(".no_exist").join(commit).join(file);
        let _writing = interrupt::writing();
        let _ = p
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|_| File::create(&p).map(drop));
    }

    /// Every revision with a snapshot: refs first (`main` leading), then unreferenced commits.
    pub fn revisions(&self) -> Vec<CachedRevision> {
        let mut refs = Vec::new();
        let mut stack = vec![self.root.join("refs")];
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else if let Ok(name) = p.strip_prefix(self.root.join("refs")) {
                    let name = name.to_string_lossy().replace('\\', "/");
                    if let Some(commit) = self.ref_commit(&name) {
                        refs.push(CachedRevision { name, commit });
                    }
                }
            }
        }
        let snapshots: Vec<String> = std::fs::read_dir(self.root.join("snapshots"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        refs.retain(|r| snapshots.contains(&r.commit));
        refs.sort_by(|a, b| (a.name != "main", &a.name).cmp(&(b.name != "main", &b.name)));
        let mut bare: Vec<CachedRevision> = snapshots
            .into_iter()
            .filter(|s| !refs.iter().any(|r| &r.commit == s))
            .map(|s| CachedRevision {
                name: s.clone(),
                commit: s,
            })
            .collect();
        bare.sort_by(|a, b| a.name.cmp(&b.name));
        refs.extend(bare);
        refs
    }

    /// `snapshots/<commit>/<file>` -> `../../blobs/<etag>` (one more `..` per folder in `file`),
    /// the relative link `_create_symlink` makes.
    fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf, IoAt> {
        let pointer = self.root.join("snapshots").join(commit).join(file);
        let at = |e| (pointer.clone(), e);
        if let Some(dir) = pointer.parent() {
            std::fs::create_dir_all(dir).map_err(at)?;
        }
        let target = format!(
            "{}blobs/{etag}",
            "../".repeat(2 + file.matches('/').count())
        );
        if std::fs::read_link(&pointer).is_ok_and(|t| t == Path::new(&target)) {
            return Ok(pointer);
        }
        let _ = std::fs::remove_file(&pointer);
        #[cfg(unix)]
        std::os::unix::fs::symlink(&target, &pointer).map_err(at)?;
        // Without symlinks `huggingface_hub` copies the blob into the snapshot.
        #[cfg(not(unix))]
        std::fs::copy(self.root.join("blobs").join(etag), &pointer).map_err(at)?;
        Ok(pointer)
    }

    /// `refs/<revision>` = `commit`, written whole (temporary file and rename) and only when it
    /// changes; none for a revision that is the commit itself.
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<(), IoAt> {
        if revision == commit || self.ref_commit(revision).as_deref() == Some(commit) {
            return Ok(());
        }
        let path = self.root.join("refs").join(revision);
        let at = |e| (path.clone(), e);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(at)?;
        }
        let tmp = PathBuf::from(format!("{}.{}.tmp", path.display(), std::process::id()));
        std::fs::write(&tmp, commit).map_err(at)?;
        std::fs::rename(&tmp, &path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            at(e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxies_are_bypassed_as_no_proxy_says() {
        assert!(bypasses_proxy("http://127.0.0.1:9/x"));
        assert!(bypasses_proxy("http://[::1]:9/x"));
        assert!(bypasses_proxy("http://localhost/x"));
        assert!(no_proxy_lists("cdn.example.com", "foo, .example.com"));
        assert!(no_proxy_lists("example.com", "example.com"));
        assert!(no_proxy_lists("huggingface.co", "*"));
        assert!(!no_proxy_lists("huggingface.co", "face.co, example.com"));
        assert!(!no_proxy_lists("huggingface.co", ""));
    }

    #[test]
    fn urls_quote_like_huggingface_hub() {
        assert_eq!(quote("refs/pr/15", false), "refs%2Fpr%2F15");
        assert_eq!(quote("sub dir/a+b.json", true), "sub%20dir/a%2Bb.json");
    }

    #[test]
    fn hub_origins() {
        assert_eq!(
            origin("https://huggingface.co/a"),
            origin("https://HuggingFace.co:443/b")
        );
        assert_ne!(
            origin("http://127.0.0.1:80/a"),
            origin("http://localhost/a")
        );
        assert_eq!(parse_content_range("bytes 10-19/20"), Some((10, Some(20))));
    }

    #[test]
    fn home_is_expanded() {
        let home = std::env::var("HOME").unwrap();
        assert_eq!(expand_home("~/x"), Path::new(&home).join("x"));
        assert_eq!(expand_home("a/~"), Path::new("a/~"));
    }
}

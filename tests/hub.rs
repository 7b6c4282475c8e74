//! Hub downloads against a fake hub on 127.0.0.1 (no network): the cache layout
//! `huggingface_hub` shares, timeouts, resumed and rejected bodies, the token on redirects,
//! cache-first resolution and the hub's error codes.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use assert_cmd::Command;
use common::stderr;
use sha2::{Digest, Sha256};

const REPO: &str = "test/tiny-clip";
const COMMIT: &str = "c0ffee00c0ffee00c0ffee00c0ffee00c0ffee00";

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// How the fake hub misbehaves.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    /// Reads each request and never answers.
    Stall,
    /// The first GET of the weights sends half the body and then nothing; later ones are fine.
    StallBodyOnce,
    /// GETs of the weights send half the body with no Content-Length and close (Range ignored).
    CutNoLength,
    /// The weights are on a "CDN": a redirect to `localhost` (another host than 127.0.0.1).
    RedirectWeights,
    /// The first two metadata requests are rate-limited (429, Retry-After: 0).
    RateLimitedTwice,
    /// Every metadata request is redirected to the same host again.
    RedirectLoop,
}

/// One request as the fake hub saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    host: String,
    range: Option<String>,
    auth: Option<String>,
}

/// `/{repo}/resolve/{rev}/{file}` for `test/tiny-clip` (main = [`COMMIT`], the files of
/// tests/fixtures/tiny-clip), with the hub's headers and error codes; `test/gated` is gated,
/// every other repo missing.
struct FakeHub {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl FakeHub {
    fn start(mode: Mode) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut files = HashMap::new();
        for e in std::fs::read_dir(fixtures().join("tiny-clip")).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            files.insert(name, std::fs::read(&p).unwrap());
        }
        let files = Arc::new(files);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stalled_once = Arc::new(Mutex::new(false));
        let limited = Arc::new(Mutex::new(0));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (files, log, once) = (files.clone(), log.clone(), stalled_once.clone());
                let limited = limited.clone();
                std::thread::spawn(move || {
                    serve(stream, mode, port, &files, &log, &once, &limited)
                });
            }
        });
        Self { port, seen }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(
    stream: TcpStream,
    mode: Mode,
    port: u16,
    files: &HashMap<String, Vec<u8>>,
    log: &Mutex<Vec<Seen>>,
    stalled_once: &Mutex<bool>,
    limited: &Mutex<usize>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let (method, path) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let seen = Seen {
        method: method.clone(),
        path: path.clone(),
        host: headers.get("host").cloned().unwrap_or_default(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
    };
    log.lock().unwrap().push(seen.clone());
    let mut out = stream;
    if mode == Mode::Stall {
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    let head = method == "HEAD";
    let send = |out: &mut TcpStream, status: &str, hdrs: &[(&str, String)], body: &[u8]| {
        let mut s = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
        for (k, v) in hdrs {
            s += &format!("{k}: {v}\r\n");
        }
        s += "\r\n";
        let _ = out.write_all(s.as_bytes());
        if !head {
            let _ = out.write_all(body);
        }
    };
    let error = |out: &mut TcpStream, status: &str, code: &str| {
        let hdrs = [
            ("X-Error-Code", code.to_string()),
            ("X-Repo-Commit", COMMIT.to_string()),
            ("Content-Length", "0".to_string()),
        ];
        send(out, status, &hdrs, b"");
    };
    if head && mode == Mode::RateLimitedTwice {
        let mut n = limited.lock().unwrap();
        if *n < 2 {
            *n += 1;
            let hdrs = [
                ("Retry-After", "0".to_string()),
                ("Content-Length", "0".to_string()),
            ];
            return send(&mut out, "429 Too Many Requests", &hdrs, b"");
        }
    }
    if head && mode == Mode::RedirectLoop {
        let next = if path.contains('?') {
            format!("{path}x")
        } else {
            format!("{path}?x")
        };
        let hdrs = [("Location", next), ("Content-Length", "0".to_string())];
        return send(&mut out, "302 Found", &hdrs, b"");
    }
    // The "CDN": just the bytes.
    let path = path.split('?').next().unwrap_or("").to_string();
    let (cdn, path) = match path.strip_prefix("/cdn") {
        Some(p) => (true, p.to_string()),
        None => (false, path),
    };
    let p: Vec<&str> = path.splitn(6, '/').collect();
    if p.len() < 6 || p[3] != "resolve" {
        return error(&mut out, "404 Not Found", "RepoNotFound");
    }
    let (repo, rev, file) = (format!("{}/{}", p[1], p[2]), p[4], p[5]);
    match repo.as_str() {
        REPO => {}
        "test/gated" => return error(&mut out, "403 Forbidden", "GatedRepo"),
        _ => return error(&mut out, "401 Unauthorized", "RepoNotFound"),
    }
    if rev != "main" && rev != COMMIT {
        return error(&mut out, "404 Not Found", "RevisionNotFound");
    }
    let Some(data) = files.get(file) else {
        return error(&mut out, "404 Not Found", "EntryNotFound");
    };
    let weights = file.ends_with(".safetensors");
    // Git blobs are named by their sha1, LFS files by their sha256: any hex name will do for the
    // former, the latter is checked.
    let etag = if weights {
        sha256(data)
    } else {
        sha256(data)[..40].to_string()
    };
    let mut hdrs = vec![
        ("X-Repo-Commit", COMMIT.to_string()),
        ("ETag", format!("\"{etag}\"")),
    ];
    if weights {
        hdrs.push(("X-Linked-Etag", format!("\"{etag}\"")));
        hdrs.push(("X-Linked-Size", data.len().to_string()));
    }
    if weights && mode == Mode::RedirectWeights && !cdn {
        hdrs.push((
            "Location",
            format!("http://localhost:{port}/cdn{path}?signed=1"),
        ));
        hdrs.push(("Content-Length", "0".into()));
        return send(&mut out, "302 Found", &hdrs, b"");
    }
    // (hf-hub 0.4 asked for `bytes=0-0` for metadata: answered, so that it got to the body.)
    if weights && !head && mode == Mode::CutNoLength && seen.range.as_deref() != Some("bytes=0-0") {
        let half = &data[..data.len() / 2];
        return send(&mut out, "200 OK", &hdrs, half);
    }
    // `bytes=START-[END]`.
    let range = match (&seen.range, head) {
        (Some(r), false) => r
            .trim_start_matches("bytes=")
            .split_once('-')
            .map(|(a, b)| {
                let end = b.parse().unwrap_or(data.len() - 1).min(data.len() - 1);
                (a.parse().unwrap_or(0), end)
            }),
        _ => None,
    };
    let (start, end) = range.unwrap_or((0, data.len() - 1));
    let body = &data[start..=end];
    hdrs.push(("Content-Length", body.len().to_string()));
    let status = if range.is_some() {
        hdrs.push((
            "Content-Range",
            format!("bytes {start}-{end}/{}", data.len()),
        ));
        "206 Partial Content"
    } else {
        "200 OK"
    };
    if weights
        && !head
        && mode == Mode::StallBodyOnce
        && !std::mem::replace(&mut *stalled_once.lock().unwrap(), true)
    {
        send(&mut out, status, &hdrs, &body[..body.len() / 2]);
        let _ = out.flush();
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    send(&mut out, status, &hdrs, body);
}

/// `clipft info --model REPO` against `endpoint` with a private cache at `cache` and no
/// token, offline switch or progress bar from the caller's environment.
fn info(cache: &Path, endpoint: &str, model: &str) -> Command {
    let mut c = Command::cargo_bin("clipft").unwrap();
    c.env("HF_HOME", cache.join("home"))
        .env("HF_HUB_CACHE", cache)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("TRANSFORMERS_OFFLINE")
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN")
        .env_remove("HF_TOKEN_PATH")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("HF_HUB_ETAG_TIMEOUT")
        .env_remove("HF_HUB_DOWNLOAD_TIMEOUT")
        .timeout(Duration::from_secs(20))
        .args(["info", "--model", model]);
    c
}

/// An endpoint where nothing listens: requests fail at once, as without network.
fn closed_endpoint() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

fn repo_dir(cache: &Path, repo: &str) -> PathBuf {
    cache.join(format!("models--{}", repo.replace('/', "--")))
}

/// Every path under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().display().to_string());
            if p.is_dir() && !p.is_symlink() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A cache entry as `huggingface_hub` writes it: blobs named by sha256, relative symlinks,
/// `refs/<revision>`, and `.no_exist` markers for `missing`.
fn cache_entry(
    cache: &Path,
    repo: &str,
    revision: &str,
    files: &[(&str, PathBuf)],
    missing: &[&str],
) {
    let root = repo_dir(cache, repo);
    let snap = root.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for (name, src) in files {
        let data = std::fs::read(src).unwrap();
        let etag = sha256(&data);
        std::fs::write(root.join("blobs").join(&etag), &data).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{etag}"), snap.join(name)).unwrap();
    }
    for name in missing {
        let m = root.join(".no_exist").join(COMMIT).join(name);
        std::fs::create_dir_all(m.parent().unwrap()).unwrap();
        std::fs::write(m, "").unwrap();
    }
    let r = root.join("refs").join(revision);
    std::fs::create_dir_all(r.parent().unwrap()).unwrap();
    std::fs::write(r, COMMIT).unwrap();
}

#[test]
fn a_download_into_an_empty_cache_has_the_huggingface_layout() {
    let hub = FakeHub::start(Mode::Ok);
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let out = info(&cache, &hub.endpoint(), REPO).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(common::stdout(&out).contains(REPO));

    let root = repo_dir(&cache, REPO);
    assert_eq!(
        std::fs::read_to_string(root.join("refs/main")).unwrap(),
        COMMIT
    );
    let weights = std::fs::read(fixtures().join("tiny-clip/model.safetensors")).unwrap();
    let etag = sha256(&weights);
    let pointer = root
        .join("snapshots")
        .join(COMMIT)
        .join("model.safetensors");
    assert_eq!(
        std::fs::read_link(&pointer).unwrap(),
        Path::new(&format!("../../blobs/{etag}"))
    );
    assert_eq!(std::fs::read(&pointer).unwrap(), weights);
    for f in ["config.json", "tokenizer.json", "preprocessor_config.json"] {
        let link = std::fs::read_link(root.join("snapshots").join(COMMIT).join(f)).unwrap();
        assert!(link.starts_with("../../blobs/"), "{f}: {link:?}");
    }
    assert!(cache.join("CACHEDIR.TAG").is_file());
    assert!(
        !tree(&root).iter().any(|p| p.ends_with(".incomplete")),
        "{:?}",
        tree(&root)
    );
    // Every file after the first is asked for at the commit the revision resolved to.
    let seen = hub.seen();
    assert!(
        seen[0].path.ends_with("/resolve/main/config.json"),
        "{seen:?}"
    );
    assert!(
        seen[2..].iter().all(|s| s.path.contains(COMMIT)),
        "{seen:?}"
    );

    // Now cached: no request at all, even with the hub gone.
    let out = info(&cache, &closed_endpoint(), REPO).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn a_rate_limited_metadata_request_is_retried() {
    let hub = FakeHub::start(Mode::RateLimitedTwice);
    let tmp = tempfile::tempdir().unwrap();
    let out = info(tmp.path(), &hub.endpoint(), REPO).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("HTTP 429") && stderr(&out).contains("retrying in 1 s (2/5)"),
        "{}",
        stderr(&out)
    );
}

/// A redirect loop ends after `huggingface_hub`'s limit of redirects, not before.
#[test]
fn a_redirect_loop_is_cut_after_twenty_redirects() {
    let hub = FakeHub::start(Mode::RedirectLoop);
    let tmp = tempfile::tempdir().unwrap();
    let out = info(tmp.path(), &hub.endpoint(), REPO).output().unwrap();
    let e = stderr(&out);
    assert!(
        !out.status.success() && e.contains("more than 20 redirects"),
        "{e}"
    );
    let heads = hub.seen().iter().filter(|r| r.method == "HEAD").count();
    assert_eq!(heads, 21, "{e}");
}

#[test]
fn a_stalled_hub_fails_within_the_timeout_naming_the_file() {
    let hub = FakeHub::start(Mode::Stall);
    let tmp = tempfile::tempdir().unwrap();
    let t0 = Instant::now();
    let out = info(tmp.path(), &hub.endpoint(), REPO)
        .env("HF_HUB_ETAG_TIMEOUT", "1")
        .output()
        .unwrap();
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert!(
        e.contains("could not download `config.json` of model `test/tiny-clip` (revision main)")
            && e.contains("/test/tiny-clip/resolve/main/config.json")
            && e.contains("HF_HUB_ETAG_TIMEOUT"),
        "{e}"
    );
}

#[test]
fn a_stalled_body_is_resumed_with_a_range() {
    let hub = FakeHub::start(Mode::StallBodyOnce);
    let tmp = tempfile::tempdir().unwrap();
    let out = info(tmp.path(), &hub.endpoint(), REPO)
        .env("HF_HUB_DOWNLOAD_TIMEOUT", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let gets: Vec<Seen> = hub
        .seen()
        .into_iter()
        .filter(|s| s.method == "GET" && s.path.ends_with("model.safetensors"))
        .collect();
    let size = std::fs::metadata(fixtures().join("tiny-clip/model.safetensors"))
        .unwrap()
        .len();
    assert_eq!(gets.len(), 2, "{gets:?}");
    assert_eq!(
        gets[1].range,
        Some(format!("bytes={}-", size / 2)),
        "{gets:?}"
    );
    let pointer = repo_dir(tmp.path(), REPO)
        .join("snapshots")
        .join(COMMIT)
        .join("model.safetensors");
    assert_eq!(
        std::fs::read(pointer).unwrap(),
        std::fs::read(fixtures().join("tiny-clip/model.safetensors")).unwrap()
    );
}

#[test]
fn a_body_cut_short_is_never_cached() {
    let hub = FakeHub::start(Mode::CutNoLength);
    let tmp = tempfile::tempdir().unwrap();
    let out = info(tmp.path(), &hub.endpoint(), REPO).output().unwrap();
    let e = stderr(&out);
    assert!(!out.status.success(), "{e}");
    assert!(
        e.contains("could not download `model.safetensors`")
            && e.contains("consistency check failed"),
        "{e}"
    );
    let root = repo_dir(tmp.path(), REPO);
    let files = tree(&root);
    let weights = std::fs::read(fixtures().join("tiny-clip/model.safetensors")).unwrap();
    let etag = sha256(&weights);
    // No blob, temporary file or snapshot entry of the weights, and no ref to a checkpoint
    // that is not whole (the small files downloaded first stay for the next run).
    assert!(
        !files.iter().any(|p| p.contains(&etag)
            || p.contains("model.safetensors")
            || p.starts_with("refs/")),
        "{files:?}"
    );
    assert!(!root.join("refs").exists(), "{files:?}");
}

#[test]
fn the_token_does_not_follow_a_redirect_to_another_host() {
    let hub = FakeHub::start(Mode::RedirectWeights);
    let tmp = tempfile::tempdir().unwrap();
    let out = info(tmp.path(), &hub.endpoint(), REPO)
        .env("HF_TOKEN", "hf_secret")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let seen = hub.seen();
    let (hub_reqs, cdn): (Vec<&Seen>, Vec<&Seen>) =
        seen.iter().partition(|s| s.host.starts_with("127.0.0.1"));
    assert!(!cdn.is_empty() && !hub_reqs.is_empty(), "{seen:?}");
    assert!(
        hub_reqs
            .iter()
            .all(|s| s.auth.as_deref() == Some("Bearer hf_secret")),
        "{seen:?}"
    );
    assert!(cdn.iter().all(|s| s.auth.is_none()), "{seen:?}");
    assert!(cdn.iter().all(|s| s.path.starts_with("/cdn/")), "{seen:?}");
}

#[test]
fn a_cached_pytorch_checkpoint_loads_without_the_network() {
    // What `transformers` leaves for openai/clip-vit-base-patch32's main: the pickle, and a
    // marker saying model.safetensors does not exist there.
    let tmp = tempfile::tempdir().unwrap();
    let tiny = fixtures().join("tiny-clip");
    let files = [
        ("config.json", tiny.join("config.json")),
        ("tokenizer.json", tiny.join("tokenizer.json")),
        (
            "preprocessor_config.json",
            tiny.join("preprocessor_config.json"),
        ),
        (
            "pytorch_model.bin",
            fixtures().join("tiny-clip.pytorch_model.bin"),
        ),
    ];
    cache_entry(tmp.path(), REPO, "main", &files, &["model.safetensors"]);
    let out = info(tmp.path(), &closed_endpoint(), REPO).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // The same without the marker: any complete format in the cache wins over the network.
    std::fs::remove_dir_all(repo_dir(tmp.path(), REPO).join(".no_exist")).unwrap();
    let out = info(tmp.path(), &closed_endpoint(), REPO).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // Without the preprocessor config the hub must be asked; the failure names what the cache
    // lacks, not just the revision lookup's request.
    let snap = repo_dir(tmp.path(), REPO).join("snapshots").join(COMMIT);
    std::fs::remove_file(snap.join("preprocessor_config.json")).unwrap();
    let out = info(tmp.path(), &closed_endpoint(), REPO).output().unwrap();
    let e = stderr(&out);
    assert!(
        !out.status.success() && e.contains("without `preprocessor_config.json`"),
        "{e}"
    );
}

#[test]
fn hub_errors_are_told_apart() {
    let hub = FakeHub::start(Mode::Ok);
    let tmp = tempfile::tempdir().unwrap();
    let out = info(tmp.path(), &hub.endpoint(), REPO)
        .args(["--revision", "nope"])
        .output()
        .unwrap();
    let e = stderr(&out);
    assert!(!out.status.success());
    assert!(
        e.contains("revision `nope` does not exist in `test/tiny-clip`"),
        "{e}"
    );

    let out = info(tmp.path(), &hub.endpoint(), "test/missing")
        .output()
        .unwrap();
    let e = stderr(&out);
    assert!(!out.status.success());
    assert!(
        e.contains("repo `test/missing` not found")
            && e.contains("private or gated")
            && e.contains("HF_TOKEN")
            && e.contains("No folder `test/missing` exists here"),
        "{e}"
    );

    let out = info(tmp.path(), &hub.endpoint(), "test/gated")
        .output()
        .unwrap();
    let e = stderr(&out);
    assert!(!out.status.success());
    assert!(e.contains("is gated") && e.contains("HF_TOKEN"), "{e}");
    // Nothing was written for any of them.
    assert!(
        tree(tmp.path()).iter().all(|p| p.starts_with("home")),
        "{:?}",
        tree(tmp.path())
    );
}

#[test]
fn offline_not_cached_names_the_cached_revisions() {
    let tmp = tempfile::tempdir().unwrap();
    let tiny = fixtures().join("tiny-clip");
    let model = "openai/clip-vit-base-patch32";
    let files = [
        ("config.json", tiny.join("config.json")),
        ("tokenizer.json", tiny.join("tokenizer.json")),
        (
            "pytorch_model.bin",
            fixtures().join("tiny-clip.pytorch_model.bin"),
        ),
    ];
    cache_entry(tmp.path(), model, "main", &files, &["model.safetensors"]);
    // The default model defaults to refs/pr/15, which is not cached; main is.
    let out = info(tmp.path(), &closed_endpoint(), model)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let e = stderr(&out);
    assert!(!out.status.success());
    assert!(
        e.contains("(revision refs/pr/15) is not in the Hugging Face cache")
            && e.contains("Cached revisions of `openai/clip-vit-base-patch32`: main")
            && e.contains("--revision main")
            && e.contains("hf download openai/clip-vit-base-patch32 --revision refs/pr/15"),
        "{e}"
    );
    // TRANSFORMERS_OFFLINE counts too; main has no preprocessor_config.json (nor a marker for
    // it): loaded with the default preprocessing and a warning.
    let out = info(tmp.path(), &closed_endpoint(), model)
        .env("TRANSFORMERS_OFFLINE", "yes")
        .args(["--revision", "main"])
        .output()
        .unwrap();
    let e = stderr(&out);
    assert!(out.status.success(), "{e}");
    assert!(
        e.contains("preprocessor_config.json") && e.contains("default"),
        "{e}"
    );
    // Offline with no weights names every format tried.
    let snap = repo_dir(tmp.path(), model).join("snapshots").join(COMMIT);
    std::fs::remove_file(snap.join("pytorch_model.bin")).unwrap();
    let out = info(tmp.path(), &closed_endpoint(), model)
        .env("HF_HUB_OFFLINE", "true")
        .args(["--revision", "main"])
        .output()
        .unwrap();
    let e = stderr(&out);
    assert!(!out.status.success());
    assert!(
        e.contains("model.safetensors.index.json") && e.contains("pytorch_model.bin"),
        "{e}"
    );
}

//! Shared helpers: a generated checkpoint and image set in a temporary folder.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use assert_cmd::Command;
use clipft::model::synth;

/// Copies the files of a flat folder (a checkpoint) into `to`, made if missing.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    /// A tiny random checkpoint in `model/` and a 3-class image set in `data/`.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        synth::write_checkpoint(&dir.path().join("model"), &synth::tiny_config(), 7).unwrap();
        synth::write_dataset(
            &dir.path().join("data"),
            3,
            [("train", 6), ("val", 3), ("test", 4)],
            7,
        )
        .unwrap();
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn model(&self) -> PathBuf {
        self.path().join("model")
    }
    pub fn data(&self) -> PathBuf {
        self.path().join("data")
    }
    pub fn cache(&self) -> PathBuf {
        self.path().join("cache")
    }

    /// `clipft SUB` with a private, offline HF cache and no `--model`.
    pub fn bare(&self, sub: &str) -> Command {
        let mut c = Command::cargo_bin("clipft").unwrap();
        c.env("HF_HOME", self.path().join("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("HF_HUB_CACHE")
            .env_remove("CLIPFT_CACHE_DIR");
        c.arg(sub);
        c
    }

    /// `clipft eval --adapter ADAPTER --data DATA` with the workspace's feature cache (the
    /// adapter's own model: no `--model`).
    pub fn eval_adapter(&self, adapter: &Path, data: &Path) -> Command {
        let mut c = self.bare("eval");
        c.arg("--adapter")
            .arg(adapter)
            .arg("--data")
            .arg(data)
            .arg("--cache-dir")
            .arg(self.cache());
        c
    }

    /// `clipft SUB` with `--model` and `--cache-dir` pointing into the workspace.
    pub fn cmd(&self, sub: &str) -> Command {
        let mut c = self.bare(sub);
        if sub != "demo" {
            c.arg("--model").arg(self.model());
        }
        if sub == "features" || sub == "eval" {
            c.arg("--cache-dir").arg(self.cache());
        }
        c
    }
}

pub fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The run failed and its stderr says `needle` (the whole stderr shown if not).
pub fn assert_fails_with(out: &std::process::Output, needle: &str) {
    assert!(!out.status.success(), "succeeded: {}", stderr(out));
    assert!(stderr(out).contains(needle), "{}", stderr(out));
}

/// `max |a − b|` over all elements (f32 tensors).
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Starts `cmd` with stderr piped, reads stderr until a line satisfies `until` (which may
/// assert on it), sends `signal`, and returns the exit status, that line and the rest of stderr.
#[cfg(target_os = "linux")]
pub fn signal_on_line(
    mut cmd: std::process::Command,
    until: impl Fn(&str) -> bool,
    signal: i32,
) -> (std::process::ExitStatus, String, String) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "stderr ended");
        if until(&line) {
            break;
        }
    }
    // SAFETY: a plain kill(2) of our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
    // (Drained, so that the child never blocks on a full pipe.)
    let rest = std::io::read_to_string(&mut err).unwrap();
    (child.wait().unwrap(), line, rest)
}

//! End-to-end behaviour of the binary on generated checkpoints and image sets.

mod common;

use std::path::Path;

use common::{assert_fails_with, stderr, stdout, Workspace};

fn load_meta(
    path: &Path,
) -> (
    std::collections::HashMap<String, candle_core::Tensor>,
    serde_json::Value,
) {
    clipft::io::load(path).unwrap()
}

#[test]
fn demo_runs_end_to_end() {
    let ws = Workspace::new();
    let out = ws
        .cmd("demo")
        .arg("--dir")
        .arg(ws.path().join("demo"))
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("zeroshot on test (120 images)"), "{text}");
    assert!(text.contains("top-5"), "{text}");
    assert!(ws.path().join("demo/model/model.safetensors").is_file());
    // Seeded end to end: another folder gives the same numbers (paths aside).
    let again = ws
        .cmd("demo")
        .arg("--dir")
        .arg(ws.path().join("elsewhere"))
        .arg("--quiet")
        .output()
        .unwrap();
    let tail = |t: &str| t[t.find("zeroshot on test").unwrap()..].to_string();
    assert_eq!(tail(&text), tail(&stdout(&again)));
    assert!(text.contains("test top-1 side by side"), "{text}");
    // All three methods of the brief ran, FD-Align into a checkpoint folder `eval` can use.
    for method in ["tip-adapter-f", "crossmodal", "fd-align"] {
        assert!(
            text.contains(&format!("{method} on test (120 images)")),
            "{text}"
        );
    }
    let fd = ws.path().join("demo/fdalign");
    assert!(fd.join("fdalign_head.safetensors").is_file());
    // Again into the same folder: its outputs are replaced, the feature cache does not pile
    // up, and a file of the user's in the FD-Align folder is refused, as `fdalign train` does.
    let cached = || {
        std::fs::read_dir(ws.path().join("demo/cache"))
            .unwrap()
            .count()
    };
    let before = cached();
    let again = || {
        ws.cmd("demo")
            .arg("--dir")
            .arg(ws.path().join("demo"))
            .arg("--quiet")
            .output()
            .unwrap()
    };
    assert!(again().status.success());
    assert_eq!(cached(), before);
    std::fs::write(fd.join("mine.txt"), b"notes").unwrap();
    assert_fails_with(&again(), "the demo's FD-Align folder");
    assert!(fd.join("mine.txt").is_file());
    std::fs::remove_file(fd.join("mine.txt")).unwrap();
    let o = ws
        .eval_adapter(&fd, &ws.path().join("demo/data"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

/// Runs `clipft demo` with `args` and `env`, checks its first stderr line with `first_line`
/// (the demo has seconds to go after it), sends `signal`, and returns the exit status.
#[cfg(target_os = "linux")]
fn interrupt_demo(
    signal: i32,
    args: &[&std::ffi::OsStr],
    env: Option<(&str, &std::path::Path)>,
    first_line: impl Fn(&str),
) -> std::process::ExitStatus {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_clipft"));
    cmd.arg("demo").args(args);
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let until = |line: &str| {
        first_line(line);
        true
    };
    common::signal_on_line(cmd, until, signal).0
}

/// A signal that the parent ignores stays ignored (`nohup clipft ...`, a shell's background
/// job): SIGHUP in the middle of the demo does not stop it.
#[cfg(target_os = "linux")]
#[test]
fn signals_the_parent_ignores_stay_ignored() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_clipft"));
    cmd.arg("demo").arg("--dir").arg(tmp.path().join("demo"));
    // SAFETY: one async-signal-safe call between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let first = |line: &str| {
        assert!(line.contains("generating"), "{line}");
        true
    };
    let (status, _, rest) = common::signal_on_line(cmd, first, libc::SIGHUP);
    assert!(status.success(), "{status:?}: {rest}");
}

/// A demo that fails (here on a file-size limit, as on a full disk) takes back the `--dir`
/// folders it made.
#[cfg(target_os = "linux")]
#[test]
fn a_failed_demo_leaves_no_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a/demo");
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 64; exec \"$0\" demo --quiet --dir \"$1\"")
        .arg(env!("CARGO_BIN_EXE_clipft"))
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("File too large"), "{}", stderr(&o));
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// SIGTERM during `clipft demo` (no `--dir`) leaves no generated folder behind, and exits with
/// SIGTERM's status, 143.
#[cfg(target_os = "linux")]
#[test]
fn interrupted_demo_removes_its_temporary_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let status = interrupt_demo(libc::SIGTERM, &[], Some(("TMPDIR", tmp.path())), |line| {
        // The first line names the generated folder: it exists.
        assert!(line.contains("clipft-demo-"), "{line}");
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
    });
    assert_eq!(status.code(), Some(143), "{status:?}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Ctrl-C in any command exits with 130 after the write in progress: no temporary file of an
/// atomic write is left, and every file written is whole (here `demo --dir`, whose generated
/// images and feature cache stay).
#[cfg(target_os = "linux")]
#[test]
fn interrupted_commands_leave_no_temporary_or_partial_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let status = interrupt_demo(
        libc::SIGINT,
        &["--dir".as_ref(), dir.as_os_str()],
        None,
        |line| {
            assert!(line.contains("generating"), "{line}");
        },
    );
    assert_eq!(status.code(), Some(130), "{status:?}");
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                !name.starts_with(".clipft-"),
                "left behind: {}",
                p.display()
            );
            if p.is_dir() {
                stack.push(p);
            } else if name.ends_with(".png") {
                image::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
        }
    }
}

#[test]
fn features_writes_normalised_rows_in_dataset_order_and_uses_the_cache() {
    let ws = Workspace::new();
    let out_file = ws.path().join("f.safetensors");
    let run = || {
        ws.cmd("features")
            .args(["--data"])
            .arg(ws.data())
            .args(["--split", "train", "--out"])
            .arg(&out_file)
            .output()
            .unwrap()
    };
    let out = run();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("18 encoded, 0 from cache"),
        "{}",
        stderr(&out)
    );
    let (t, meta) = load_meta(&out_file);
    let f = t["image_features"].to_vec2::<f32>().unwrap();
    let labels = t["labels"].to_vec1::<i64>().unwrap();
    assert_eq!(f.len(), 18);
    assert_eq!(f[0].len(), 32);
    for row in &f {
        let n: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((n - 1.0).abs() < 1e-5);
    }
    assert_eq!(
        labels,
        [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    );
    let paths: Vec<String> = serde_json::from_value(meta["paths"].clone()).unwrap();
    assert!(
        paths[0].ends_with("train/blue_diagonal_stripes/000.png"),
        "{}",
        paths[0]
    );
    assert!(paths[1].ends_with("train/blue_diagonal_stripes/001.jpg"));
    assert_eq!(meta["class_names"][0], "blue diagonal stripes");

    // Second run: everything from the cache, same numbers.
    let out = run();
    assert!(
        stderr(&out).contains("0 encoded, 18 from cache"),
        "{}",
        stderr(&out)
    );
    let (t2, _) = load_meta(&out_file);
    assert_eq!(t2["image_features"].to_vec2::<f32>().unwrap(), f);

    // A changed file is re-encoded alone.
    let img = ws.data().join("train/blue_diagonal_stripes/000.png");
    let mut pixels = image::open(&img).unwrap().to_rgb8();
    pixels.put_pixel(0, 0, image::Rgb([0, 0, 0]));
    std::thread::sleep(std::time::Duration::from_millis(20));
    pixels.save(&img).unwrap();
    let out = run();
    assert!(
        stderr(&out).contains("1 encoded, 17 from cache"),
        "{}",
        stderr(&out)
    );

    // --no-cache encodes everything and gives the same features.
    let out = ws
        .cmd("features")
        .arg("--data")
        .arg(ws.data())
        .args(["--split", "train", "--no-cache", "--out"])
        .arg(&out_file)
        .output()
        .unwrap();
    assert!(stderr(&out).contains("18 encoded"), "{}", stderr(&out));
}

#[test]
fn fast_decode_reduces_large_jpegs_only_and_is_cached_apart() {
    let ws = Workspace::new();
    let run = |fast: bool, out_file: &Path| {
        let mut c = ws.cmd("features");
        c.arg("--data")
            .arg(ws.data())
            .args(["--split", "train", "--out"])
            .arg(out_file);
        if fast {
            c.arg("--fast-decode");
        }
        c.output().unwrap()
    };
    let (exact_file, fast_file) = (ws.path().join("exact.st"), ws.path().join("fast.st"));
    let out = run(false, &exact_file);
    assert!(out.status.success(), "{}", stderr(&out));
    // Not served from the exact run's cache...
    let out = run(true, &fast_file);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("18 encoded, 0 from cache"),
        "{}",
        stderr(&out)
    );
    // ...but from its own.
    let out = run(true, &fast_file);
    assert!(
        stderr(&out).contains("0 encoded, 18 from cache"),
        "{}",
        stderr(&out)
    );
    let (exact, meta) = load_meta(&exact_file);
    let (fast, fast_meta) = load_meta(&fast_file);
    // The file says which pixels its rows came from.
    assert_eq!(meta["decode"], "exact");
    assert_eq!(fast_meta["decode"], "reduced");
    let exact = exact["image_features"].to_vec2::<f32>().unwrap();
    let fast = fast["image_features"].to_vec2::<f32>().unwrap();
    let paths: Vec<String> = serde_json::from_value(meta["paths"].clone()).unwrap();
    let mut reduced = 0;
    for ((p, e), f) in paths.iter().zip(&exact).zip(&fast) {
        let img = image::image_dimensions(p).unwrap();
        // The tiny model resizes to 32 px: JPEGs of 64+ px on both sides decode at half size.
        if p.ends_with(".jpg") && img.0 >= 64 && img.1 >= 64 {
            reduced += 1;
            assert_ne!(e, f, "{p} ({img:?}) should have been reduced");
        } else {
            assert_eq!(e, f, "{p} ({img:?}) is not reduced");
        }
    }
    assert!(reduced > 0, "no JPEG of the set is large enough");
}

#[test]
fn cache_matches_fresh_encoding_and_corrupt_cache_is_rebuilt() {
    let ws = Workspace::new();
    let a = ws.path().join("a.safetensors");
    let b = ws.path().join("b.safetensors");
    let features = |out: &Path| {
        ws.cmd("features")
            .arg("--data")
            .arg(ws.data())
            .args(["--split", "val", "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let ok = features(&a);
    assert!(ok.status.success());
    // Truncate every cache file: the next run must ignore them and rewrite.
    for e in std::fs::read_dir(ws.cache()).unwrap() {
        let p = e.unwrap().path();
        std::fs::write(&p, b"garbage").unwrap();
    }
    let out = features(&b);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("9 encoded, 0 from cache"),
        "{}",
        stderr(&out)
    );
    let fa = load_meta(&a).0["image_features"].to_vec2::<f32>().unwrap();
    let fb = load_meta(&b).0["image_features"].to_vec2::<f32>().unwrap();
    assert_eq!(fa, fb);
    // A row damaged into NaN is encoded again, not served.
    let mut poisoned = 0;
    for e in std::fs::read_dir(ws.cache()).unwrap() {
        let p = e.unwrap().path();
        let (t, meta) = clipft::io::load(&p).unwrap();
        let shape = t["features"].shape().clone();
        let mut flat = t["features"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        flat[0] = f32::NAN;
        let t = candle_core::Tensor::from_vec(flat, shape, &candle_core::Device::Cpu).unwrap();
        clipft::io::save(&p, &[("features", &t)], &meta).unwrap();
        poisoned += 1;
    }
    let out = features(&b);
    assert!(out.status.success(), "{}", stderr(&out));
    let want = format!("{poisoned} encoded, {} from cache", 9 - poisoned);
    assert!(stderr(&out).contains(&want), "{want}: {}", stderr(&out));
    let fb = load_meta(&b).0["image_features"].to_vec2::<f32>().unwrap();
    // (A row encoded alone may differ from one encoded in a batch in the last bits.)
    for (ra, rb) in fa.iter().zip(&fb) {
        for (x, y) in ra.iter().zip(rb) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }
    // No temporary files are left behind.
    for e in std::fs::read_dir(ws.cache()).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(name.ends_with(".safetensors"), "{name}");
    }
}

#[test]
fn few_shot_sampling_is_deterministic_per_seed() {
    let ws = Workspace::new();
    let paths = |seed: &str, name: &str| {
        let f = ws.path().join(name);
        let out = ws
            .cmd("features")
            .arg("--data")
            .arg(ws.data())
            .args(["--shots", "2", "--seed", seed, "--out"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let (_, meta) = load_meta(&f);
        serde_json::from_value::<Vec<String>>(meta["paths"].clone()).unwrap()
    };
    let a = paths("1", "a.safetensors");
    assert_eq!(a.len(), 6);
    assert_eq!(a, paths("1", "b.safetensors"));
    let others: Vec<_> = (2..6)
        .map(|s| paths(&s.to_string(), &format!("s{s}.safetensors")))
        .collect();
    assert!(
        others.iter().any(|o| *o != a),
        "different seeds never changed the sample"
    );
}

#[test]
fn too_few_shots_is_an_error_unless_allowed() {
    let ws = Workspace::new();
    let f = ws.path().join("x.safetensors");
    let out = ws
        .cmd("features")
        .arg("--data")
        .arg(ws.data())
        .args(["--shots", "9", "--out"])
        .arg(&f)
        .output()
        .unwrap();
    assert_fails_with(&out, "--allow-fewer-shots");
    assert!(!f.exists());
    let out = ws
        .cmd("features")
        .arg("--data")
        .arg(ws.data())
        .args(["--shots", "9", "--allow-fewer-shots", "--out"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("warning"), "{}", stderr(&out));
}

#[test]
fn skipped_images_are_listed_with_quiet_and_short_classes_are_named() {
    let ws = Workspace::new();
    // Every train image of one class unreadable, all but one of another's: a sample of 3 keeps
    // none of the first and at most one of the second.
    for (class, keep) in [
        ("blue_diagonal_stripes", 0),
        ("green_horizontal_stripes", 1),
    ] {
        let dir = ws.data().join("train").join(class);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in &files[keep..] {
            std::fs::write(f, b"").unwrap();
        }
    }
    let f = ws.path().join("x.safetensors");
    let out = ws
        .cmd("features")
        .arg("--data")
        .arg(ws.data())
        .args(["--shots", "3", "--skip-bad-images", "-q", "--out"])
        .arg(&f)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    // The header comes with its list, --quiet or not; each file says why.
    assert!(
        err.contains("unreadable image(s) (--skip-bad-images):\n  "),
        "{err}"
    );
    assert!(err.contains("empty file"), "{err}");
    let short = err
        .lines()
        .find(|l| l.contains("--shots 3: after skipping unreadable images, 2 class(es)"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(short.contains("`blue_diagonal_stripes` (none)"), "{short}");
    assert!(short.contains("`green_horizontal_stripes` ("), "{short}");
    assert!(!short.contains("red_vertical_stripes"), "{short}");
}

#[test]
fn eval_json_and_saved_logits_agree() {
    let ws = Workspace::new();
    let logits_file = ws.path().join("logits.safetensors");
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .args(["--split", "test", "--json", "--quiet", "--save-logits"])
        .arg(&logits_file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(report["n"], 12);
    assert!(report["top5"].is_null(), "3 classes have no top-5");
    assert_eq!(report["per_class"].as_array().unwrap().len(), 3);
    let (t, meta) = load_meta(&logits_file);
    let logits = t["logits"].to_vec2::<f32>().unwrap();
    let labels = t["labels"].to_vec1::<i64>().unwrap();
    assert_eq!(logits.len(), 12);
    assert_eq!(meta["paths"].as_array().unwrap().len(), 12);
    // The prompts that made them are recorded.
    assert_eq!(meta["templates"], serde_json::json!(["a photo of a {}."]));
    assert!(meta.get("adapter").is_none());
    // Logits are 100 · cosine.
    assert!(logits.iter().flatten().all(|x| x.abs() <= 100.0 + 1e-3));
    let correct = logits
        .iter()
        .zip(&labels)
        .filter(|(row, &y)| {
            row.iter()
                .enumerate()
                .all(|(j, &v)| v < row[y as usize] || j == y as usize)
        })
        .count();
    let top1 = report["top1"].as_f64().unwrap();
    assert!(
        (top1 - 100.0 * correct as f64 / 12.0).abs() < 1e-9,
        "{top1} vs {correct}"
    );
    // The table form has the same top-1.
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(
        stdout(&out).contains(&format!("{top1:6.2}%")),
        "{}",
        stdout(&out)
    );
}

#[test]
fn bad_images_fail_naming_the_file_or_are_skipped_and_counted() {
    let ws = Workspace::new();
    let bad = ws.data().join("test/blue_diagonal_stripes/zzz_broken.jpg");
    std::fs::write(&bad, b"definitely not a jpeg").unwrap();
    // A real JPEG cut in half: libjpeg fails inside its decoder, which must become an error too.
    let good = std::fs::read(ws.data().join("test/blue_diagonal_stripes/001.jpg")).unwrap();
    let truncated = ws
        .data()
        .join("test/green_horizontal_stripes/zzz_truncated.jpg");
    std::fs::write(&truncated, &good[..good.len() / 3]).unwrap();
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .arg("--quiet")
        .output()
        .unwrap();
    assert_fails_with(&out, "zzz_broken.jpg");
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .args(["--skip-bad-images", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(report["n"], 12);
    assert_eq!(report["skipped"], 2);
    // Listed by name, as `features` lists them.
    assert!(
        stderr(&out).contains("skipped 2 unreadable image")
            && stderr(&out).contains("zzz_broken.jpg"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn dataset_errors_name_the_folder() {
    let ws = Workspace::new();
    // Missing split.
    std::fs::remove_dir_all(ws.data().join("val")).unwrap();
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .args(["--split", "val"])
        .output()
        .unwrap();
    assert_fails_with(&out, "split `val` does not exist");
    // A class missing from a split.
    std::fs::remove_dir_all(ws.data().join("test/purple_checks")).ok();
    std::fs::remove_dir_all(ws.data().join("test/green_horizontal_stripes")).unwrap();
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("missing `green_horizontal_stripes`"),
        "{}",
        stderr(&out)
    );
    // An empty class folder.
    std::fs::create_dir_all(ws.data().join("test/green_horizontal_stripes")).unwrap();
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("green_horizontal_stripes: class folder has no images"),
        "{}",
        stderr(&out)
    );
    // Not a dataset at all.
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.path().join("nope"))
        .output()
        .unwrap();
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
}

#[test]
fn classnames_file_renames_classes_in_outputs() {
    let ws = Workspace::new();
    std::fs::write(
        ws.data().join("classnames.txt"),
        "red_vertical_stripes\tcrimson bars\n",
    )
    .unwrap();
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .args(["--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let names: Vec<&str> = report["per_class"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["class"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "blue diagonal stripes",
            "green horizontal stripes",
            "crimson bars"
        ]
    );
    std::fs::write(ws.data().join("classnames.txt"), "no_such_class\tx\n").unwrap();
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("classnames.txt:1"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn template_files_are_read_and_checked() {
    let ws = Workspace::new();
    let t = ws.path().join("t.txt");
    std::fs::write(&t, "a blurry photo of a {}.\n# comment\nart of the {}.\n").unwrap();
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .arg("--templates")
        .arg(&t)
        .arg("--quiet")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(&t, "a photo\n").unwrap();
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .arg("--templates")
        .arg(&t)
        .output()
        .unwrap();
    assert!(stderr(&out).contains("t.txt:1"), "{}", stderr(&out));
}

#[test]
fn info_says_whether_jpeg_decoding_uses_simd() {
    let ws = Workspace::new();
    let out = ws.cmd("info").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let simd = clipft::preprocess::jpeg_simd();
    assert!(
        stdout(&out).contains(if simd {
            "jpeg decode  libjpeg-turbo, SIMD\n"
        } else {
            "jpeg decode  libjpeg-turbo, no SIMD"
        }),
        "{}",
        stdout(&out)
    );
}

/// `CLIPFT_BLAS` naming something that is not a BLAS is a warning naming it, and the run
/// goes on with the built-in GEMM (which `info` names).
#[test]
fn an_unusable_blas_library_is_named_and_skipped() {
    let ws = Workspace::new();
    let bad = ws.dir.path().join("libnotblas.so");
    std::fs::write(&bad, "not a shared library").unwrap();
    let out = ws.cmd("info").env("CLIPFT_BLAS", &bad).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("CLIPFT_BLAS=")
            && err.contains("libnotblas.so")
            && err.contains("cannot load"),
        "{err}"
    );
    assert!(
        stdout(&out).contains("cpu gemm     built-in (gemm crate)"),
        "{}",
        stdout(&out)
    );
}

/// OpenBLAS made to run its SSE3 kernels (`OPENBLAS_CORETYPE=Prescott`, what an OpenBLAS older
/// than the CPU picks) on an AVX2 CPU is refused, naming the kernels and the way out; with its
/// AVX2 kernels it is used. Skipped where the system has no OpenBLAS or the CPU no AVX2.
#[test]
fn openblas_on_kernels_older_than_the_cpu_is_refused() {
    #[cfg(target_arch = "x86_64")]
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    let avx2 = false;
    let lib = "/usr/lib/x86_64-linux-gnu/libopenblas.so.0";
    if !avx2 || !Path::new(lib).exists() {
        eprintln!("skipped: no {lib} or no AVX2");
        return;
    }
    let ws = Workspace::new();
    let run = |core: &str| {
        let out = ws
            .cmd("info")
            .env("CLIPFT_BLAS", lib)
            .env("OPENBLAS_CORETYPE", core)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        (stdout(&out), stderr(&out))
    };
    let (out, err) = run("Prescott");
    assert!(
        err.contains("`Prescott` kernels")
            && err.contains("chosen by OPENBLAS_CORETYPE=Prescott")
            && err.contains("SkylakeX for AVX-512"),
        "{err}"
    );
    assert!(out.contains("cpu gemm     built-in (gemm crate)"), "{out}");
    let (out, err) = run("Haswell");
    assert!(!err.contains("warning"), "{err}");
    assert!(out.contains(&format!("cpu gemm     {lib}")), "{out}");
}

#[test]
fn device_and_dtype_problems_are_reported_plainly() {
    let ws = Workspace::new();
    let out = ws
        .cmd("info")
        .args(["--dtype", "bf16", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    if clipft::model::gemm_bf16::native() {
        assert!(
            stdout(&out).contains(&format!(
                "BF16 matmuls ({}), F32 activations",
                clipft::model::gemm_bf16::kernel().name()
            )),
            "{}",
            stdout(&out)
        );
        assert!(!stderr(&out).contains("warning"), "{}", stderr(&out));
    } else {
        assert!(
            stderr(&out).contains("warning: --dtype bf16 on the CPU needs AVX512-BF16"),
            "{}",
            stderr(&out)
        );
        assert!(stdout(&out).contains("F32"));
    }
    let out = ws
        .cmd("info")
        .args(["--dtype", "f16", "--device", "cpu"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("F16"));
    if !cfg!(feature = "cuda") {
        let out = ws
            .cmd("info")
            .args(["--device", "cuda:0"])
            .output()
            .unwrap();
        assert_fails_with(&out, "--features cuda");
    }
    let out = ws.cmd("info").args(["--dtype", "f64"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown dtype"), "{}", stderr(&out));
}

#[test]
fn f16_features_stay_close_to_f32() {
    let ws = Workspace::new();
    let run = |dtype: &str| {
        let f = ws.path().join(format!("{dtype}.safetensors"));
        let out = ws
            .cmd("features")
            .arg("--data")
            .arg(ws.data())
            .args([
                "--split", "val", "--device", "cpu", "--dtype", dtype, "--out",
            ])
            .arg(&f)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        load_meta(&f).0["image_features"].to_vec2::<f32>().unwrap()
    };
    let (a, b) = (run("f32"), run("f16"));
    for (x, y) in a.iter().zip(&b) {
        let cos: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
        assert!(cos > 0.999, "{cos}");
    }
}

#[test]
fn help_teaches_the_layout() {
    let out = assert_cmd::Command::cargo_bin("clipft")
        .unwrap()
        .arg("--help")
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(
        text.contains("DIR/{train,val,test}/<class>/<image>"),
        "{text}"
    );
    for sub in ["features", "eval", "demo", "info"] {
        assert!(text.contains(sub));
    }
    // Every extension that is read is named (clap may wrap the line anywhere).
    let words: Vec<&str> = text.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    for ext in clipft::data::IMAGE_EXTENSIONS {
        assert!(words.contains(ext), "{ext}: {text}");
    }
    assert!(words.contains(&"jfif"), "{text}");
}

#[test]
fn adapter_and_templates_do_not_mix() {
    let ws = Workspace::new();
    let adapter = ws.path().join("whatever.safetensors");
    std::fs::write(&adapter, b"x").unwrap();
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .arg("--adapter")
        .arg(&adapter)
        .args(["--templates", "ensemble7"])
        .output()
        .unwrap();
    assert_fails_with(&out, "--templates cannot be combined with --adapter");
}

/// Outputs are checked before any work: a folder given as a file, a folder that cannot be made,
/// and for FD-Align the source model's own folder or a folder of other files.
#[test]
fn outputs_are_checked_before_any_work() {
    let ws = Workspace::new();
    let blocker = ws.path().join("a-file");
    std::fs::write(&blocker, b"x").unwrap();
    let cases: Vec<(Vec<&str>, std::path::PathBuf, &str)> = vec![
        (
            vec!["features", "--split", "val"],
            ws.path().to_path_buf(),
            "that is a folder",
        ),
        (
            vec!["features", "--split", "val"],
            blocker.join("f.safetensors"),
            "is a file, not a folder",
        ),
        (
            vec!["tip", "build-cache"],
            blocker.join("t.safetensors"),
            "is a file, not a folder",
        ),
        (
            vec!["crossmodal", "train"],
            ws.path().to_path_buf(),
            "that is a folder",
        ),
    ];
    for (args, out, want) in cases {
        let o = ws
            .bare(args[0])
            .args(&args[1..])
            .arg("--model")
            .arg(ws.model())
            .arg("--data")
            .arg(ws.data())
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{args:?}");
        let e = stderr(&o);
        assert!(e.contains("--out") && e.contains(want), "{args:?}: {e}");
    }
    let fd = |out: &std::path::Path| {
        ws.bare("fdalign")
            .arg("train")
            .arg("--model")
            .arg(ws.model())
            .arg("--data")
            .arg(ws.data())
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let before = std::fs::read(ws.model().join("model.safetensors")).unwrap();
    // An --out that is one of the model's files would destroy it.
    let o = ws
        .cmd("features")
        .arg("--data")
        .arg(ws.data())
        .args(["--split", "val", "--out"])
        .arg(ws.model().join("model.safetensors"))
        .output()
        .unwrap();
    assert_fails_with(&o, "which this command reads");
    // So would one that is an image of the dataset.
    let class = std::fs::read_dir(ws.data().join("train"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let image = class.join("000.png");
    let pixels = std::fs::read(&image).unwrap();
    let o = ws
        .cmd("features")
        .arg("--data")
        .arg(ws.data())
        .arg("--out")
        .arg(&image)
        .output()
        .unwrap();
    assert_fails_with(&o, "an image of the dataset");
    assert_eq!(std::fs::read(&image).unwrap(), pixels);
    // An image-named output inside the dataset would be read as an image next time, and
    // classnames.txt names the classes: neither is an output.
    // (Also through a symbolic link, which is written through.)
    let link = ws.path().join("link.png");
    #[cfg(unix)]
    std::os::unix::fs::symlink(class.join("new2.png"), &link).unwrap();
    for (out, want) in [
        (class.join("new.png"), "or would be read as one"),
        (
            ws.data().join("classnames.txt"),
            "the dataset's classnames.txt",
        ),
        #[cfg(unix)]
        (link, "or would be read as one"),
    ] {
        let o = ws
            .cmd("features")
            .arg("--data")
            .arg(ws.data())
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert_fails_with(&o, want);
        assert!(!out.exists());
    }
    assert!(!class.join("new2.png").exists());
    // Nor is a --templates file.
    let templates = ws.path().join("templates.txt");
    std::fs::write(&templates, "a photo of a {}.\n").unwrap();
    let o = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .arg("--templates")
        .arg(&templates)
        .arg("--save-logits")
        .arg(&templates)
        .output()
        .unwrap();
    assert_fails_with(&o, "the --templates file");
    assert_eq!(std::fs::read(&templates).unwrap(), b"a photo of a {}.\n");
    let o = fd(&ws.model());
    assert_fails_with(&o, "source model's folder");
    assert_eq!(
        std::fs::read(ws.model().join("model.safetensors")).unwrap(),
        before
    );
    let other = ws.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("notes.txt"), b"mine").unwrap();
    let o = fd(&other);
    assert_fails_with(&o, "not an FD-Align output");
}

/// Zero-shot cannot tell apart classes whose prompts tokenize the same (the tokenizer ignores
/// case): refused, naming both. Prompts cut to the context length are reported.
#[test]
fn indistinguishable_class_names_and_cut_prompts_are_reported() {
    let ws = Workspace::new();
    let folders: Vec<String> = std::fs::read_dir(ws.data().join("test"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    std::fs::write(
        ws.data().join("classnames.txt"),
        format!("{}\tSea Lion\n{}\tsea lion\n", folders[0], folders[1]),
    )
    .unwrap();
    let eval = || {
        ws.cmd("eval")
            .arg("--data")
            .arg(ws.data())
            .output()
            .unwrap()
    };
    let out = eval();
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("\"Sea Lion\"") && e.contains("\"sea lion\"") && e.contains("same prompts"),
        "{e}"
    );
    std::fs::remove_file(ws.data().join("classnames.txt")).unwrap();
    let long = ws.path().join("long.txt");
    std::fs::write(
        &long,
        format!("a photo of a {{}}{}\n", " and more".repeat(60)),
    )
    .unwrap();
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .arg("--templates")
        .arg(&long)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("were cut to fit"), "{}", stderr(&out));
    // A template that cuts the class name away makes every class alike under it: refused only
    // when no template tells them apart, and the message names the cut, in either order.
    let early = |first: &str, second: &str| {
        std::fs::write(&long, format!("{first}\n{second}\n")).unwrap();
        ws.cmd("eval")
            .arg("--data")
            .arg(ws.data())
            .arg("--templates")
            .arg(&long)
            .output()
            .unwrap()
    };
    let cut = format!("{} {{}}", "a long prefix".repeat(40));
    for order in [
        (cut.as_str(), "a photo of a {}."),
        ("a photo of a {}.", &cut),
    ] {
        let out = early(order.0, order.1);
        assert!(out.status.success(), "{order:?}: {}", stderr(&out));
    }
    let out = early(&cut, &format!("{} and {{}}", "words".repeat(80)));
    assert_fails_with(&out, "cut at the text tower's context length");
    // Names that differ only past the cut are blamed on the cut, not on case or spacing.
    let prefix = "word ".repeat(90);
    std::fs::write(
        ws.data().join("classnames.txt"),
        format!("{}\t{prefix}one\n{}\t{prefix}two\n", folders[0], folders[1]),
    )
    .unwrap();
    let out = eval();
    assert_fails_with(&out, "cut at the text tower's context length");
}

/// A feature cache that cannot be written costs a warning, not the run; a split with no
/// readable image is an error, not a score of 0%.
#[test]
fn unwritable_cache_warns_and_empty_splits_are_refused() {
    let ws = Workspace::new();
    let not_a_dir = ws.path().join("cache-file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let out = ws
        .bare("features")
        .arg("--model")
        .arg(ws.model())
        .arg("--data")
        .arg(ws.data())
        .args(["--split", "val", "--cache-dir"])
        .arg(&not_a_dir)
        .arg("--out")
        .arg(ws.path().join("f.safetensors"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("could not write the feature cache"),
        "{}",
        stderr(&out)
    );
    assert!(ws.path().join("f.safetensors").is_file());
    for class in std::fs::read_dir(ws.data().join("test")).unwrap() {
        for img in std::fs::read_dir(class.unwrap().path()).unwrap() {
            std::fs::write(img.unwrap().path(), b"broken").unwrap();
        }
    }
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .arg("--skip-bad-images")
        .output()
        .unwrap();
    assert_fails_with(&out, "no image to score");
}

/// A checkpoint with broken (NaN) weights gives no features file and no cache entries: a NaN
/// projection, and a single NaN in a key projection (which reaches the features only through the
/// attention softmax, as in `transformers`).
#[test]
fn non_finite_features_are_an_error() {
    for name in [
        "visual_projection.weight",
        "vision_model.encoder.layers.0.self_attn.k_proj.weight",
    ] {
        let ws = Workspace::new();
        let broken = ws.path().join("broken-model");
        common::copy_dir(&ws.model(), &broken);
        let weights = broken.join("model.safetensors");
        let mut t = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
        let w = &t[name];
        let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        v[0] = f32::NAN;
        let nan = candle_core::Tensor::from_vec(v, w.shape(), &candle_core::Device::Cpu).unwrap();
        t.insert(name.into(), nan);
        candle_core::safetensors::save(&t, &weights).unwrap();
        assert_no_features(&ws, &broken, name);
    }
}

fn assert_no_features(ws: &Workspace, broken: &std::path::Path, name: &str) {
    let out = ws.path().join("f.safetensors");
    let o = ws
        .bare("features")
        .arg("--model")
        .arg(broken)
        .arg("--data")
        .arg(ws.data())
        .args(["--split", "val", "--cache-dir"])
        .arg(ws.cache())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_fails_with(&o, "non-finite features");
    assert!(!out.exists(), "{name}");
}

/// Flags that would otherwise be silently ignored are refused.
#[test]
fn flags_that_would_be_ignored_are_refused() {
    let ws = Workspace::new();
    // --head-variant only picks a head of a cross-modal artifact.
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .args(["--head-variant", "wiseft"])
        .output()
        .unwrap();
    assert_fails_with(&out, "--head-variant");
    // The cross-modal sweep picks lr, weight decay and batch itself: giving one needs --no-sweep.
    for flag in [["--lr", "0.5"], ["--weight-decay", "0.1"], ["--batch", "8"]] {
        let out = ws
            .bare("crossmodal")
            .arg("train")
            .arg("--model")
            .arg(ws.model())
            .arg("--data")
            .arg(ws.data())
            .args(flag)
            .arg("--out")
            .arg(ws.path().join("head.safetensors"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{flag:?}");
        assert!(stderr(&out).contains("--no-sweep"), "{}", stderr(&out));
    }
    // A weight decay that is no number would train NaN heads: refused before any work.
    for wd in ["nan", "inf", "-0.5"] {
        let head = ws.path().join("head.safetensors");
        let out = ws
            .bare("crossmodal")
            .arg("train")
            .arg("--model")
            .arg(ws.model())
            .arg("--data")
            .arg(ws.data())
            .arg("--no-sweep")
            .arg(format!("--weight-decay={wd}"))
            .arg("--out")
            .arg(&head)
            .output()
            .unwrap();
        assert_fails_with(&out, "--weight-decay must be a non-negative number");
        assert!(!head.exists());
    }
    // Written as a separate word, a negative number still reaches the flag's own check.
    let out = ws
        .bare("crossmodal")
        .arg("train")
        .arg("--model")
        .arg(ws.model())
        .arg("--data")
        .arg(ws.data())
        .args(["--no-sweep", "--weight-decay", "-0.5", "--out"])
        .arg(ws.path().join("head.safetensors"))
        .output()
        .unwrap();
    assert_fails_with(&out, "--weight-decay must be a non-negative number");
    // --method chooses among methods without --adapter.
    let tip = ws.path().join("tip.safetensors");
    std::fs::write(&tip, b"x").unwrap();
    let out = ws
        .cmd("eval")
        .arg("--data")
        .arg(ws.data())
        .args(["--method", "zeroshot", "--adapter"])
        .arg(&tip)
        .output()
        .unwrap();
    assert_fails_with(&out, "--method zeroshot cannot be combined with --adapter");
}

/// Inputs that are missing, or of the wrong kind, are named with their flag.
#[test]
fn wrong_kinds_of_input_paths_name_their_flag() {
    let ws = Workspace::new();
    let eval = |adapter: &Path, data: &Path| {
        ws.cmd("eval")
            .arg("--data")
            .arg(data)
            .arg("--adapter")
            .arg(adapter)
            .output()
            .unwrap()
    };
    let nothing = ws.path().join("nothing.safetensors");
    assert_fails_with(&eval(&nothing, &ws.data()), "--adapter");
    assert_fails_with(&eval(&nothing, &ws.data()), "no such file or folder");
    let file = ws.path().join("f.txt");
    std::fs::write(&file, b"x").unwrap();
    assert_fails_with(&eval(&nothing, &file), "a file, not a dataset folder");
    let out = ws
        .bare("tip")
        .arg("train")
        .arg("--model")
        .arg(ws.model())
        .arg("--cache")
        .arg(ws.data())
        .arg("--data")
        .arg(ws.data())
        .arg("--out")
        .arg(ws.path().join("t.safetensors"))
        .output()
        .unwrap();
    assert_fails_with(&out, "--cache");
    assert_fails_with(&out, "a folder, not a file");
    let out = ws.bare("info").args(["--model", ""]).output().unwrap();
    assert_fails_with(&out, "--model");
    // The demo writes only into a new, empty or earlier demo's folder.
    let mine = ws.path().join("mine");
    std::fs::create_dir_all(mine.join("data/train/cats")).unwrap();
    let out = ws.bare("demo").arg("--dir").arg(&mine).output().unwrap();
    assert_fails_with(&out, "not an earlier demo's");
    assert!(!mine.join("model").exists());
}

#[test]
fn a_run_stopped_by_a_bad_image_keeps_what_it_encoded_in_the_cache() {
    let ws = Workspace::new();
    let train = ws.data().join("train");
    let mut classes: Vec<_> = std::fs::read_dir(&train)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    classes.sort();
    // Last in encoding order: every good image is encoded before it.
    std::fs::write(
        classes.last().unwrap().join("zzz_broken.jpg"),
        b"not a jpeg",
    )
    .unwrap();
    let out_file = ws.path().join("f.safetensors");
    let run = |extra: &[&str]| {
        ws.cmd("features")
            .arg("--data")
            .arg(ws.data())
            .args(["--split", "train", "--batch-size", "1", "--out"])
            .arg(&out_file)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    assert_fails_with(&out, "zzz_broken.jpg");
    assert!(!out_file.exists(), "no output after a failed run");
    let out = run(&["--skip-bad-images"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("0 encoded, 18 from cache"),
        "{}",
        stderr(&out)
    );
}

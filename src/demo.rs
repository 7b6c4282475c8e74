//! `clipft demo`: the embedded default. Generates a small random CLIP checkpoint and a labelled
//! image set, then runs the pipeline end to end, with no network and no files from the user.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use crate::data::{Dataset, Split};
use crate::features::ExtractOptions;
use crate::model::{synth, Clip, ModelSpec};

/// Marks a folder the demo wrote, which a later demo may write again.
const MARKER: &str = ".clipft_demo";

/// `--dir` must be new, empty, or an earlier demo's: the demo writes `model/` and `data/` in it
/// and must not mix its files into a user's dataset or overwrite a user's model.
fn check_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    anyhow::ensure!(
        dir.is_dir(),
        "--dir {}: a file, not a folder",
        dir.display()
    );
    let empty = std::fs::read_dir(dir)
        .with_context(|| format!("--dir {}", dir.display()))?
        .next()
        .is_none();
    anyhow::ensure!(
        empty || dir.join(MARKER).is_file(),
        "--dir {}: the folder holds files that are not an earlier demo's; give a new or empty \
         folder",
        dir.display()
    );
    Ok(())
}

/// Removes the folders of demos that were killed (SIGKILL leaves no chance to clean up) from
/// the temporary folder, once a day old: no demo runs that long.
fn remove_stale_demos(tmp: &Path) {
    crate::io::remove_stale(tmp, |p| {
        let name = p.file_name().unwrap_or_default().to_string_lossy();
        let folder = std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
        name.starts_with("clipft-demo-") && folder && p.join("model").is_dir()
    });
}

pub fn run(dir: Option<&Path>, quiet: bool, out: &mut impl Write) -> Result<()> {
    let Some(dir) = dir else {
        return run_in(None, quiet, out);
    };
    check_dir(dir)?;
    let made = crate::io::missing_folders(dir);
    // A run that fails (a full disk, say) takes back a folder that was new or empty: all in it
    // is its own. An earlier demo's folder stays, for the next demo to write again.
    let fresh = !made.is_empty() || std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
    let result = run_in(Some(dir), quiet, out);
    if result.is_err() && fresh {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let p = e.path();
                let _ = if p.is_dir() && !p.is_symlink() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
        crate::io::remove_empty_folders(&made);
    }
    result
}

fn run_in(dir: Option<&Path>, quiet: bool, out: &mut impl Write) -> Result<()> {
    let tmp;
    let root = match dir {
        Some(d) => d.to_path_buf(),
        None => {
            remove_stale_demos(&std::env::temp_dir());
            tmp = tempfile::Builder::new().prefix("clipft-demo-").tempdir()?;
            // Ctrl-C ends the process without running `TempDir`'s drop.
            crate::interrupt::remove_on_interrupt(tmp.path());
            tmp.path().to_path_buf()
        }
    };
    if dir.is_some() {
        crate::io::write_atomic(&root.join(MARKER), b"a folder of `clipft demo --dir`\n")?;
        // An earlier demo's features are of images about to be generated again (new file
        // times, so new cache keys): they would only pile up.
        let cache = root.join("cache");
        if cache.is_dir() {
            std::fs::remove_dir_all(&cache)
                .with_context(|| format!("removing {}", cache.display()))?;
        }
    }
    let model_dir = root.join("model");
    let data_dir = root.join("data");
    crate::cli::info(
        format!(
            "generating a random CLIP checkpoint in {}",
            model_dir.display()
        ),
        quiet,
    );
    // Held while generating, so that an interrupt's removal does not race with new files.
    let writing = crate::interrupt::writing();
    synth::write_checkpoint(&model_dir, &synth::tiny_config(), 0)?;
    crate::cli::info(
        format!("generating a 6-class image set in {}", data_dir.display()),
        quiet,
    );
    synth::write_dataset(&data_dir, 6, [("train", 16), ("val", 8), ("test", 20)], 0)?;
    drop(writing);

    let clip = Clip::load(&ModelSpec::local(&model_dir))?;
    writeln!(out, "model: {}", clip.describe())?;
    let dataset = Dataset::open(&data_dir)?;
    let opts = ExtractOptions {
        batch_size: 32,
        skip_bad_images: false,
        progress: !quiet,
        cache_dir: Some(root.join("cache")),
        ..ExtractOptions::default()
    };
    let templates = crate::templates::resolve("clip")?;
    let run = crate::eval::zero_shot(&clip, &dataset, Split::Test, &templates, &opts)?;
    writeln!(
        out,
        "(random weights: zero-shot accuracy is at chance level, about {:.1}%)",
        100.0 / dataset.classes.len() as f64
    )?;
    crate::eval::write_table(&run.report, out)?;
    let mut reports = vec![run.report];
    reports.extend(crate::methods::tip_cli::demo(
        &clip, &dataset, &opts, quiet, out,
    )?);
    reports.extend(crate::methods::crossmodal_cli::demo(
        &clip, &dataset, &opts, quiet, out,
    )?);
    reports.push(crate::methods::fdalign_cli::demo(
        &clip,
        &dataset,
        &root.join("fdalign"),
        &opts,
        quiet,
        out,
    )?);
    writeln!(out)?;
    writeln!(out, "test top-1 side by side")?;
    for r in &reports {
        writeln!(out, "  {:<14} {:6.2}%", r.method, r.top1)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a day-old demo folder (of a killed demo) is removed; a young one may be running.
    #[cfg(target_os = "linux")]
    #[test]
    fn stale_demo_folders_are_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 24 * 3600);
        let make = |name: &str, aged: bool| {
            let p = tmp.path().join(name);
            std::fs::create_dir_all(p.join("model")).unwrap();
            if aged {
                std::fs::File::open(&p).unwrap().set_modified(old).unwrap();
            }
            p
        };
        let stale = make("clipft-demo-AAAA", true);
        let fresh = make("clipft-demo-BBBB", false);
        let other = make("not-a-demo", true);
        remove_stale_demos(tmp.path());
        assert!(!stale.exists());
        assert!(fresh.exists() && other.exists());
    }
}

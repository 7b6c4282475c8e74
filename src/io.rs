//! Safetensors files with JSON metadata, written atomically.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};

/// Key under which clipft stores its JSON metadata in a safetensors header.
pub const META_KEY: &str = "clipft";

/// The temporary files of [`write_atomic`] (and of write probes): hidden, named apart from any
/// output.
fn temp_builder() -> tempfile::Builder<'static, 'static> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(".clipft-").suffix(".tmp");
    builder
}

/// Whether `path` is a temporary file of [`write_atomic`]: one left behind means a write was
/// killed before its rename.
pub fn is_temporary(path: &Path) -> bool {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    name.starts_with(".clipft-") && name.ends_with(".tmp") && path.is_file()
}

/// Whether new files can be created in folder `dir` (a temporary one is made and removed).
pub fn probe_writable(dir: &Path) -> std::io::Result<()> {
    temp_builder().tempfile_in(dir).map(drop)
}

/// Makes folder `dir` and its missing parents; a part of the path that is a file is named as such
/// (the OS says only "File exists").
pub fn create_folder(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| {
        let file = dir
            .ancestors()
            .find(|a| !a.as_os_str().is_empty() && a.exists() && !a.is_dir());
        match file {
            Some(f) => anyhow::anyhow!(
                "creating folder {}: {} is a file, not a folder",
                dir.display(),
                f.display()
            ),
            None => anyhow::Error::new(e).context(format!("creating folder {}", dir.display())),
        }
    })
}

/// The file an output path stands for: symbolic links are followed (a dangling one to where it
/// points), so that a link stays a link and its target is replaced, as with `cp` or a shell
/// redirection.
pub fn output_target(path: &Path) -> Result<PathBuf> {
    let mut at = path.to_path_buf();
    // (The OS's own limit on a chain of links.)
    for _ in 0..40 {
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&at)
                    .with_context(|| format!("reading the link {}", at.display()))?;
                // (`join` keeps an absolute target as it is.)
                at = at.parent().map_or(to.clone(), |p| p.join(&to));
            }
            _ => return Ok(at),
        }
    }
    anyhow::bail!("{}: too many levels of symbolic links", path.display())
}

/// Refuses to replace what is not a regular file: renaming a new file over a device (as root,
/// `/dev/null` itself), a named pipe or a socket would destroy it.
fn ensure_not_special(shown: &Path, target: &Path, flag: &str) -> Result<()> {
    // (Not following a link: a link is replaced, never what it points at.)
    let Ok(meta) = std::fs::symlink_metadata(target) else {
        return Ok(());
    };
    let ft = meta.file_type();
    if ft.is_file() || ft.is_dir() || ft.is_symlink() {
        return Ok(());
    }
    #[cfg(unix)]
    let what = {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_fifo() {
            "a named pipe (FIFO)"
        } else if ft.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        }
    };
    #[cfg(not(unix))]
    let what = "not a regular file";
    anyhow::bail!(
        "{flag}{}{}: that is {what}; clipft writes each output as a whole new file renamed into \
         place, which would replace it: give a file path",
        if flag.is_empty() { "" } else { " " },
        shown.display()
    )
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so readers
/// see the old file or the complete new one, never a partial write. A file replaced keeps its
/// permissions. A symbolic link at `path` is replaced, not written through: files inside
/// clipft's own folders (an FD-Align output, a feature cache) never reach elsewhere; a
/// user-named output is resolved first ([`check_writable`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    // The folder may be one that Ctrl-C removes (the demo's feature cache).
    let _writing = crate::interrupt::writing();
    ensure_not_special(path, path, "")?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    // A write that fails (a full disk) takes back the folders it made for the file.
    let made = missing_folders(parent);
    create_folder(parent)?;
    let written = write_into(path, parent, bytes);
    if written.is_err() {
        remove_empty_folders(&made);
    }
    written
}

/// [`write_atomic`]'s temporary file in `parent` (which exists), renamed to `path`.
fn write_into(path: &Path, parent: &Path, bytes: &[u8]) -> Result<()> {
    let mut builder = temp_builder();
    // Temporary files are private (0600); the output is an ordinary file, so ask for 0666 and
    // let the umask decide, as any other file the user creates.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder
        .tempfile_in(parent)
        .with_context(|| format!("creating a temporary file in {}", parent.display()))?;
    if let Some(old) = std::fs::symlink_metadata(path).ok().filter(|m| m.is_file()) {
        let mut keep = old.permissions();
        #[cfg(unix)]
        {
            use std::os::unix::fs::{fchown, MetadataExt, PermissionsExt};
            // (Access bits only: a setuid bit is not for a new file's contents, as with `cp`.)
            let mode = keep.mode() & 0o777;
            keep.set_mode(mode);
            // The owner and group too, where this user may give them (root; a group it is
            // in), as an editor's save keeps them. Before the mode: a change of owner may
            // clear mode bits.
            let file = tmp.as_file();
            if fchown(file, Some(old.uid()), Some(old.gid())).is_err() {
                let _ = fchown(file, None, Some(old.gid()));
            }
        }
        tmp.as_file()
            .set_permissions(keep)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Removes temporary files that a killed run left in folder `dir` (an interrupted atomic write;
/// an output or a feature cache can be hundreds of MB). Best effort.
pub fn remove_stale_temporaries(dir: &Path) {
    remove_stale(dir, is_temporary);
}

/// Removes what a killed run left in folder `dir`: the entries `left_by_clipft` recognises that
/// are a day old (a younger one may belong to a run working right now), folders with their
/// contents. Best effort.
pub fn remove_stale(dir: &Path, left_by_clipft: impl Fn(&Path) -> bool) {
    const STALE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(meta) = entry.metadata().ok().filter(|m| {
            m.modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE)
        }) else {
            continue;
        };
        let path = entry.path();
        if left_by_clipft(&path) {
            let _ = if meta.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
        }
    }
}

/// Checks, before any work, that `flag`'s output file `path` can be written: it is not a folder
/// or a special file (device, named pipe, socket), and its nearest existing folder takes new
/// files (the missing ones are made only when the output is written, so a run that fails leaves
/// no empty folders behind). Saves a long run from failing only at its end. Returns the path to
/// write: `path` with its symbolic links followed ([`output_target`]).
pub fn check_writable(path: &Path, flag: &str) -> Result<PathBuf> {
    let target = output_target(path)?;
    anyhow::ensure!(
        !target.is_dir(),
        "{flag} {}: that is a folder; give a file path",
        path.display()
    );
    // (A path ending in `/` names a folder: the write would fail only after all the work.)
    anyhow::ensure!(
        !path
            .as_os_str()
            .to_string_lossy()
            .ends_with(std::path::MAIN_SEPARATOR),
        "{flag} {}: ends in `{}`, so it names a folder; give a file path",
        path.display(),
        std::path::MAIN_SEPARATOR
    );
    ensure_not_special(path, &target, flag)?;
    // The rename would replace a file its owner made read-only; `cp` and `>` refuse it too.
    anyhow::ensure!(
        !target.is_file() || may_write(&target),
        "{flag} {}: the file is read-only; make it writable (chmod u+w) or give another path",
        path.display()
    );
    let parent = match target.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    check_can_make(parent, path, flag)?;
    remove_stale_temporaries(parent);
    Ok(target)
}

/// Whether this user may write to the existing file `path`, by its permissions (root may write
/// any file).
pub fn may_write(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
            return true;
        };
        // SAFETY: a NUL-terminated path; access(2) only reads it.
        unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
    }
    #[cfg(not(unix))]
    {
        std::fs::metadata(path).map_or(true, |m| !m.permissions().readonly())
    }
}

/// The folders of `dir` that do not exist yet, `dir` first: what a run that writes in it would
/// make, and should take back ([`remove_empty_folders`]) if it fails.
pub fn missing_folders(dir: &Path) -> Vec<PathBuf> {
    dir.ancestors()
        .take_while(|p| !p.as_os_str().is_empty() && std::fs::symlink_metadata(p).is_err())
        .map(Path::to_path_buf)
        .collect()
}

/// Removes folders of [`missing_folders`], deepest first, while they are empty.
pub fn remove_empty_folders(made: &[PathBuf]) {
    for dir in made {
        if std::fs::remove_dir(dir).is_err() {
            break;
        }
    }
}

/// Checks that folder `dir` exists and takes new files, or can be made: its nearest existing
/// ancestor is a folder that takes new files. Makes nothing. Errors name `flag` and `shown`.
pub fn check_can_make(dir: &Path, shown: &Path, flag: &str) -> Result<()> {
    let mut at = dir;
    while std::fs::symlink_metadata(at).is_err() {
        match at.parent() {
            Some(p) if !p.as_os_str().is_empty() => at = p,
            _ => {
                at = Path::new(".");
                break;
            }
        }
    }
    anyhow::ensure!(
        at.is_dir(),
        "{flag} {}: {} is a file, not a folder",
        shown.display(),
        at.display()
    );
    probe_writable(at).with_context(|| {
        format!(
            "{flag} {}: cannot write in {}",
            shown.display(),
            at.display()
        )
    })
}

/// Where `path` is or would be: its nearest existing ancestor resolved (links followed, `..`
/// removed), with the rest of the path after it. `None` when nothing of it can be resolved.
pub fn resolved(path: &Path) -> Option<PathBuf> {
    let mut rest = Vec::new();
    let mut at = path;
    loop {
        let here = if at.as_os_str().is_empty() {
            Path::new(".")
        } else {
            at
        };
        if let Ok(c) = here.canonicalize() {
            return Some(rest.iter().rev().fold(c, |p: PathBuf, n| p.join(n)));
        }
        rest.push(at.file_name()?.to_os_string());
        at = at.parent()?;
    }
}

/// Refuses an output path that names one of the command's input files (`(path, what)` pairs):
/// writing it would destroy the input. A path that does not exist yet names no input.
pub fn ensure_not_input<'a>(
    out: &Path,
    flag: &str,
    inputs: impl IntoIterator<Item = (&'a Path, &'a str)>,
) -> Result<()> {
    let Ok(out_c) = out.canonicalize() else {
        return Ok(());
    };
    for (path, what) in inputs {
        anyhow::ensure!(
            path.canonicalize().ok().as_ref() != Some(&out_c),
            "{flag} {}: that is {what}, which this command reads; give another path",
            out.display()
        );
    }
    Ok(())
}

/// Saves named tensors plus a JSON metadata value atomically.
pub fn save(path: &Path, tensors: &[(&str, &Tensor)], meta: &serde_json::Value) -> Result<()> {
    let meta = HashMap::from([(META_KEY.to_string(), meta.to_string())]);
    let cpu: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.to_string(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<_>>()?;
    let bytes = safetensors::serialize(cpu.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .with_context(|| format!("serialising {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// A safetensors parse error of the file at `path`, as a message that says what a size
/// mismatch means.
pub fn bad_safetensors(path: &Path, e: &safetensors::SafeTensorError) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", path.display(), safetensors_problem(e))
}

/// [`bad_safetensors`]'s message, without the path.
pub fn safetensors_problem(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    let hint = match e {
        E::MetadataIncompleteBuffer => {
            " (its size does not match its header: the file was cut short or damaged, as by an \
             interrupted copy or download)"
        }
        E::HeaderTooSmall | E::InvalidHeaderLength => {
            " (the file was cut short, or is not a safetensors file)"
        }
        _ => "",
    };
    format!("not a valid safetensors file: {e}{hint}")
}

/// Loads every tensor (on the CPU) and clipft's metadata of a safetensors file.
pub fn load(path: &Path) -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        // (As text: the error's source repeats its message, and a chain would print it twice.)
        .map_err(|e| bad_safetensors(path, &e))?;
    let meta = match header.metadata().as_ref().and_then(|m| m.get(META_KEY)) {
        Some(text) => serde_json::from_str(text)
            .with_context(|| format!("{}: malformed clipft metadata", path.display()))?,
        None => serde_json::Value::Null,
    };
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("{}: reading tensors", path.display()))?;
    Ok((tensors, meta))
}

/// The tensor `name` of a loaded file, or an error naming the file. Every tensor clipft writes
/// is floating point: an integer one (a file from elsewhere) is refused rather than cast, and a
/// NaN or infinity is refused here, naming the tensor, rather than surfacing later as
/// meaningless logits.
pub fn take(tensors: &mut HashMap<String, Tensor>, name: &str, path: &Path) -> Result<Tensor> {
    let t = tensors
        .remove(name)
        .with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
    anyhow::ensure!(
        t.dtype().is_float(),
        "{}: tensor `{name}` is {:?}, not floating point: not a file clipft wrote",
        path.display(),
        t.dtype()
    );
    // (The sum of |x| of finite values stays finite for any weights a model could hold.)
    let sum = t.to_dtype(candle_core::DType::F32)?.abs()?.sum_all()?;
    anyhow::ensure!(
        sum.to_scalar::<f32>()?.is_finite(),
        "{}: tensor `{name}` holds NaN or infinite values: the file is damaged, or was \
         written by a run that diverged",
        path.display()
    );
    Ok(t)
}

/// [`take`] for a matrix, returned as f32.
pub fn take_matrix(
    tensors: &mut HashMap<String, Tensor>,
    name: &str,
    path: &Path,
) -> Result<Tensor> {
    let t = take(tensors, name, path)?;
    anyhow::ensure!(
        t.rank() == 2,
        "{}: tensor `{name}` has shape {:?}; a matrix was expected",
        path.display(),
        t.dims()
    );
    Ok(t.to_dtype(candle_core::DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_refuses_missing_and_non_finite_tensors() {
        let p = Path::new("a.safetensors");
        let mut m = HashMap::new();
        m.insert(
            "ok".to_string(),
            Tensor::new(&[1f32, -2.0], &Device::Cpu).unwrap(),
        );
        m.insert(
            "nan".to_string(),
            Tensor::new(&[1f32, f32::NAN], &Device::Cpu).unwrap(),
        );
        m.insert(
            "ids".to_string(),
            Tensor::new(&[1u32, 2], &Device::Cpu).unwrap(),
        );
        assert!(take(&mut m, "ok", p).is_ok());
        let e = take(&mut m, "ids", p).unwrap_err().to_string();
        assert!(e.contains("`ids` is U32, not floating point"), "{e}");
        let e = take(&mut m, "nan", p).unwrap_err().to_string();
        assert!(e.contains("a.safetensors") && e.contains("`nan`"), "{e}");
        assert!(take(&mut m, "gone", p).is_err());
    }

    /// A malformed header is reported once, naming the file.
    #[test]
    fn a_bad_header_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        let header = br#"{"head": 5}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        std::fs::write(&p, bytes).unwrap();
        let e = format!("{:#}", load(&p).unwrap_err());
        assert!(
            e.contains("x.safetensors: not a valid safetensors file"),
            "{e}"
        );
        assert_eq!(e.matches("expected struct TensorInfo").count(), 1, "{e}");
        // A file cut short (an interrupted copy) says so.
        save(
            &p,
            &[(
                "t",
                &Tensor::zeros(64, candle_core::DType::F32, &Device::Cpu).unwrap(),
            )],
            &serde_json::Value::Null,
        )
        .unwrap();
        let whole = std::fs::read(&p).unwrap();
        std::fs::write(&p, &whole[..whole.len() - 10]).unwrap();
        let e = format!("{:#}", load(&p).unwrap_err());
        assert!(e.contains("the file was cut short or damaged"), "{e}");
    }

    /// The check makes nothing (a run that fails later leaves no empty folders); a file in the
    /// path is named as such, by the check and by the write.
    #[test]
    fn checking_an_output_path_makes_no_folders() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a/b/out.bin");
        check_writable(&out, "--out").unwrap();
        assert!(!dir.path().join("a").exists());
        write_atomic(&out, b"x").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"x");

        let file = dir.path().join("afile");
        std::fs::write(&file, b"x").unwrap();
        let under = file.join("sub/out.bin");
        let e = check_writable(&under, "--out").unwrap_err().to_string();
        assert!(e.contains("afile is a file, not a folder"), "{e}");
        let e = format!("{:#}", write_atomic(&under, b"x").unwrap_err());
        assert!(e.contains("afile is a file, not a folder"), "{e}");
        let e = check_writable(dir.path(), "--out").unwrap_err().to_string();
        assert!(e.contains("that is a folder"), "{e}");
        // A new path ending in `/` is a folder too, refused before any work.
        let slash = PathBuf::from(format!("{}/new/", dir.path().display()));
        let e = check_writable(&slash, "--out").unwrap_err().to_string();
        assert!(e.contains("ends in `/`, so it names a folder"), "{e}");
    }

    /// A write that fails after making the file's folders (here the rename, on a name too long
    /// for the file system, as a full disk fails the write) takes them back.
    #[cfg(unix)]
    #[test]
    fn a_failed_write_takes_back_the_folders_it_made() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("a/b").join("x".repeat(300));
        assert!(write_atomic(&out, b"x").is_err());
        assert!(!dir.path().join("a").exists());
        // Folders that were there stay.
        std::fs::create_dir(dir.path().join("a")).unwrap();
        assert!(write_atomic(&out, b"x").is_err());
        assert!(dir.path().join("a").is_dir() && !dir.path().join("a/b").exists());
    }

    /// `dir/out.bin`, made with permission bits `mode`.
    #[cfg(unix)]
    fn file_with_mode(dir: &Path, mode: u32) -> PathBuf {
        let out = dir.join("out.bin");
        std::fs::write(&out, b"old").unwrap();
        set_mode(&out, mode);
        out
    }

    #[cfg(unix)]
    fn set_mode(path: &Path, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// An existing output its owner made read-only is refused, as `cp` refuses it (root may
    /// write any file, so only checked as another user).
    #[cfg(unix)]
    #[test]
    fn read_only_outputs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = file_with_mode(dir.path(), 0o444);
        // SAFETY: a query with no arguments.
        let root = unsafe { libc::geteuid() } == 0;
        let checked = check_writable(&out, "--out");
        if root {
            assert!(checked.is_ok());
        } else {
            let e = checked.unwrap_err().to_string();
            assert!(
                e.contains("--out") && e.contains("the file is read-only"),
                "{e}"
            );
        }
        set_mode(&out, 0o644);
        check_writable(&out, "--out").unwrap();
    }

    /// A symbolic link given as an output stays a link, and the file it points at (made, if the
    /// link dangles) gets the bytes; a named pipe is refused, not replaced by a file.
    #[cfg(unix)]
    #[test]
    fn links_are_written_through_and_special_files_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.bin");
        let link = dir.path().join("link.bin");
        std::os::unix::fs::symlink("target.bin", &link).unwrap();
        let out = check_writable(&link, "--out").unwrap();
        write_atomic(&out, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        // Inside clipft's own folders a link is replaced, and what it pointed at is left alone.
        write_atomic(&link, b"newer").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
        assert_eq!(std::fs::read(&target).unwrap(), b"new");

        let fifo = dir.path().join("pipe");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if !made.is_ok_and(|s| s.success()) {
            return; // (no mkfifo here)
        }
        let e = check_writable(&fifo, "--out").unwrap_err().to_string();
        assert!(e.contains("--out") && e.contains("a named pipe"), "{e}");
        let e = write_atomic(&fifo, b"x").unwrap_err().to_string();
        assert!(e.contains("a named pipe"), "{e}");
        let via = dir.path().join("via");
        std::os::unix::fs::symlink(&fifo, &via).unwrap();
        assert!(check_writable(&via, "--out").is_err());
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo());
    }

    /// A replaced file keeps its permissions.
    #[cfg(unix)]
    #[test]
    fn a_replaced_file_keeps_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let out = file_with_mode(dir.path(), 0o640);
        write_atomic(&out, b"new").unwrap();
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640, "{mode:o}");
        // A setuid bit is not kept (as with `cp`).
        set_mode(&out, 0o4750);
        write_atomic(&out, b"newer").unwrap();
        let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o750, "{mode:o}");
    }

    /// A replaced file keeps its owner and group where the writer may give them (root here;
    /// elsewhere the test has nothing to check).
    #[cfg(unix)]
    #[test]
    fn a_replaced_file_keeps_its_owner() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.bin");
        std::fs::write(&out, b"old").unwrap();
        // (nobody:nogroup on most systems; any ids do.)
        if std::os::unix::fs::chown(&out, Some(65534), Some(65534)).is_err() {
            return; // not root
        }
        write_atomic(&out, b"new").unwrap();
        let meta = std::fs::metadata(&out).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (65534, 65534));
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
    }

    /// Outputs get the mode of any file the user creates (0666 less the umask), not the
    /// temporary file's private 0600, also when they replace an existing file.
    #[cfg(unix)]
    #[test]
    fn atomic_writes_get_ordinary_file_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"x").unwrap();
        let want = std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777;
        let out = dir.path().join("out.bin");
        for _ in 0..2 {
            write_atomic(&out, b"bytes").unwrap();
            let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, want, "{mode:o} vs {want:o}");
            assert_eq!(std::fs::read(&out).unwrap(), b"bytes");
        }
    }
}

//! Safetensors files with JSON metadata, written atomically.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

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

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so readers
/// see the old file or the complete new one, never a partial write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    // The folder may be one that Ctrl-C removes (the demo's feature cache).
    let _writing = crate::interrupt::writing();
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent)
        .with_context(|| format!("creating folder {}", parent.display()))?;
    let mut builder = temp_builder();
    // Temporary files are private (0600); the output is an ordinary file, so ask for 0666 and
    // let the umask decide, as any other file the user creates.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder
        .tempfile_in(parent)
        .with_context(|| format!("creating a temporary file in {}", parent.display()))?;
    tmp.write_all(bytes)
        .and_then(|_| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Checks, before any work, that `flag`'s output file `path` can be written: it is not a folder
/// and its folder exists (or can be made) and takes new files. Saves a long run from failing
/// only at its end.
pub fn check_writable(path: &Path, flag: &str) -> Result<()> {
    anyhow::ensure!(
        !path.is_dir(),
        "{flag} {}: that is a folder; give a file path",
        path.display()
    );
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).with_context(|| {
        format!(
            "{flag} {}: creating folder {}",
            path.display(),
            parent.display()
        )
    })?;
    probe_writable(parent).with_context(|| {
        format!(
            "{flag} {}: cannot write in {}",
            path.display(),
            parent.display()
        )
    })?;
    Ok(())
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

/// Loads every tensor (on the CPU) and clipft's metadata of a safetensors file.
pub fn load(path: &Path) -> Result<(HashMap<String, Tensor>, serde_json::Value)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    let meta = match header.metadata().as_ref().and_then(|m| m.get(META_KEY)) {
        Some(text) => serde_json::from_str(text)
            .with_context(|| format!("{}: malformed clipft metadata", path.display()))?,
        None => serde_json::Value::Null,
    };
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("{}: reading tensors", path.display()))?;
    Ok((tensors, meta))
}

/// The tensor `name` of a loaded file, or an error naming the file. A NaN or infinity in it is
/// refused here, naming the tensor, rather than surfacing later as meaningless logits.
pub fn take(tensors: &mut HashMap<String, Tensor>, name: &str, path: &Path) -> Result<Tensor> {
    let t = tensors
        .remove(name)
        .with_context(|| format!("{}: no tensor `{name}`", path.display()))?;
    if t.dtype().is_float() {
        // (The sum of |x| of finite values stays finite for any weights a model could hold.)
        let sum = t.to_dtype(candle_core::DType::F32)?.abs()?.sum_all()?;
        anyhow::ensure!(
            sum.to_scalar::<f32>()?.is_finite(),
            "{}: tensor `{name}` holds NaN or infinite values: the file is damaged, or was \
             written by a run that diverged",
            path.display()
        );
    }
    Ok(t)
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
        assert!(take(&mut m, "ok", p).is_ok() && take(&mut m, "ids", p).is_ok());
        let e = take(&mut m, "nan", p).unwrap_err().to_string();
        assert!(e.contains("a.safetensors") && e.contains("`nan`"), "{e}");
        assert!(take(&mut m, "gone", p).is_err());
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

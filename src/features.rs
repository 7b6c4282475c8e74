//! The shared feature-extraction core: batched, pipelined image encoding with an on-disk
//! cache, and text encoding of class prompts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::model::Clip;
use crate::preprocess::{Decode, ImageError, PreprocessConfig, View};
use crate::templates;

/// How to run an extraction.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    pub batch_size: usize,
    /// Skip unreadable images (and report them) instead of failing on the first.
    pub skip_bad_images: bool,
    pub progress: bool,
    /// Folder of the feature cache; `None` disables it.
    pub cache_dir: Option<PathBuf>,
    /// How JPEGs are decoded ([`Decode::Reduced`] trades exact pixels for speed on large photos).
    pub decode: Decode,
    /// How pixels reach the model's device (the same values either way).
    pub transfer: PixelTransfer,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        Self {
            batch_size: 32,
            skip_bad_images: false,
            progress: false,
            cache_dir: None,
            decode: Decode::Exact,
            transfer: PixelTransfer::Auto,
        }
    }
}

/// Raw (unnormalised) image features of the images that could be read.
#[derive(Debug)]
pub struct ImageFeatures {
    /// `[kept.len(), D]`, f32 on the CPU, rows in input order.
    pub features: Tensor,
    /// Indices into the input paths of the rows of `features`.
    pub kept: Vec<usize>,
    /// Images that could not be read (only with `skip_bad_images`).
    pub skipped: Vec<ImageError>,
    pub cache_hits: usize,
    pub encoded: usize,
}

/// `x / ||x||` over the last dimension.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(x.broadcast_div(&norm.clamp(1e-12, f64::INFINITY)?)?)
}

/// Identity of an image file for the cache: canonical path, size, modification time.
fn file_identity(path: &Path) -> std::io::Result<String> {
    let meta = std::fs::metadata(path)?;
    let mtime = meta
        .modified()?
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let canon = path.canonicalize()?;
    Ok(format!("{}\t{}\t{}", canon.display(), meta.len(), mtime))
}

fn short_hash(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    format!("{:x}", h.finalize())[..20].to_string()
}

/// Stable per-image key for seeded augmentation: the class folder and file name, so the same
/// seed gives the same views wherever the dataset folder lives, in Unicode's composed form (a
/// copy between macOS and Linux changes accented names' bytes, not their views).
pub fn view_key(path: &Path) -> u64 {
    let parent = path
        .parent()
        .and_then(|p| p.file_name())
        .unwrap_or_default();
    let name = path.file_name().unwrap_or_default();
    // (Names that are not UTF-8 keep their bytes.)
    let bytes = |s: &std::ffi::OsStr| match s.to_str() {
        Some(s) => crate::data::composed(s).into_bytes(),
        None => s.as_encoded_bytes().to_vec(),
    };
    let mut h = Sha256::new();
    h.update(bytes(parent));
    h.update([0u8]);
    h.update(bytes(name));
    u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

/// A cache file of raw features for one (model, preprocessing, view, folder); rows keyed by file
/// identity so changed or new files are re-encoded and the rest reused.
struct FeatureCache {
    path: PathBuf,
    rows: HashMap<String, Vec<f32>>,
    /// File path -> its identity in `rows`, to drop rows of files that changed.
    by_path: HashMap<String, String>,
    dim: usize,
}

fn path_of(identity: &str) -> &str {
    identity.split('\t').next().unwrap_or(identity)
}

impl FeatureCache {
    fn open(dir: &Path, clip: &Clip, view: &View, decode: Decode, folder: &Path) -> Self {
        let view_json = serde_json::to_string(view).expect("view serialises");
        let folder = folder
            .canonicalize()
            .unwrap_or_else(|_| folder.to_path_buf());
        let mut parts = vec![
            clip.fingerprint.clone(),
            clip.preprocess.cache_key(),
            view_json,
            folder.to_string_lossy().into_owned(),
        ];
        // Exact decoding keeps the keys of caches written before the option existed.
        if decode != Decode::Exact {
            parts.push(serde_json::to_string(&decode).expect("decode serialises"));
        }
        let key = short_hash(&parts.iter().map(String::as_str).collect::<Vec<_>>());
        let path = dir.join(format!("{key}.safetensors"));
        crate::io::remove_stale_temporaries(dir);
        let dim = clip.config().projection_dim;
        let mut rows = HashMap::new();
        // A cache that cannot be read is treated as empty and rewritten; never an error.
        if let Ok((mut tensors, meta)) = crate::io::load(&path) {
            let entries: Option<Vec<String>> = meta
                .get("entries")
                .and_then(|e| serde_json::from_value(e.clone()).ok());
            let feats = tensors
                .remove("features")
                .and_then(|t| t.to_vec2::<f32>().ok());
            if let (Some(entries), Some(feats)) = (entries, feats) {
                if entries.len() == feats.len() && feats.iter().all(|r| r.len() == dim) {
                    // A row with NaN or infinity (a damaged file) is re-encoded, not served.
                    rows = entries
                        .into_iter()
                        .zip(feats)
                        .filter(|(_, r)| r.iter().all(|x| x.is_finite()))
                        .collect();
                }
            }
        }
        let by_path = rows
            .keys()
            .map(|id| (path_of(id).to_string(), id.clone()))
            .collect();
        Self {
            path,
            rows,
            by_path,
            dim,
        }
    }

    fn insert(&mut self, id: String, row: Vec<f32>) {
        if let Some(old) = self.by_path.insert(path_of(&id).to_string(), id.clone()) {
            if old != id {
                self.rows.remove(&old);
            }
        }
        self.rows.insert(id, row);
    }

    fn save(&self) -> Result<()> {
        let mut entries: Vec<&String> = self.rows.keys().collect();
        entries.sort();
        let flat: Vec<f32> = entries
            .iter()
            .flat_map(|e| self.rows[*e].iter().copied())
            .collect();
        let t = Tensor::from_vec(flat, (entries.len(), self.dim), &Device::Cpu)?;
        crate::io::save(
            &self.path,
            &[("features", &t)],
            &serde_json::json!({ "entries": entries, "version": 1 }),
        )
    }
}

/// Images encoded before a cache save is considered.
const CACHE_CHUNK: usize = 1024;
/// Minimum time between two cache saves during one extraction.
const CACHE_SAVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Common parent folder of a set of paths (the cache file groups one split folder).
fn common_parent(paths: &[PathBuf]) -> PathBuf {
    let mut it = paths.iter().filter_map(|p| p.parent());
    let Some(first) = it.next() else {
        return PathBuf::new();
    };
    let mut common: PathBuf = first.to_path_buf();
    for p in it {
        while !p.starts_with(&common) {
            if !common.pop() {
                return PathBuf::new();
            }
        }
    }
    common
}

/// Saves the cache; a cache that cannot be written (full disk, read-only folder) costs only
/// re-encoding next time, so it is a warning, once, and the run goes on without saving.
fn save_cache(cache: &FeatureCache, broken: &mut bool) {
    if *broken {
        return;
    }
    if let Err(e) = cache.save() {
        crate::say!(
            "warning: could not write the feature cache {} ({e:#}); going on without it",
            cache.path.display()
        );
        *broken = true;
    }
}

/// Encodes images into raw CLIP image features (`get_image_features`), reusing cached rows.
pub fn image_features(
    clip: &Clip,
    paths: &[PathBuf],
    view: &View,
    opts: &ExtractOptions,
) -> Result<ImageFeatures> {
    let dim = clip.config().projection_dim;
    let mut skipped = Vec::new();
    let mut bad = vec![false; paths.len()];
    let mut ids: Vec<Option<String>> = Vec::with_capacity(paths.len());
    for (i, p) in paths.iter().enumerate() {
        match file_identity(p) {
            Ok(id) => ids.push(Some(id)),
            Err(e) => {
                let err = ImageError {
                    path: p.clone(),
                    msg: format!("cannot read: {e}"),
                };
                if !opts.skip_bad_images {
                    return Err(err.into());
                }
                skipped.push(err);
                bad[i] = true;
                ids.push(None);
            }
        }
    }
    let mut cache = opts
        .cache_dir
        .as_ref()
        .map(|dir| FeatureCache::open(dir, clip, view, opts.decode, &common_parent(paths)));
    let mut rows: Vec<Option<Vec<f32>>> = vec![None; paths.len()];
    let mut cache_hits = 0;
    if let Some(cache) = &cache {
        for (i, id) in ids.iter().enumerate() {
            if let Some(row) = id.as_ref().and_then(|id| cache.rows.get(id)) {
                rows[i] = Some(row.clone());
                cache_hits += 1;
            }
        }
    }
    let todo: Vec<usize> = (0..paths.len())
        .filter(|&i| rows[i].is_none() && !bad[i])
        .collect();
    // One pipeline over every image to encode; the cache is saved now and then from the sink, so
    // an interrupted run over a large split keeps what it has encoded (writes are atomic, so a
    // cache file is always complete).
    let pb = crate::progress::bar(todo.len() as u64, "encoding", opts.progress);
    let mut n_encoded = 0;
    let mut unsaved = 0;
    let mut last_save = std::time::Instant::now();
    let mut cache_broken = false;
    let todo_paths: Vec<&Path> = todo.iter().map(|&i| paths[i].as_path()).collect();
    let encoded = encode_images(clip, &todo_paths, view, opts, &pb, |first, results| {
        for (&i, result) in todo[first..].iter().zip(results) {
            match result {
                Ok(row) => {
                    // A broken checkpoint (NaN or infinite weights) gives garbage features;
                    // stop before they are written or cached.
                    anyhow::ensure!(
                        row.iter().all(|x| x.is_finite()),
                        "the model gives non-finite features (NaN or infinite) for {}: the \
                         checkpoint's weights are broken",
                        paths[i].display()
                    );
                    if let (Some(cache), Some(id)) = (cache.as_mut(), &ids[i]) {
                        cache.insert(id.clone(), row.clone());
                    }
                    rows[i] = Some(row);
                    n_encoded += 1;
                    unsaved += 1;
                }
                Err(e) => skipped.push(e),
            }
        }
        if let Some(cache) = &cache {
            if unsaved >= CACHE_CHUNK && last_save.elapsed() >= CACHE_SAVE_INTERVAL {
                save_cache(cache, &mut cache_broken);
                unsaved = 0;
                last_save = std::time::Instant::now();
            }
        }
        Ok(())
    });
    // Also when encoding stopped on an error: the rows encoded so far are complete and valid.
    if let Some(cache) = &cache {
        if unsaved > 0 {
            save_cache(cache, &mut cache_broken);
        }
    }
    encoded?;
    pb.finish_and_clear();
    let kept: Vec<usize> = (0..paths.len()).filter(|&i| rows[i].is_some()).collect();
    let flat: Vec<f32> = kept
        .iter()
        .flat_map(|&i| rows[i].take().expect("kept rows exist"))
        .collect();
    let features = Tensor::from_vec(flat, (kept.len(), dim), &Device::Cpu)?;
    skipped.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(ImageFeatures {
        features,
        kept,
        skipped,
        cache_hits,
        encoded: n_encoded,
    })
}

/// How a batch's pixels travel from the decoding cores to the model's device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PixelTransfer {
    /// [`Normalized`](Self::Normalized) for a model on the CPU, [`Bytes`](Self::Bytes) on a GPU.
    #[default]
    Auto,
    /// Normalised f32 values, computed on the decoding cores.
    Normalized,
    /// The crop's 8-bit RGB pixels as decoded (a quarter of the f32 bytes over PCIe, no
    /// normalising or reordering pass on the decoding cores), mapped on the model's device
    /// through the table the CPU path uses: the same values, bit for bit.
    Bytes,
}

impl PixelTransfer {
    fn bytes_on(self, device: &Device) -> bool {
        match self {
            Self::Auto => !device.is_cpu(),
            Self::Normalized => false,
            Self::Bytes => true,
        }
    }
}

/// Maps `[B, H, W, 3]` 8-bit pixels on a device (the images' own interleaved RGB bytes) to the
/// model's `[B, 3, H, W]` input there: the entries of [`PreprocessConfig::normalize_table`] in
/// the model's dtype, indexed by `byte + 256 × channel`, then moved channel-first. The table is
/// rounded to the dtype once, as the CPU path rounds each value, so both give identical inputs.
struct DeviceNormalizer {
    /// `[3 × 256]`, model dtype, on the device.
    table: Tensor,
    /// `[1, 1, 1, 3]` u32: each channel's first entry in `table`.
    offsets: Tensor,
}

impl DeviceNormalizer {
    fn new(pre: &PreprocessConfig, dtype: DType, device: &Device) -> Result<Self> {
        let table: Vec<f32> = pre.normalize_table().concat();
        let table = Tensor::from_vec(table, 3 * 256, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?;
        let offsets = Tensor::from_slice(&[0u32, 256, 512], (1, 1, 1, 3), device)?;
        Ok(Self { table, offsets })
    }

    fn apply(&self, bytes: &Tensor) -> Result<Tensor> {
        // u32 indices: candle's index_select reads an index equal to its type's maximum as
        // "zero", which would turn u8 255 into 0.
        let ids = bytes.to_dtype(DType::U32)?.broadcast_add(&self.offsets)?;
        let dims = ids.dims4()?;
        Ok(self
            .table
            .index_select(&ids.flatten_all()?, 0)?
            .reshape(dims)?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }
}

/// Lists images skipped as unreadable (`--skip-bad-images`), `what` naming the split's role
/// (`""`, `"val "`). A warning, so it prints with `--quiet` too: skipped images change the
/// scores, and a user needs to know which to fix.
pub fn warn_skipped(skipped: &[ImageError], what: &str) {
    if skipped.is_empty() {
        return;
    }
    crate::say!(
        "warning: skipped {} unreadable {what}image(s) (--skip-bad-images):",
        skipped.len()
    );
    for e in skipped.iter().take(20) {
        crate::say!("  {e}");
    }
    if skipped.len() > 20 {
        crate::say!("  ... and {} more", skipped.len() - 20);
    }
}

/// One decoded batch: a recycled buffer with its good images' values back to back, how many,
/// and which inputs failed.
struct Decoded<T> {
    buf: Vec<T>,
    n_good: usize,
    errors: Vec<Option<ImageError>>,
}

/// Decodes and preprocesses `paths` in batches of `opts.batch_size`, in a pool of its own, and
/// hands each batch to `consume` as the model's input on its device (`[n, 3, H, W]` in the
/// model's dtype; `None` when no image of the batch could be read) with one read error or
/// `None` per path, while the next batches decode.
pub fn image_batches(
    clip: &Clip,
    paths: &[&Path],
    view: &View,
    opts: &ExtractOptions,
    consume: impl FnMut(Option<Tensor>, Vec<Option<ImageError>>) -> Result<()>,
) -> Result<()> {
    let batches: Vec<&[&Path]> = paths.chunks(opts.batch_size.max(1)).collect();
    image_batches_of(clip, &batches, view, opts, consume)
}

/// [`image_batches`] over batches of any sizes (a training epoch's micro-batches), in order;
/// `opts.batch_size` is not used.
pub fn image_batches_of(
    clip: &Clip,
    batches: &[&[&Path]],
    view: &View,
    opts: &ExtractOptions,
    consume: impl FnMut(Option<Tensor>, Vec<Option<ImageError>>) -> Result<()>,
) -> Result<()> {
    let pre = &clip.preprocess;
    let (ch, cw) = (pre.crop.0 as usize, pre.crop.1 as usize);
    if opts.transfer.bytes_on(&clip.device) {
        let norm = DeviceNormalizer::new(pre, clip.dtype, &clip.device)?;
        run_pipeline::<u8>(
            clip,
            batches,
            (ch, cw, 3),
            |p, slot| {
                let img = pre.read_view(p, view, opts.decode, view_key(p))?;
                slot.copy_from_slice(img.as_raw());
                Ok(())
            },
            |x| norm.apply(&x),
            consume,
        )
    } else {
        run_pipeline::<f32>(
            clip,
            batches,
            (3, ch, cw),
            |p, slot| pre.read_into(p, view, opts.decode, view_key(p), slot),
            |x| Ok(x.to_dtype(clip.dtype)?),
            consume,
        )
    }
}

/// Threads the extraction pipeline decodes on for a model on `device`. On the CPU the model is
/// the bottleneck (a ViT-B/32 batch costs ~100x its decoding), so a quarter of the cores keep it
/// fed; on a GPU decoding is the bottleneck and gets every core but one, which the thread
/// launching the model's kernels needs to itself (with all cores decoding, the GPU waits on it).
pub fn decoding_threads(device: &Device) -> usize {
    let cores = rayon::current_num_threads();
    if device.is_cpu() {
        (cores / 4).max(1)
    } else {
        cores.saturating_sub(1).max(1)
    }
}

/// [`image_batches`] for one element type and `image` shape of the batch buffers (`read`
/// fills one image's slot, `to_input` makes the model's input of a batch uploaded to the
/// device).
fn run_pipeline<T: candle_core::WithDType>(
    clip: &Clip,
    batches: &[&[&Path]],
    image: (usize, usize, usize),
    read: impl Fn(&Path, &mut [T]) -> std::result::Result<(), ImageError> + Sync,
    to_input: impl Fn(Tensor) -> Result<Tensor>,
    mut consume: impl FnMut(Option<Tensor>, Vec<Option<ImageError>>) -> Result<()>,
) -> Result<()> {
    let batch = batches.iter().map(|b| b.len()).max().unwrap_or(0);
    if batch == 0 {
        // Nothing to decode; every (empty) batch still gets its call.
        for _ in batches {
            consume(None, Vec::new())?;
        }
        return Ok(());
    }
    let per_image = image.0 * image.1 * image.2;
    // Decoding gets its own pool: sharing the global one (which candle's CPU matmul uses) queues
    // GEMM tasks behind decode tasks and stalls the model.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(decoding_threads(&clip.device))
        .thread_name(|i| format!("clipft-decode-{i}"))
        .build()?;
    std::thread::scope(|s| -> Result<()> {
        // Two batches in flight ahead of the model: enough to hide decode jitter, bounded memory.
        let (tx, rx) = sync_channel::<Decoded<T>>(2);
        // Buffers come back once their batch is on the device, so after the first few batches
        // none is allocated (a fresh one costs page faults and zeroing: 154 MB for 256 f32
        // images).
        let (free_tx, free_rx) = std::sync::mpsc::channel::<Vec<T>>();
        let (pool, read) = (&pool, &read);
        s.spawn(move || {
            for &chunk in batches {
                let mut buf = free_rx
                    .try_recv()
                    .unwrap_or_else(|_| vec![T::zero(); batch * per_image]);
                // Each image is written straight into its slot of the batch buffer.
                let errors: Vec<Option<ImageError>> = pool.install(|| {
                    buf[..chunk.len() * per_image]
                        .par_chunks_mut(per_image)
                        .zip(chunk.par_iter())
                        .map(|(slot, p)| read(p, slot).err())
                        .collect()
                });
                // Rare: move the good images' slots together.
                let mut n_good = 0;
                for (i, e) in errors.iter().enumerate() {
                    if e.is_none() {
                        if i != n_good {
                            buf.copy_within(i * per_image..(i + 1) * per_image, n_good * per_image);
                        }
                        n_good += 1;
                    }
                }
                let decoded = Decoded {
                    buf,
                    n_good,
                    errors,
                };
                if tx.send(decoded).is_err() {
                    break;
                }
            }
        });
        for Decoded {
            buf,
            n_good,
            errors,
        } in rx
        {
            let x = if n_good == 0 {
                None
            } else {
                let x = Tensor::from_slice(
                    &buf[..n_good * per_image],
                    (n_good, image.0, image.1, image.2),
                    &clip.device,
                )?;
                Some(to_input(x)?)
            };
            // The producer may have finished already; then the buffer is simply dropped.
            let _ = free_tx.send(buf);
            consume(x, errors)?;
        }
        Ok(())
    })
}

/// Encodes `paths` through [`image_batches`] and hands each batch's results (one per path, in
/// order) to `sink` with the index of its first path. The first bad image is an error unless
/// `skip_bad_images`.
fn encode_images(
    clip: &Clip,
    paths: &[&Path],
    view: &View,
    opts: &ExtractOptions,
    pb: &indicatif::ProgressBar,
    mut sink: impl FnMut(usize, Vec<std::result::Result<Vec<f32>, ImageError>>) -> Result<()>,
) -> Result<()> {
    let mut first = 0;
    image_batches(clip, paths, view, opts, |x, errors| {
        let n = errors.len();
        let mut feats = match x {
            None => Vec::new(),
            Some(x) => clip
                .model
                .image_features(&x)?
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?
                .to_vec2::<f32>()?,
        }
        .into_iter();
        let mut results = Vec::with_capacity(n);
        for e in errors {
            match e {
                None => results.push(Ok(feats.next().expect("one row per good image"))),
                Some(e) if opts.skip_bad_images => results.push(Err(e)),
                Some(e) => return Err(e.into()),
            }
        }
        sink(first, results)?;
        first += n;
        pb.inc(n as u64);
        Ok(())
    })
}

/// Prompts per text-tower batch. Sequences are packed without padding, so a batch mixing
/// classes and templates of every length costs no more per prompt than a small one, and keeps
/// the GEMMs (and a GPU) busy; at most 256 × 77 token rows.
pub const TEXT_BATCH: usize = 256;

/// Raw text features (`get_text_features`) of prompts, `[N, D]` f32 on the CPU.
pub fn text_features(clip: &Clip, prompts: &[String], batch_size: usize) -> Result<Tensor> {
    let tokens = clip.tokenizer.encode_batch_noting_cuts(prompts)?;
    encode_tokens(clip, tokens, batch_size, |_| {})
}

/// The text features of tokenized prompts (`(ids, how many were cut)`, as
/// `encode_batch_noting_cuts` returns them), calling `done(n)` after each batch of `n`.
fn encode_tokens(
    clip: &Clip,
    (ids, cut): (Vec<Vec<u32>>, usize),
    batch_size: usize,
    mut done: impl FnMut(usize),
) -> Result<Tensor> {
    let mut rows = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(batch_size.max(1)) {
        let f = clip
            .model
            .text_features(chunk, &clip.device)?
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?;
        rows.push(f);
        done(chunk.len());
    }
    if cut > 0 {
        // As `transformers` with truncation (and open_clip): the end token is kept, the text's
        // tail is lost. Worth knowing, since it can be the class name.
        crate::say!(
            "warning: {cut} of {} prompts were longer than the text tower's {} tokens and were \
             cut to fit",
            ids.len(),
            clip.tokenizer.context_length()
        );
    }
    Ok(Tensor::cat(&rows, 0)?)
}

/// Zero-shot classifier `[C, D]`: for each class, the mean of the L2-normalised embeddings of
/// every template, re-normalised (the CLIP prompt ensemble). Batches of `batch_size` prompts
/// span classes: the text tower packs sequences without padding, so one large batch costs no
/// more per prompt than a class's own and keeps the GEMMs (and a GPU) busy.
pub fn text_classifier(
    clip: &Clip,
    class_names: &[String],
    template_set: &[String],
    batch_size: usize,
    progress: bool,
) -> Result<Tensor> {
    anyhow::ensure!(
        !class_names.is_empty() && !template_set.is_empty(),
        "a zero-shot classifier needs at least one class name and one prompt template"
    );
    let prompts: Vec<String> = class_names
        .iter()
        .flat_map(|name| template_set.iter().map(|t| templates::fill(t, name)))
        .collect();
    // Names the tokenizer cannot tell apart under every template would give two classes the same
    // prompts, and the later one could never be predicted.
    let tokens = clip.tokenizer.encode_batch_noting_cuts(&prompts)?;
    let ids = &tokens.0;
    let mut seen: HashMap<&[Vec<u32>], usize> = HashMap::new();
    for (k, class_ids) in ids.chunks(template_set.len()).enumerate() {
        if let Some(&j) = seen.get(class_ids) {
            let (a, b) = (&class_names[j], &class_names[k]);
            // (Untruncated: names that differ only past the cut are the next case.)
            let why = if clip.tokenizer.same_tokens(a, b)? {
                "the tokenizer ignores case, spacing and accent forms"
            } else {
                "every prompt is cut at the text tower's context length before the words that \
                 differ: shorten the templates or the names"
            };
            anyhow::bail!(
                "classes \"{a}\" and \"{b}\" tokenize to the same prompts ({why}), so zero-shot \
                 could never tell them apart; give them distinct names (classnames.txt)"
            );
        }
        seen.insert(class_ids, k);
    }
    let pb = crate::progress::bar(prompts.len() as u64, "prompts", progress);
    let f = encode_tokens(clip, tokens, batch_size, |n| pb.inc(n as u64))?;
    pb.finish_and_clear();
    let f = l2_normalize(&f)?.reshape((class_names.len(), template_set.len(), ()))?;
    l2_normalize(&f.mean(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;

    /// An image's augmented views depend on its class folder and file name as text: not on
    /// where the dataset lives, nor on the Unicode form its names are stored in.
    #[test]
    fn view_keys_go_by_composed_names() {
        let key = |s: &str| view_key(Path::new(s));
        let nfc = key("/a/train/caf\u{e9}/\u{e9}t\u{e9}.jpg");
        assert_eq!(nfc, key("/b/c/train/cafe\u{301}/e\u{301}te\u{301}.jpg"));
        assert_ne!(nfc, key("/a/train/cafe/\u{e9}t\u{e9}.jpg"));
        assert_ne!(nfc, key("/a/train/caf\u{e9}/ete.jpg"));
    }

    /// Only a killed write's temporary files, and only old ones, are removed from a cache folder.
    #[test]
    fn stale_temporaries_are_removed_from_the_cache_folder() {
        let dir = tempfile::tempdir().unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 24 * 3600);
        let make = |name: &str, aged: bool| {
            let p = dir.path().join(name);
            let f = std::fs::File::create(&p).unwrap();
            if aged {
                f.set_modified(old).unwrap();
            }
            p
        };
        let stale = make(".clipft-AAAA.tmp", true);
        let fresh = make(".clipft-BBBB.tmp", false);
        let cache = make("0123abcd.safetensors", true);
        let other = make("notes.tmp", true);
        crate::io::remove_stale_temporaries(dir.path());
        assert!(!stale.exists());
        assert!(fresh.exists() && cache.exists() && other.exists());
    }

    /// Every byte in every channel, mapped on the device, equals the CPU path's value rounded
    /// to the model's dtype.
    #[test]
    fn device_normalizer_maps_bytes_exactly_as_the_cpu_path() {
        let pre = PreprocessConfig::openai(16);
        // Two images: every byte value in each channel (shifted per channel and image).
        let images: Vec<RgbImage> = (0..2u32)
            .map(|k| {
                RgbImage::from_fn(16, 16, |x, y| {
                    let v = y * 16 + x;
                    image::Rgb([0, 1, 2].map(|c| ((v + 37 * c + 101 * k) % 256) as u8))
                })
            })
            .collect();
        let mut bytes = Vec::new();
        let mut values = vec![0f32; 2 * 3 * 256];
        for (i, img) in images.iter().enumerate() {
            bytes.extend_from_slice(img.as_raw());
            pre.normalize_into(img, &mut values[i * 768..(i + 1) * 768]);
        }
        let bytes = Tensor::from_vec(bytes, (2, 16, 16, 3), &Device::Cpu).unwrap();
        let values = Tensor::from_vec(values, (2, 3, 16, 16), &Device::Cpu).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let norm = DeviceNormalizer::new(&pre, dtype, &Device::Cpu).unwrap();
            let got = norm.apply(&bytes).unwrap();
            assert_eq!(got.dtype(), dtype);
            assert_eq!(got.dims(), &[2, 3, 16, 16]);
            let want = values.to_dtype(dtype).unwrap();
            let got = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            let want = want.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
            assert_eq!(
                got.to_vec1::<f32>().unwrap(),
                want.to_vec1::<f32>().unwrap(),
                "{dtype:?}"
            );
        }
        // Byte 255 (candle's "no index" value for u8 indices) maps to its value, not to 0.
        let white = Tensor::full(255u8, (1, 1, 1, 3), &Device::Cpu).unwrap();
        let norm = DeviceNormalizer::new(&pre, DType::F32, &Device::Cpu).unwrap();
        let got = norm.apply(&white).unwrap().flatten_all().unwrap();
        let table = pre.normalize_table();
        assert_eq!(
            got.to_vec1::<f32>().unwrap(),
            vec![table[0][255], table[1][255], table[2][255]]
        );
        assert!(table[0][255] > 1.0);
    }
}

//! Dataset folders: `DIR/{train,val,test}/<class>/<image>` and few-shot sampling.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use unicode_normalization::UnicodeNormalization;

/// File extensions (lower case) read as images: Pillow's for these formats (it also opens
/// `.jif` JPEGs, by their content).
pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "jfif", "jif", "png", "bmp", "webp", "gif", "tif", "tiff",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub const ALL: [Split; 3] = [Split::Train, Split::Val, Split::Test];
    pub fn as_str(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }

    /// The folder names this split is read from, its own name first: `validation/` (Hugging
    /// Face image-folder exports) and `valid/` (many Kaggle sets) are the val split too.
    pub fn folder_names(self) -> &'static [&'static str] {
        match self {
            Split::Train => &["train"],
            Split::Val => &["val", "validation", "valid"],
            Split::Test => &["test"],
        }
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Split {
    type Err = String;
    /// A split by any of its folder names ([`Split::folder_names`]).
    fn from_str(s: &str) -> Result<Self, String> {
        (Split::ALL.into_iter())
            .find(|split| split.folder_names().contains(&s))
            .ok_or_else(|| format!("unknown split `{s}` (expected train, val or test)"))
    }
}

/// Problems with a dataset folder; each names the path at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("dataset folder {} does not exist", .0.display())]
    NoSuchDir(PathBuf),
    #[error("{}: a file, not a dataset folder (DIR/<split>/<class>/<image>)", .0.display())]
    NotADir(PathBuf),
    #[error("{}: no train/, val/ or test/ folder; expected DIR/<split>/<class>/<image>{}", .0.display(), split_hint(.0))]
    NoSplits(PathBuf),
    #[error("{}: split `{split}` does not exist: no folder {}{}", root.display(), folders_of(*split), split_hint(root))]
    MissingSplit { root: PathBuf, split: Split },
    #[error("{}: two folders of the {split} split, {}; keep one", root.display(), folders.join(" and "))]
    SplitTwice {
        root: PathBuf,
        split: Split,
        folders: Vec<String>,
    },
    #[error("{}: no class folders", .0.display())]
    NoClasses(PathBuf),
    #[error("{}: class folders differ from {reference}/: {detail}", dir.display())]
    ClassMismatch {
        dir: PathBuf,
        /// The folder of the split compared with.
        reference: String,
        detail: String,
    },
    #[error("{}: class folder has no images ({}){hint}", .dir.display(), IMAGE_EXTENSIONS.join(", "))]
    EmptyClass { dir: PathBuf, hint: String },
    #[error("{}:{line}: {msg}", path.display())]
    BadClassNames {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("{}: {msg}", path.display())]
    Io { path: PathBuf, msg: String },
    /// Two classes with one readable name (from their folders, or `classnames.txt`).
    #[error("{}: {msg}", path.display())]
    DuplicateNames { path: PathBuf, msg: String },
    #[error(
        "--shots {shots}: {count} class(es) have fewer training images: {list}. Lower --shots, or pass \
         --allow-fewer-shots to use all images of those classes"
    )]
    TooFewShots {
        shots: usize,
        count: usize,
        list: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassInfo {
    /// Folder name: the class identity, and the sort key.
    pub folder: String,
    /// Readable name used in prompts.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub path: PathBuf,
    pub label: usize,
}

/// An opened dataset folder with validated, consistently ordered classes.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub root: PathBuf,
    pub classes: Vec<ClassInfo>,
    /// The splits present, each with the folder it is read from (see [`Split::folder_names`]).
    pub splits: Vec<(Split, String)>,
    /// Folders that a `classnames.txt` leaves unnamed (prompted by their folder names): worth
    /// a warning, as a WordNet ID in a prompt is a silent accuracy loss.
    pub unnamed: Vec<String>,
}

fn io_err(path: &Path, e: impl fmt::Display) -> DataError {
    DataError::Io {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

fn subdirs(dir: &Path) -> Result<Vec<String>, DataError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.path().is_dir() {
            // The folder name is the class identity, in prompts and artifacts: it must be text.
            if entry.file_name().to_str().is_none() {
                return Err(DataError::Io {
                    path: entry.path(),
                    msg: "class folder name is not valid UTF-8; rename the folder (a readable \
                          name for prompts can go in classnames.txt)"
                        .into(),
                });
            }
            out.push(name);
        }
    }
    // By composed form, so a dataset copied between macOS (which stores accented names
    // decomposed) and another system keeps its class order, hence its artifacts' class indices.
    out.sort_by_cached_key(|name| (composed(name), name.clone()));
    Ok(out)
}

/// A name in Unicode's composed form (NFC): a class folder's identity, and how file names
/// compare. `café` typed or copied from Linux and `café` stored by macOS (`e` + combining
/// accent) are one class.
pub fn composed(name: &str) -> String {
    name.nfc().collect()
}

/// Whether `name` is already in composed form (a decomposed one is as macOS stores accents).
pub fn is_composed(name: &str) -> bool {
    unicode_normalization::is_nfc(name)
}

/// Whether two lists of names are the same names in the same order, in any Unicode form.
pub fn same_names(a: &[String], b: &[String]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| composed(x) == composed(y))
}

/// `name` with its non-ASCII characters as escapes (`caf\u{e9}`, `cafe\u{301}`): two names
/// that print alike, told apart.
fn spelled(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            ' '..='~' => c.to_string(),
            _ => c.escape_unicode().to_string(),
        })
        .collect()
}

/// Image files directly in `dir`, sorted by file name ([`file_key`]).
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_image = path
            .extension()
            .map(|e| IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str()))
            .unwrap_or(false);
        // A link to nothing is listed too: reading it fails naming it (or --skip-bad-images
        // skips it and counts it), rather than the image silently missing from the split.
        let dangling = || path.symlink_metadata().is_ok() && std::fs::metadata(&path).is_err();
        if is_image && !name.starts_with('.') && (path.is_file() || dangling()) {
            out.push(path);
        }
    }
    out.sort_by_cached_key(|p| file_key(p));
    Ok(out)
}

/// The order of image files: by composed name, as for class folders (then by the name's bytes,
/// which also orders names that are not UTF-8).
fn file_key(path: &Path) -> (String, Option<std::ffi::OsString>) {
    let name = path.file_name().map(|n| n.to_os_string());
    let text = name.as_deref().map(|n| composed(&n.to_string_lossy()));
    (text.unwrap_or_default(), name)
}

/// Names of the visible folders inside `dir` (for a hint; unreadable entries are left out).
fn subfolders(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    names
}

/// `val/, validation/ or valid/`: the folders a split may be read from.
fn folders_of(split: Split) -> String {
    let names: Vec<String> = split
        .folder_names()
        .iter()
        .map(|n| format!("{n}/"))
        .collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.concat(),
    }
}

/// The folders `root` has (a user's own split names show what to rename), and a hint where one
/// is a split under another spelling (`Test/`, `validation/`).
fn split_hint(root: &Path) -> String {
    let found = subfolders(root);
    if found.is_empty() {
        return " (it has no folders)".into();
    }
    let mut hint = format!(
        " (its folders: {})",
        found
            .iter()
            .map(|f| format!("`{f}`"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let renames: Vec<String> = found
        .iter()
        .filter_map(|f| {
            let split = match f.to_lowercase().as_str() {
                "train" | "training" => Split::Train,
                "val" | "valid" | "validation" | "dev" => Split::Val,
                "test" | "testing" => Split::Test,
                _ => return None,
            };
            let taken = split.folder_names().iter().any(|n| root.join(n).is_dir());
            (!split.folder_names().contains(&f.as_str()) && !taken)
                .then(|| format!("`{f}` to `{split}`"))
        })
        .collect();
    if !renames.is_empty() {
        hint.push_str(&format!(
            "; clipft reads the splits from folders named exactly train/, val/ (or validation/, \
             valid/) and test/: rename {}",
            renames.join(", ")
        ));
    }
    hint
}

impl Dataset {
    /// A warning when `classnames.txt` leaves some classes unnamed, listing them.
    pub fn unnamed_warning(&self) -> Option<String> {
        if self.unnamed.is_empty() {
            return None;
        }
        let list = crate::cli::first_few(self.unnamed.iter().map(|f| format!("`{f}`")), 5);
        Some(format!(
            "{}: names {} of {} classes; the others are prompted by their folder names: {}",
            self.root.join("classnames.txt").display(),
            self.classes.len() - self.unnamed.len(),
            self.classes.len(),
            list
        ))
    }

    /// Refuses an output path that is a file this dataset is read from: an image (also one not
    /// there yet: an image-named file inside the dataset would be read as one on the next run,
    /// or stop it) or its `classnames.txt`.
    pub fn ensure_not_a_dataset_file(&self, out: &Path, flag: &str) -> anyhow::Result<()> {
        // (Where a symbolic link leads: the output is written there.)
        let target = crate::io::output_target(out).unwrap_or_else(|_| out.to_path_buf());
        let (Some(out_c), Ok(root)) = (crate::io::resolved(&target), self.root.canonicalize())
        else {
            return Ok(());
        };
        if !out_c.starts_with(&root) {
            return Ok(());
        }
        let is_image = out_c.extension().is_some_and(|e| {
            IMAGE_EXTENSIONS.contains(&e.to_string_lossy().to_ascii_lowercase().as_str())
        });
        anyhow::ensure!(
            !is_image,
            "{flag} {}: that is an image of the dataset {}, or would be read as one; give \
             another path",
            out.display(),
            self.root.display()
        );
        anyhow::ensure!(
            out_c != root.join("classnames.txt"),
            "{flag} {}: that is the dataset's classnames.txt, which this command reads; give \
             another path",
            out.display()
        );
        Ok(())
    }

    /// Opens `root`, checks that every split present has the same class folders, and reads
    /// `classnames.txt` (`<folder>\t<readable name>` lines) when present.
    pub fn open(root: impl AsRef<Path>) -> Result<Self, DataError> {
        let root = root.as_ref().to_path_buf();
        if root.is_file() {
            return Err(DataError::NotADir(root));
        }
        if !root.is_dir() {
            return Err(DataError::NoSuchDir(root));
        }
        let mut splits = Vec::new();
        for split in Split::ALL {
            let mut found: Vec<&str> = (split.folder_names().iter().copied())
                .filter(|n| root.join(n).is_dir())
                .collect();
            // Names of one folder (`val` a link to `validation/`) are one split folder.
            let mut seen = Vec::new();
            found.retain(|n| {
                let real = root.join(n).canonicalize().ok();
                let new = real.is_none() || !seen.contains(&real);
                seen.push(real);
                new
            });
            match found[..] {
                [] => {}
                [name] => splits.push((split, name.to_string())),
                _ => {
                    return Err(DataError::SplitTwice {
                        root,
                        split,
                        folders: found.iter().map(|n| format!("{n}/")).collect(),
                    })
                }
            }
        }
        let Some((_, first)) = splits.first().cloned() else {
            return Err(DataError::NoSplits(root));
        };
        let folders = subdirs(&root.join(&first))?;
        if folders.is_empty() {
            return Err(DataError::NoClasses(root.join(&first)));
        }
        for (_, name) in &splits[1..] {
            let dir = root.join(name);
            let other = subdirs(&dir)?;
            if other != folders {
                let a: BTreeSet<_> = folders.iter().collect();
                let b: BTreeSet<_> = other.iter().collect();
                // Names that print alike: one split's folders in one Unicode form, the other's
                // in another (composed or not, as when copied between macOS and elsewhere).
                fn twin<'a>(x: &str, set: &BTreeSet<&'a String>) -> Option<&'a String> {
                    set.iter().find(|y| composed(x) == composed(y)).copied()
                }
                let forms: Vec<String> = a
                    .difference(&b)
                    .filter_map(|x| twin(x, &b).map(|y| (x, y)))
                    .map(|(x, y)| format!("`{}` here, `{}` in {first}", spelled(y), spelled(x)))
                    .collect();
                let missing: Vec<_> = a
                    .difference(&b)
                    .filter(|x| twin(x, &b).is_none())
                    .map(|s| format!("`{s}`"))
                    .collect();
                let extra: Vec<_> = b
                    .difference(&a)
                    .filter(|x| twin(x, &a).is_none())
                    .map(|s| format!("`{s}`"))
                    .collect();
                let mut detail = Vec::new();
                if !missing.is_empty() {
                    detail.push(format!("missing {}", missing.join(", ")));
                }
                if !extra.is_empty() {
                    detail.push(format!("extra {}", extra.join(", ")));
                }
                if !forms.is_empty() {
                    detail.push(format!(
                        "folders named alike in another Unicode form (composed or decomposed \
                         characters, as when a dataset is copied between macOS and another \
                         system): {}; rename them as in {first}",
                        forms.join(", ")
                    ));
                }
                return Err(DataError::ClassMismatch {
                    dir,
                    reference: first.clone(),
                    detail: detail.join("; "),
                });
            }
        }
        let mut classes: Vec<ClassInfo> = folders
            .into_iter()
            .map(|f| ClassInfo {
                name: f.replace('_', " "),
                folder: f,
            })
            .collect();
        let names_file = root.join("classnames.txt");
        let mut unnamed = Vec::new();
        if names_file.is_file() {
            unnamed = apply_classnames(&names_file, &mut classes)?;
        } else {
            // `sea_lion` and `sea lion` would both be prompted as "sea lion".
            check_unique_names(&classes, |_| None).map_err(|(_, msg)| {
                DataError::DuplicateNames {
                    path: root.join(&first),
                    msg,
                }
            })?;
        }
        // A folder such as `_` reads as blank: its prompts would name nothing.
        if let Some(c) = classes.iter().find(|c| c.name.trim().is_empty()) {
            return Err(DataError::Io {
                path: root.join(&first).join(&c.folder),
                msg: "the class name read from this folder's name is blank ('_' reads as a \
                      space); give it a name in classnames.txt"
                    .into(),
            });
        }
        Ok(Self {
            root,
            classes,
            splits,
            unnamed,
        })
    }

    pub fn class_names(&self) -> Vec<String> {
        self.classes.iter().map(|c| c.name.clone()).collect()
    }

    pub fn class_folders(&self) -> Vec<String> {
        self.classes.iter().map(|c| c.folder.clone()).collect()
    }

    /// The folder `split` is read from, if the dataset has it.
    pub fn split_dir(&self, split: Split) -> Option<PathBuf> {
        (self.splits.iter())
            .find(|(s, _)| *s == split)
            .map(|(_, name)| self.root.join(name))
    }

    /// All samples of a split: classes by folder name, files by name.
    pub fn samples(&self, split: Split) -> Result<Vec<Sample>, DataError> {
        let Some(split_dir) = self.split_dir(split) else {
            return Err(DataError::MissingSplit {
                root: self.root.clone(),
                split,
            });
        };
        let mut out = Vec::new();
        for (label, class) in self.classes.iter().enumerate() {
            let dir = split_dir.join(&class.folder);
            let files = list_images(&dir)?;
            if files.is_empty() {
                // Images one level down are a common layout mistake (torchvision's ImageFolder
                // walks subfolders; clipft reads only the class folder itself).
                let nested = subfolders(&dir);
                let hint = if nested.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; its subfolders ({}) are not read: images must sit directly in the \
                         class folder",
                        nested.join(", ")
                    )
                };
                return Err(DataError::EmptyClass { dir, hint });
            }
            out.extend(files.into_iter().map(|path| Sample { path, label }));
        }
        Ok(out)
    }
}

/// Applies `classnames.txt`, then checks that every class ends up with its own name: two classes
/// with one name would get the same prompts, and one of them could never be predicted.
/// Reads `classnames.txt` into `classes`; returns the folders it does not name.
fn apply_classnames(path: &Path, classes: &mut [ClassInfo]) -> Result<Vec<String>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| io_err(path, e))?;
    // Editors on Windows save UTF-8 with a byte-order mark; it is not part of the first folder.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    // The line that named each class, if any.
    let mut named_on: Vec<Option<usize>> = vec![None; classes.len()];
    // Lines end in \n, \r\n or (old Mac files) a lone \r.
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |msg: String| DataError::BadClassNames {
            path: path.to_path_buf(),
            line: i + 1,
            msg,
        };
        let Some((folder, name)) = line.split_once('\t') else {
            // CoOp's and Tip-Adapter's lists separate the two with a space.
            let spaced = line
                .split_once(' ')
                .filter(|(f, _)| classes.iter().any(|c| composed(&c.folder) == composed(f)));
            return Err(bad(match spaced {
                Some((f, _)) => format!(
                    "no tab on this line: `{f}` and its name are separated by a space; \
                     expected `<folder>\\t<readable name>`"
                ),
                None => "expected `<folder>\\t<readable name>`".into(),
            }));
        };
        // A third column (e.g. a class index) would silently become part of the name.
        if name.contains('\t') {
            return Err(bad(format!(
                "more than two tab-separated fields for `{folder}`; expected \
                 `<folder>\\t<readable name>`"
            )));
        }
        let name = name.trim();
        if name.is_empty() {
            return Err(bad(format!("empty name for `{folder}`")));
        }
        let chars = name.chars().count();
        if chars > crate::templates::MAX_PROMPT_CHARS {
            return Err(bad(format!(
                "a name of {chars} characters for `{folder}` (`{}`); it goes into 77-token \
                 prompts, and clipft takes names of at most {} characters",
                crate::templates::excerpt(name),
                crate::templates::MAX_PROMPT_CHARS
            )));
        }
        // Exact first; else the same text in another Unicode normal form (macOS stores file
        // names decomposed, editors write composed text).
        let k = classes
            .iter()
            .position(|c| c.folder == folder)
            .or_else(|| {
                let key = composed(folder);
                classes.iter().position(|c| composed(&c.folder) == key)
            })
            .ok_or_else(|| bad(format!("`{folder}` is not a class folder of this dataset")))?;
        if let Some(first) = named_on[k] {
            return Err(bad(format!("`{folder}` is already named on line {first}")));
        }
        named_on[k] = Some(i + 1);
        classes[k].name = name.to_string();
    }
    check_unique_names(classes, |k| named_on[k]).map_err(|(line, msg)| match line {
        Some(line) => DataError::BadClassNames {
            path: path.to_path_buf(),
            line,
            msg,
        },
        None => DataError::DuplicateNames {
            path: path.to_path_buf(),
            msg,
        },
    })?;
    Ok(classes
        .iter()
        .zip(&named_on)
        .filter(|(_, line)| line.is_none())
        .map(|(c, _)| c.folder.clone())
        .collect())
}

/// The first two classes that share a name, as `(line of classnames.txt to blame, message)`;
/// `named_on(k)` is the line that named class `k`, `None` for a name made from its folder.
fn check_unique_names(
    classes: &[ClassInfo],
    named_on: impl Fn(usize) -> Option<usize>,
) -> Result<(), (Option<usize>, String)> {
    // (Keyed by composed form: `café` composed and decomposed is one name to the tokenizer.)
    let mut first_with: std::collections::HashMap<String, usize> = Default::default();
    for (k, class) in classes.iter().enumerate() {
        let key: String = class.name.nfc().collect();
        let Some(&j) = first_with.get(&key) else {
            first_with.insert(key, k);
            continue;
        };
        let (a, b) = (&classes[j].folder, &class.folder);
        let name = &class.name;
        let from = |k: usize| match named_on(k) {
            Some(line) => format!("line {line}"),
            None => "its folder name".to_string(),
        };
        let msg = if classes[j].name != *name {
            format!(
                "class folders `{a}` ({}) and `{b}` ({}) get names that differ only in Unicode \
                 form (`{}` and `{}`: composed or decomposed characters), which read as one; \
                 rename one, or give them different names in classnames.txt",
                from(j),
                from(k),
                spelled(&classes[j].name),
                spelled(name)
            )
        } else if named_on(j).is_none() && named_on(k).is_none() {
            format!(
                "class folders `{a}` and `{b}` both read as \"{name}\" ('_' becomes a space); \
                 rename one, or give them different names in classnames.txt"
            )
        } else {
            format!(
                "class folders `{a}` ({}) and `{b}` ({}) both get the name \"{name}\"; give \
                 them different names",
                from(j),
                from(k)
            )
        };
        // Blame the later line of the file that took part, if any.
        return Err((named_on(k).max(named_on(j)), msg));
    }
    Ok(())
}

/// Stable 64-bit FNV-1a, so per-class seeds do not depend on the Rust version.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// K samples per class, deterministic for `seed` and independent of directory listing order:
/// each class's files are sorted by name, shuffled with a generator seeded by `seed` and the class
/// folder (by composed names, [`composed`]: the same shots on macOS and Linux), and the first
/// `shots` are kept (in name order). Classes with fewer images are an error, unless
/// `allow_fewer`, where all their images are kept and a warning is returned.
pub fn few_shot(
    dataset: &Dataset,
    samples: &[Sample],
    shots: usize,
    seed: u64,
    allow_fewer: bool,
) -> Result<(Vec<Sample>, Vec<String>), DataError> {
    let mut out = Vec::new();
    let mut short = Vec::new();
    for (label, class) in dataset.classes.iter().enumerate() {
        let mut own: Vec<&Sample> = samples.iter().filter(|s| s.label == label).collect();
        own.sort_by_cached_key(|s| file_key(&s.path));
        if own.len() < shots {
            short.push(format!("`{}` ({})", class.folder, own.len()));
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            seed ^ fnv1a(composed(&class.folder).as_bytes()),
        );
        let mut idx: Vec<usize> = (0..own.len()).collect();
        idx.shuffle(&mut rng);
        idx.truncate(shots);
        idx.sort_unstable();
        out.extend(idx.into_iter().map(|i| own[i].clone()));
    }
    let mut warnings = Vec::new();
    if !short.is_empty() {
        if !allow_fewer {
            return Err(DataError::TooFewShots {
                shots,
                count: short.len(),
                list: short.join(", "),
            });
        }
        warnings.push(format!(
            "--shots {shots}: using all images of {} class(es) that have fewer: {}",
            short.len(),
            short.join(", ")
        ));
    }
    Ok((out, warnings))
}

/// After the unreadable images of a `shots`-per-class sample were skipped, a warning naming each
/// class left with fewer than `shots` of the kept `labels` (one per image), with its count.
pub fn shots_left_warning(dataset: &Dataset, labels: &[usize], shots: usize) -> Option<String> {
    let mut counts = vec![0usize; dataset.classes.len()];
    for &l in labels {
        counts[l] += 1;
    }
    let short: Vec<String> = dataset
        .classes
        .iter()
        .zip(&counts)
        .filter(|(_, &n)| n < shots)
        .map(|(c, &n)| match n {
            0 => format!("`{}` (none)", c.folder),
            n => format!("`{}` ({n})", c.folder),
        })
        .collect();
    (!short.is_empty()).then(|| {
        format!(
            "--shots {shots}: after skipping unreadable images, {} class(es) have fewer images: {}",
            short.len(),
            short.join(", ")
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dataset folder with a train split of these (empty) class folders, and `classnames.txt`
    /// when given.
    fn dataset(folders: &[&str], classnames: Option<&str>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("ds");
        for f in folders {
            std::fs::create_dir_all(root.join("train").join(f)).unwrap();
        }
        if let Some(text) = classnames {
            std::fs::write(root.join("classnames.txt"), text).unwrap();
        }
        (dir, root)
    }

    /// A link to a missing image is listed (reading it then fails naming it); a folder named
    /// like an image is not.
    #[cfg(unix)]
    #[test]
    fn dangling_image_links_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"x").unwrap();
        std::os::unix::fs::symlink(dir.path().join("gone.png"), dir.path().join("b.png")).unwrap();
        std::fs::create_dir(dir.path().join("c.jpg")).unwrap();
        let names = listed(dir.path());
        assert_eq!(names, ["a.png", "b.png"]);
    }

    /// `validation/` and `valid/` are the val split; a missing split names the folders that
    /// are there, and how to rename one that is a split under another spelling.
    #[test]
    fn split_folders_and_missing_splits() {
        let (_dir, root) = dataset(&["a"], None);
        std::fs::create_dir_all(root.join("Test").join("a")).unwrap();
        std::fs::create_dir_all(root.join("dev").join("a")).unwrap();
        let e = Dataset::open(&root)
            .unwrap()
            .samples(Split::Val)
            .unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("split `val` does not exist: no folder val/, validation/ or valid/")
                && e.contains("its folders: `Test`, `dev`, `train`")
                && e.contains("rename `Test` to `test`, `dev` to `val`"),
            "{e}"
        );
        std::fs::remove_dir_all(root.join("dev")).unwrap();
        for name in ["validation", "valid"] {
            let val = root.join(name);
            std::fs::create_dir_all(val.join("a")).unwrap();
            std::fs::write(val.join("a").join("x.png"), b"").unwrap();
            let ds = Dataset::open(&root).unwrap();
            let samples = ds.samples(Split::Val).unwrap();
            assert_eq!(samples[0].path, val.join("a").join("x.png"));
            let e = ds.samples(Split::Test).unwrap_err().to_string();
            assert!(
                e.contains("no folder test/")
                    && e.contains("rename `Test` to `test`")
                    && !e.contains(&format!("`{name}` to")),
                "{e}"
            );
            // Its classes are checked against train's like any split's.
            std::fs::create_dir_all(val.join("b")).unwrap();
            let e = Dataset::open(&root).unwrap_err().to_string();
            assert!(
                e.contains(&format!("{name}: class folders differ from train/")),
                "{e}"
            );
            std::fs::remove_dir_all(val.join("b")).unwrap();
            std::fs::rename(&val, root.join(format!("{name}.done"))).unwrap();
        }
        // Two folders of one split: which one is meant?
        std::fs::rename(root.join("validation.done"), root.join("validation")).unwrap();
        std::fs::rename(root.join("valid.done"), root.join("valid")).unwrap();
        let e = Dataset::open(&root).unwrap_err().to_string();
        assert!(
            e.contains("two folders of the val split, validation/ and valid/; keep one"),
            "{e}"
        );
        // A link to the other is the same folder.
        #[cfg(unix)]
        {
            std::fs::remove_dir_all(root.join("valid")).unwrap();
            std::os::unix::fs::symlink("validation", root.join("val")).unwrap();
            let ds = Dataset::open(&root).unwrap();
            assert_eq!(ds.split_dir(Split::Val), Some(root.join("val")));
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("Train").join("a")).unwrap();
        let e = Dataset::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains("rename `Train` to `train`"), "{e}");
    }

    /// A class folder whose name is not UTF-8 is refused by name, not reported missing.
    #[cfg(target_os = "linux")]
    #[test]
    fn non_utf8_class_folders_are_refused_by_name() {
        use std::os::unix::ffi::OsStrExt;
        let (_dir, root) = dataset(&["ok"], None);
        let bad = std::ffi::OsStr::from_bytes(b"or\xffange");
        std::fs::create_dir_all(root.join("train").join(bad)).unwrap();
        let e = Dataset::open(&root).unwrap_err().to_string();
        assert!(e.contains("not valid UTF-8") && e.contains("or"), "{e}");
    }

    /// The file names [`list_images`] gives for `dir`, in its order.
    fn listed(dir: &Path) -> Vec<String> {
        list_images(dir)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    fn open_err(folders: &[&str], classnames: Option<&str>) -> String {
        let (_dir, root) = dataset(folders, classnames);
        Dataset::open(&root).unwrap_err().to_string()
    }

    #[test]
    fn every_jpeg_extension_pillow_opens_is_listed() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "a.jpg",
            "b.JFIF",
            "c.jpe",
            "d.jif",
            "e.Jpeg",
            "f.txt",
            "g.jpg.bak",
        ];
        for n in names {
            std::fs::write(dir.path().join(n), b"").unwrap();
        }
        let found = listed(dir.path());
        assert_eq!(found, ["a.jpg", "b.JFIF", "c.jpe", "d.jif", "e.Jpeg"]);
    }

    #[test]
    fn classes_left_short_by_skipped_images_are_named() {
        let (_dir, root) = dataset(&["a", "b", "c"], None);
        let ds = Dataset::open(&root).unwrap();
        assert_eq!(shots_left_warning(&ds, &[0, 0, 1, 1, 2, 2], 2), None);
        let w = shots_left_warning(&ds, &[0, 0, 2], 2).unwrap();
        assert_eq!(
            w,
            "--shots 2: after skipping unreadable images, 2 class(es) have fewer images: `b` \
             (none), `c` (1)"
        );
    }

    /// A class whose images sit one folder down is told so (torchvision's ImageFolder would
    /// have found them).
    #[test]
    fn an_empty_class_folder_names_its_subfolders() {
        let (_dir, root) = dataset(&["cat", "dog"], None);
        std::fs::write(root.join("train").join("cat").join("a.png"), b"").unwrap();
        let dog = root.join("train").join("dog");
        std::fs::create_dir_all(dog.join("nested")).unwrap();
        std::fs::write(dog.join("nested").join("a.png"), b"").unwrap();
        let ds = Dataset::open(&root).unwrap();
        let e = ds.samples(Split::Train).unwrap_err().to_string();
        assert!(
            e.contains("class folder has no images") && e.contains("subfolders (nested)"),
            "{e}"
        );
    }

    #[test]
    fn classnames_may_start_with_a_byte_order_mark() {
        let (_dir, root) = dataset(&["cat", "dog"], Some("\u{feff}cat\tkitty\ndog\tpuppy\n"));
        let ds = Dataset::open(&root).unwrap();
        assert_eq!(ds.class_names(), ["kitty", "puppy"]);
    }

    /// A folder whose name reads as blank needs a name from classnames.txt.
    #[test]
    fn a_blank_class_name_is_refused_unless_named() {
        let e = open_err(&["_", "dog"], None);
        assert!(e.contains("/_:") && e.contains("blank"), "{e}");
        let (_dir, root) = dataset(&["_", "dog"], Some("_\tunderscore\n"));
        assert_eq!(
            Dataset::open(&root).unwrap().class_names(),
            ["underscore", "dog"]
        );
    }

    /// A folder stored decomposed (as macOS does) is found by its composed name and back.
    #[test]
    fn classnames_match_folders_in_another_normal_form() {
        let (nfd, nfc) = ("cafe\u{301}", "caf\u{e9}");
        let (_dir, root) = dataset(&[nfd, "dog"], Some(&format!("{nfc}\tcoffee\ndog\tpuppy\n")));
        assert_eq!(
            Dataset::open(&root).unwrap().class_names(),
            ["coffee", "puppy"]
        );
        let (_dir, root) = dataset(&[nfc, "dog"], Some(&format!("{nfd}\tcoffee\n")));
        assert_eq!(
            Dataset::open(&root).unwrap().class_names(),
            ["coffee", "dog"]
        );
        // Two folders that are one name in two forms read as one class name. (Linux keeps
        // both; macOS's file systems take them for one folder.)
        if cfg!(target_os = "linux") {
            let e = open_err(&[nfc, nfd], None);
            assert!(e.contains("differ only in Unicode form"), "{e}");
        }
    }

    /// A dataset copied between macOS (accents decomposed) and Linux (composed) keeps its class
    /// order and its few-shot sample: both go by the composed names.
    #[test]
    fn class_order_and_shots_do_not_depend_on_unicode_form() {
        let nfd = |s: &str| s.nfd().collect::<String>();
        // Decomposed, `café` sorts before `caff` by bytes (`e` < `f`); composed, after (é > f).
        let forms = [
            ("caf\u{e9}", "\u{e9}t\u{e9}"),
            ("cafe\u{301}", "e\u{301}te\u{301}"),
        ];
        let mut picked = Vec::new();
        for (cafe, ete) in forms {
            let (_dir, root) = dataset(&[cafe, "caff"], None);
            let ds = Dataset::open(&root).unwrap();
            assert_eq!(ds.class_folders(), ["caff", cafe]);
            let samples: Vec<Sample> = (0..2)
                .flat_map(|label| {
                    (0..20).map(move |i| Sample {
                        path: PathBuf::from(format!("{ete}_{i:02}.jpg")),
                        label,
                    })
                })
                .collect();
            let (shots, _) = few_shot(&ds, &samples, 4, 7, false).unwrap();
            let names: Vec<String> = shots
                .iter()
                .map(|s| composed(&s.path.to_string_lossy()))
                .collect();
            picked.push(names);
        }
        assert_eq!(picked[0], picked[1]);
        assert_eq!(nfd(forms[0].0), forms[1].0);
        // A file name's form does not change its place among the others either.
        let dir = tempfile::tempdir().unwrap();
        for name in ["e\u{301}b.png", "\u{e9}a.png", "f.png"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let listed = listed(dir.path());
        assert_eq!(listed, ["f.png", "\u{e9}a.png", "e\u{301}b.png"]);
    }

    /// Splits whose folders are one name in two Unicode forms are refused, saying so.
    #[cfg(target_os = "linux")]
    #[test]
    fn splits_in_different_unicode_forms_are_named() {
        let (_dir, root) = dataset(&["caf\u{e9}", "dog"], None);
        for f in ["cafe\u{301}", "dog"] {
            std::fs::create_dir_all(root.join("val").join(f)).unwrap();
        }
        let e = Dataset::open(&root).unwrap_err().to_string();
        assert!(
            e.contains("another Unicode form")
                && e.contains("`cafe\\u{301}` here, `caf\\u{e9}` in train")
                && !e.contains("missing"),
            "{e}"
        );
    }

    /// Classes `classnames.txt` leaves unnamed are listed for a warning; a space-separated list
    /// (CoOp's format) is refused with a hint about the tab.
    #[test]
    fn partial_and_space_separated_classnames() {
        let (_dir, root) = dataset(&["n01", "n02", "n03"], Some("n01\ttench\n"));
        let ds = Dataset::open(&root).unwrap();
        assert_eq!(ds.unnamed, ["n02", "n03"]);
        let w = ds.unnamed_warning().unwrap();
        assert!(
            w.contains("names 1 of 3 classes") && w.contains("`n02`, `n03`"),
            "{w}"
        );
        let (_dir, root) = dataset(&["n01"], Some("n01\ttench\n"));
        assert_eq!(Dataset::open(&root).unwrap().unnamed_warning(), None);
        let (_dir, root) = dataset(&["n01"], None);
        assert_eq!(Dataset::open(&root).unwrap().unnamed_warning(), None);
        let e = open_err(&["n01", "n02"], Some("n01 tench\n"));
        assert!(e.contains(":1: no tab on this line: `n01`"), "{e}");
        let e = open_err(&["n01", "n02"], Some("tench fish\n"));
        assert!(
            e.contains("expected `<folder>") && !e.contains("no tab"),
            "{e}"
        );
        let long = format!("n01\t{}\n", "y".repeat(2000));
        let e = open_err(&["n01", "n02"], Some(&long));
        assert!(
            e.contains(":1: a name of 2000 characters for `n01`") && e.len() < 400,
            "{e}"
        );
    }

    /// Old Mac line ends (a lone CR) end lines too, with the line numbers an editor shows; a
    /// third column is refused rather than read into the name.
    #[test]
    fn classnames_lines_and_columns() {
        for text in ["cat\tkitty\rdog\tpuppy\r", "cat\tkitty\r\ndog\tpuppy\r\n"] {
            let (_dir, root) = dataset(&["cat", "dog"], Some(text));
            let ds = Dataset::open(&root).unwrap();
            assert_eq!(ds.class_names(), ["kitty", "puppy"], "{text:?}");
        }
        let e = open_err(&["cat", "dog"], Some("cat\tkitty\r\ndog\tpuppy\t281\r\n"));
        assert!(
            e.contains("classnames.txt:2:") && e.contains("more than two tab-separated fields"),
            "{e}"
        );
    }

    #[test]
    fn classes_must_end_up_with_different_names() {
        // One folder named twice: both lines.
        let e = open_err(
            &["cat", "dog"],
            Some("cat\tkitty\ndog\tpuppy\ncat\tfeline\n"),
        );
        assert!(e.contains("classnames.txt:3:"), "{e}");
        assert!(e.contains("`cat` is already named on line 1"), "{e}");
        // Two folders given one name: the file, both lines and both folders.
        let e = open_err(&["cat", "dog"], Some("cat\tpet\n# comment\ndog\tpet\n"));
        assert!(e.contains("classnames.txt:3:"), "{e}");
        assert!(
            e.contains("`cat` (line 1)") && e.contains("`dog` (line 3)"),
            "{e}"
        );
        assert!(e.contains("\"pet\""), "{e}");
        // A name from the file equal to another folder's own name.
        let e = open_err(&["cat", "sea_lion"], Some("cat\tsea lion\n"));
        assert!(e.contains("classnames.txt:1:"), "{e}");
        assert!(e.contains("`sea_lion` (its folder name"), "{e}");
        // Two folders that read the same once '_' is a space, with no file: both folders.
        let e = open_err(&["sea lion", "sea_lion"], None);
        assert!(e.contains("`sea lion`") && e.contains("`sea_lion`"), "{e}");
        assert!(e.contains("\"sea lion\""), "{e}");
        // ... and with a file that does not name them apart.
        let e = open_err(&["cat", "sea lion", "sea_lion"], Some("cat\tkitty\n"));
        assert!(
            e.contains("classnames.txt: class folders `sea lion`"),
            "{e}"
        );
        // Naming one of them apart resolves it.
        let (_dir, root) = dataset(&["sea lion", "sea_lion"], Some("sea_lion\tsealion\n"));
        let ds = Dataset::open(&root).unwrap();
        assert_eq!(ds.class_names(), ["sea lion", "sealion"]);
    }
}

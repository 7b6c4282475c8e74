//! Few-shot adaptation methods built on the feature core: each keeps its math in pure functions
//! on tensors (testable without a model) and adds thin orchestration over [`crate::model::Clip`],
//! [`crate::data::Dataset`] and [`crate::features`].

pub mod crossmodal;
pub mod crossmodal_cli;
pub mod fdalign;
pub mod fdalign_cli;
pub mod fdalign_train;
pub mod optim;
pub mod tip;
pub mod tip_cli;

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, ensure, Result};

/// What an artifact was built for: checked against a loaded model and dataset.
pub struct ArtifactIdentity<'a> {
    pub model: &'a str,
    /// [`crate::model::Clip::weights_digest`] of that model (absent in artifacts written before
    /// 2026-11-28, which are matched by `model` alone).
    pub model_digest: Option<&'a str>,
    /// The image preprocessing its features were made with (absent before 2026-11-29).
    pub preprocess: Option<&'a crate::preprocess::PreprocessConfig>,
    pub projection_dim: usize,
    pub class_folders: &'a [String],
    pub class_names: &'a [String],
}

/// Where the model checked by [`check_compatible`] came from: its messages must name what the
/// user gave, and not a flag they did not.
#[derive(Clone, Copy)]
pub enum ModelFrom<'a> {
    /// `--model`.
    Flag,
    /// The model the artifact records (no `--model`).
    Recorded,
    /// The artifact's own folder, which holds the model (an FD-Align output, `--adapter DIR`).
    Folder(&'a Path),
}

impl ModelFrom<'_> {
    pub fn flag(given: bool) -> Self {
        if given {
            Self::Flag
        } else {
            Self::Recorded
        }
    }
}

/// Checks that a loaded model and dataset are the ones an artifact (at `path`) was built for
/// (same model, feature dimension, image preprocessing, class folders and names).
pub fn check_compatible(
    id: &ArtifactIdentity,
    clip: &crate::model::Clip,
    dataset: &crate::data::Dataset,
    path: &Path,
    from: ModelFrom,
) -> Result<()> {
    let dim = clip.config().projection_dim;
    let model = match from {
        ModelFrom::Flag => format!("--model {}", clip.files.id),
        ModelFrom::Recorded => format!("the model {} (recorded in the artifact)", clip.files.id),
        ModelFrom::Folder(dir) => format!("--adapter {} (its model)", dir.display()),
    };
    ensure!(
        dim == id.projection_dim,
        "{model}: feature dimension {dim}, but {} has {}-dimensional features",
        path.display(),
        id.projection_dim
    );
    match id.model_digest {
        // The weights themselves: a moved or re-downloaded copy is the same model, another
        // checkpoint written to the same folder is not.
        Some(digest) => ensure!(
            clip.has_digest(digest)?,
            "{model}: its weights or config.json settings are not those {} was built with{}",
            path.display(),
            match from {
                ModelFrom::Folder(_) => " (changed or replaced since)".to_string(),
                _ => format!(
                    " (model `{}` then): the checkpoint was changed or replaced, or this is \
                     another model",
                    id.model
                ),
            }
        ),
        // A folder is its own model, whatever name it was written under.
        None => ensure!(
            matches!(from, ModelFrom::Folder(_)) || tip::same_model(&clip.files.id, id.model),
            "{model}: {} was built with model `{}`; pass --model {} (or leave --model out)",
            path.display(),
            id.model,
            id.model
        ),
    }
    // Features of other pixels are not those the cache or head was fitted to.
    if let Some(change) = id
        .preprocess
        .and_then(|then| then.change_to(&clip.preprocess))
    {
        bail!(
            "{model}: its image preprocessing (preprocessor_config.json) is not the one {} was \
             built with ({change})",
            path.display()
        );
    }
    check_classes(dataset, id.class_folders, id.class_names, path)
}

/// The dataset's class folders and names must be those an artifact (at `path`) was built with,
/// in the same order: its rows and columns are class indices.
pub fn check_classes(
    dataset: &crate::data::Dataset,
    folders: &[String],
    names: &[String],
    path: &Path,
) -> Result<()> {
    use crate::data::composed;
    let here = dataset.class_folders();
    // Composed: the same folders copied between macOS and Linux are the same classes.
    ensure!(
        crate::data::same_names(&here, folders),
        "--data {}: its class folders differ from the {} classes {} was built with: {}",
        dataset.root.display(),
        folders.len(),
        path.display(),
        class_difference(&here, folders)
    );
    let here_names = dataset.class_names();
    let n = names.len().max(here_names.len());
    let key = |v: &[String], i: usize| v.get(i).map(|x| composed(x));
    if let Some(i) = (0..n).find(|&i| key(&here_names, i) != key(names, i)) {
        let name = |v: &[String]| v.get(i).map_or("nothing".to_string(), |x| format!("`{x}`"));
        bail!(
            "--data {}: class names (classnames.txt) differ from those {} was built with: \
             folder `{}` reads {} here, {} there",
            dataset.root.display(),
            path.display(),
            here[i],
            name(&here_names),
            name(names)
        );
    }
    Ok(())
}

/// The `--model` to load for an artifact built with `model` (at `revision`): the artifact's own
/// when `--model` is not given. Another `--model` is an error for an artifact that records only
/// the model's name; one that records its weights' digest takes any `--model` (a moved copy),
/// which [`check_compatible`] then checks.
pub fn model_for(
    args: &crate::cli::ModelArgs,
    id: &ArtifactIdentity,
    revision: Option<&str>,
    path: &Path,
    quiet: bool,
) -> Result<crate::cli::ModelArgs> {
    let model = id.model;
    let mut args = args.clone();
    match &args.model {
        Some(m) => ensure!(
            id.model_digest.is_some() || tip::same_model(m, model),
            "--model {m}: {} was built with model `{model}`; pass --model {model} (or leave --model out)",
            path.display()
        ),
        None => {
            ensure!(
                Path::new(model).exists() || !model.starts_with('/'),
                "{} was built with the model in {model}, which is no longer there; pass --model \
                 with its new location",
                path.display()
            );
            crate::cli::info(format!("using the model of {}: {model}", path.display()), quiet);
            args.model = Some(model.to_string());
        }
    }
    // The artifact's revision belongs to its own model, not to a copy given elsewhere.
    let own = args
        .model
        .as_deref()
        .is_some_and(|m| tip::same_model(m, model));
    if args.revision.is_none() && own {
        args.revision = revision.map(str::to_string);
    }
    Ok(args)
}

/// What differs between the dataset's class folders and an artifact's, naming the folders (a
/// list of the first few of each would hide a difference past them, e.g. in ImageNet's 1,000).
fn class_difference(data: &[String], built: &[String]) -> String {
    let list = |v: &[&String]| crate::cli::first_few(v.iter().map(|x| format!("`{x}`")), 10);
    use crate::data::composed;
    let set = |v: &[String]| v.iter().map(|x| composed(x)).collect::<HashSet<_>>();
    let (in_data, in_built) = (set(data), set(built));
    let missing: Vec<&String> = built
        .iter()
        .filter(|c| !in_data.contains(&composed(c)))
        .collect();
    let extra: Vec<&String> = data
        .iter()
        .filter(|c| !in_built.contains(&composed(c)))
        .collect();
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!("missing here: {}", list(&missing)));
    }
    if !extra.is_empty() {
        parts.push(format!("not in the artifact: {}", list(&extra)));
    }
    if parts.is_empty() {
        // Same folders, another order (class indices would not line up).
        parts.push("the same folders in another order".to_string());
        if !built.iter().all(|c| crate::data::is_composed(c)) {
            // Before 2026-11-29 folders were ordered by their bytes, not their composed form.
            parts.push(
                "folders with decomposed accents (as macOS stores them) are now ordered by their \
                 composed form: build the artifact again"
                    .to_string(),
            );
        }
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::{check_classes, class_difference};

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("class_{i:04}")).collect()
    }

    fn dataset(folders: &[&str]) -> crate::data::Dataset {
        crate::data::Dataset {
            root: "ds".into(),
            classes: folders
                .iter()
                .map(|f| crate::data::ClassInfo {
                    folder: f.to_string(),
                    name: f.replace('_', " "),
                })
                .collect(),
            splits: vec![(crate::data::Split::Train, "train".into())],
            unnamed: Vec::new(),
        }
    }

    /// A dataset copied between macOS (accents stored decomposed) and Linux is the one its
    /// artifacts were built from; other folders, names or orders are not.
    #[test]
    fn classes_compare_in_composed_form() {
        let (nfc, nfd) = ("caf\u{e9}", "cafe\u{301}");
        let built = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let p = std::path::Path::new("a.safetensors");
        let ds = dataset(&[nfd, "dog"]);
        check_classes(&ds, &built(&[nfc, "dog"]), &built(&[nfc, "dog"]), p).unwrap();
        let ds = dataset(&[nfc, "dog"]);
        check_classes(&ds, &built(&[nfd, "dog"]), &built(&[nfd, "dog"]), p).unwrap();
        let e = check_classes(&ds, &built(&["dog", nfd]), &built(&["dog", nfd]), p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("another order") && e.contains("build the artifact again"),
            "{e}"
        );
        let e = check_classes(&ds, &built(&["cafe", "dog"]), &built(&["cafe", "dog"]), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing here: `cafe`"), "{e}");
        let e = check_classes(&ds, &built(&[nfd, "dog"]), &built(&["coffee", "dog"]), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("reads `café` here, `coffee` there"), "{e}");
    }

    /// A difference past the first few folders (ImageNet has 1,000) is still named.
    #[test]
    fn class_differences_name_the_folders() {
        let built = names(1000);
        let mut data = built.clone();
        data[700] = "class_0700x".into();
        let d = class_difference(&data, &built);
        assert!(
            d.contains("missing here: `class_0700`")
                && d.contains("not in the artifact: `class_0700x`"),
            "{d}"
        );
        let d = class_difference(&built[..999], &built);
        assert_eq!(d, "missing here: `class_0999`");
        let d = class_difference(&names(30), &names(5));
        assert!(
            d.starts_with("not in the artifact: `class_0005`") && d.ends_with("and 15 more"),
            "{d}"
        );
        let mut swapped = names(3);
        swapped.swap(0, 1);
        assert_eq!(
            class_difference(&swapped, &names(3)),
            "the same folders in another order"
        );
    }
}

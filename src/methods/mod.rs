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

use std::path::Path;

use anyhow::{ensure, Result};

/// What an artifact was built for: checked against a loaded model and dataset.
pub struct ArtifactIdentity<'a> {
    pub model: &'a str,
    /// [`crate::model::Clip::weights_digest`] of that model (absent in artifacts written before
    /// 2026-11-28, which are matched by `model` alone).
    pub model_digest: Option<&'a str>,
    pub projection_dim: usize,
    pub class_folders: &'a [String],
    pub class_names: &'a [String],
}

/// Checks that a loaded model and dataset are the ones an artifact was built for (same model,
/// feature dimension, class folders and names).
pub fn check_compatible(
    id: &ArtifactIdentity,
    clip: &crate::model::Clip,
    dataset: &crate::data::Dataset,
    path: &Path,
) -> Result<()> {
    let dim = clip.config().projection_dim;
    ensure!(
        dim == id.projection_dim,
        "--model {}: feature dimension {dim}, but {} has {}-dimensional features",
        clip.files.id,
        path.display(),
        id.projection_dim
    );
    match id.model_digest {
        // The weights themselves: a moved or re-downloaded copy is the same model, another
        // checkpoint written to the same folder is not.
        Some(digest) => ensure!(
            clip.weights_digest()? == digest,
            "--model {}: its weights are not those {} was built with (model `{}` then): the \
             checkpoint was changed or replaced, or this is another model",
            clip.files.id,
            path.display(),
            id.model
        ),
        None => ensure!(
            tip::same_model(&clip.files.id, id.model),
            "--model {}: {} was built with model `{}`; pass --model {} (or leave --model out)",
            clip.files.id,
            path.display(),
            id.model,
            id.model
        ),
    }
    let folders = dataset.class_folders();
    ensure!(
        folders == id.class_folders,
        "--data {}: class folders {} differ from the {} classes {} was built with ({})",
        dataset.root.display(),
        summarize(&folders),
        id.class_folders.len(),
        path.display(),
        summarize(id.class_folders)
    );
    ensure!(
        dataset.class_names() == id.class_names,
        "--data {}: class names (classnames.txt) differ from those {} was built with",
        dataset.root.display(),
        path.display()
    );
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

/// Val images skipped as unreadable (`--skip-bad-images`) change what a search on val picks from:
/// say so, even with `--quiet` (a warning, not information).
pub(crate) fn warn_skipped_val(n: usize) {
    if n > 0 {
        eprintln!("warning: skipped {n} unreadable val image(s) (--skip-bad-images)");
    }
}

fn summarize(v: &[String]) -> String {
    let mut s: Vec<String> = v.iter().take(5).map(|x| format!("`{x}`")).collect();
    if v.len() > 5 {
        s.push(format!("... ({} in all)", v.len()));
    }
    s.join(", ")
}

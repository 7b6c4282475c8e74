//! Checkpoint loading: formats, hub cache resolution, and the errors a user sees.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use clipft::model::{Clip, LoadError, ModelSpec};
use common::{copy_dir, stderr, Workspace};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load_err(dir: &Path) -> String {
    match Clip::load(&ModelSpec::local(dir)) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn image_features(clip: &Clip) -> Vec<Vec<f32>> {
    let x = Tensor::arange(0f32, (2 * 3 * 32 * 32) as f32, &Device::Cpu)
        .unwrap()
        .reshape((2, 3, 32, 32))
        .unwrap();
    let x = ((x / 3000.0).unwrap().sin().unwrap() * 2.0).unwrap();
    clip.model.image_features(&x).unwrap().to_vec2().unwrap()
}

/// Rewrites model.safetensors with `edit` applied to its tensors.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join("model.safetensors");
    let mut tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn pytorch_bin_and_sharded_safetensors_load_to_the_same_model() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = Clip::load(&ModelSpec::local(fixtures().join("tiny-clip"))).unwrap();
    let expected = image_features(&reference);

    // pytorch_model.bin, read with candle's pickle reader.
    let pth = tmp.path().join("pth");
    copy_dir(&fixtures().join("tiny-clip"), &pth);
    std::fs::remove_file(pth.join("model.safetensors")).unwrap();
    std::fs::copy(
        fixtures().join("tiny-clip.pytorch_model.bin"),
        pth.join("pytorch_model.bin"),
    )
    .unwrap();
    let clip = Clip::load(&ModelSpec::local(&pth)).unwrap();
    assert_eq!(image_features(&clip), expected);
    // A legacy (pre-1.6, non-zip) pickle says what it is and how to convert it.
    std::fs::write(pth.join("pytorch_model.bin"), b"\x80\x02}q\x00.").unwrap();
    let err = match Clip::load(&ModelSpec::local(&pth)) {
        Ok(_) => panic!("a legacy pickle loaded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains("legacy (non-zip)") && err.contains("safetensors"),
        "{err}"
    );

    // Two shards plus model.safetensors.index.json.
    let sharded = tmp.path().join("sharded");
    copy_dir(&fixtures().join("tiny-clip"), &sharded);
    let all =
        candle_core::safetensors::load(sharded.join("model.safetensors"), &Device::Cpu).unwrap();
    std::fs::remove_file(sharded.join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let ts: Vec<(&str, &Tensor)> = part.iter().map(|n| (n.as_str(), &all[*n])).collect();
        std::fs::write(
            sharded.join(shard),
            safetensors::serialize(ts, None).unwrap(),
        )
        .unwrap();
        for n in part {
            map.insert((*n).clone(), shard.into());
        }
    }
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        serde_json::json!({ "weight_map": map }).to_string(),
    )
    .unwrap();
    let clip = Clip::load(&ModelSpec::local(&sharded)).unwrap();
    assert_eq!(image_features(&clip), expected);
}

/// Tensors the model does not read, and a missing `logit_scale`, are warned about (as
/// `transformers` warns of unexpected and missing keys): a damaged name would otherwise pass
/// silently, with the default temperature. The fixture itself loads without warnings.
#[test]
fn unused_tensors_and_a_missing_logit_scale_are_warned_about() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("tiny-clip");
    let clip = Clip::load(&ModelSpec::local(&base)).unwrap();
    assert!(clip.warnings.is_empty(), "{:?}", clip.warnings);
    let d = tmp.path().join("renamed");
    copy_dir(&base, &d);
    edit_weights(&d, |t| {
        for (n, _) in t.iter_mut() {
            if n == "logit_scale" {
                *n = "logit_scal?".into();
            }
        }
    });
    let clip = Clip::load(&ModelSpec::local(&d)).unwrap();
    let w = clip.warnings.join("\n");
    assert!(
        w.contains("model.safetensors: 1 tensor(s) that this CLIP model does not use, ignored: `logit_scal?`")
            && w.contains("no `logit_scale`; the temperature is exp(logit_scale_init_value"),
        "{w}"
    );
}

#[test]
fn broken_checkpoints_name_the_file_and_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("tiny-clip");

    let d = tmp.path().join("missing-tensor");
    copy_dir(&base, &d);
    edit_weights(&d, |t| {
        t.retain(|(n, _)| n != "vision_model.post_layernorm.bias")
    });
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors")
            && e.contains("missing tensor `vision_model.post_layernorm.bias`"),
        "{e}"
    );

    // Weights that are there but not a file are named as such, not reported missing.
    let d = tmp.path().join("weights-folder");
    copy_dir(&base, &d);
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    std::fs::create_dir(d.join("model.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(e.contains("model.safetensors: a folder, not a file"), "{e}");
    #[cfg(unix)]
    {
        std::fs::remove_dir(d.join("model.safetensors")).unwrap();
        std::os::unix::fs::symlink(d.join("gone"), d.join("model.safetensors")).unwrap();
        let e = load_err(&d);
        assert!(
            e.contains("model.safetensors: a link to a file that does not exist"),
            "{e}"
        );
        std::fs::remove_file(d.join("tokenizer.json")).unwrap();
        std::fs::create_dir(d.join("tokenizer.json")).unwrap();
        let e = load_err(&d);
        assert!(e.contains("tokenizer.json: a folder, not a file"), "{e}");
    }

    // A config with fewer layers than the weights: the last layer would be dropped silently.
    let d = tmp.path().join("fewer-layers");
    copy_dir(&base, &d);
    let cfg_path = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["vision_config"]["num_hidden_layers"] = 1.into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors")
            && e.contains("`vision_model.encoder.layers.1.")
            && e.contains("1 layer(s)"),
        "{e}"
    );

    // The load error of a copy whose `text_projection.weight` is `t`.
    let with_projection = |name: &str, t: Tensor| {
        let d = tmp.path().join(name);
        copy_dir(&base, &d);
        edit_weights(&d, |ts| {
            let i = ts
                .iter()
                .position(|(n, _)| n == "text_projection.weight")
                .unwrap();
            ts[i].1 = t;
        });
        load_err(&d)
    };
    let e = with_projection(
        "bad-shape",
        Tensor::zeros((24, 31), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(
        e.contains("`text_projection.weight` has shape [24, 31] but config.json expects [24, 32]"),
        "{e}"
    );

    // Integer weights are refused by name, before candle would cast or reject them.
    let e = with_projection(
        "integer-tensor",
        Tensor::zeros((24, 32), candle_core::DType::U8, &Device::Cpu).unwrap(),
    );
    assert!(
        e.contains("model.safetensors: tensor `text_projection.weight` is stored as U8"),
        "{e}"
    );

    let d = tmp.path().join("bad-config");
    copy_dir(&base, &d);
    std::fs::write(d.join("config.json"), "{\"text_config\": ").unwrap();
    let e = load_err(&d);
    assert!(e.contains("config.json"), "{e}");

    let d = tmp.path().join("no-tokenizer");
    copy_dir(&base, &d);
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("required file `tokenizer.json` is missing"),
        "{e}"
    );

    // A tokenizer without CLIP's post-processor never emits the end token the text tower pools.
    let d = tmp.path().join("no-end-token");
    copy_dir(&base, &d);
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("tokenizer.json")).unwrap()).unwrap();
    tok["post_processor"] = serde_json::Value::Null;
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("tokenizer.json") && e.contains("end-of-text token"),
        "{e}"
    );

    // An id beyond the embedding table (a vocabulary with a gap: its count still fits).
    let d = tmp.path().join("id-beyond-vocab");
    copy_dir(&base, &d);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
    let n = cfg["text_config"]["vocab_size"].as_u64().unwrap();
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("tokenizer.json")).unwrap()).unwrap();
    let vocab = tok["model"]["vocab"].as_object_mut().unwrap();
    let (token, _) = vocab.iter().find(|(_, id)| id.as_u64() == Some(3)).unwrap();
    let token = token.clone();
    vocab.insert(token.clone(), (n + 5).into());
    std::fs::write(d.join("tokenizer.json"), tok.to_string()).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("tokenizer.json")
            && e.contains(&format!("token id {}", n + 5))
            && e.contains(&format!("{n} embeddings")),
        "{e}"
    );

    let d = tmp.path().join("garbage-weights");
    copy_dir(&base, &d);
    std::fs::write(
        d.join("model.safetensors"),
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}    ",
    )
    .unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors file"),
        "{e}"
    );

    let d = tmp.path().join("no-weights");
    copy_dir(&base, &d);
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(e.contains("no weights found"), "{e}");

    let e = load_err(&tmp.path().join("does-not-exist"));
    assert!(
        e.contains("does-not-exist") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn preprocessor_config_is_read_and_checked() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_dir(&fixtures().join("tiny-clip"), &d);
    std::fs::write(
        d.join("preprocessor_config.json"),
        r#"{"crop_size": 48, "size": 48}"#,
    )
    .unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("preprocessor_config.json") && e.contains("image_size 32"),
        "{e}"
    );
    std::fs::write(
        d.join("preprocessor_config.json"),
        r#"{"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}"#,
    )
    .unwrap();
    let clip = Clip::load(&ModelSpec::local(&d)).unwrap();
    assert_eq!(clip.preprocess.mean, Some([0.5; 3]));
    std::fs::remove_file(d.join("preprocessor_config.json")).unwrap();
    let clip = Clip::load(&ModelSpec::local(&d)).unwrap();
    assert_eq!(
        clip.preprocess,
        clipft::preprocess::PreprocessConfig::openai(32)
    );
}

#[test]
fn preprocessor_config_without_centre_crop() {
    use clipft::preprocess::{Decode, View};
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    copy_dir(&fixtures().join("tiny-clip"), &d);
    let config = d.join("preprocessor_config.json");
    // A fixed resize that is not the tower's size can never fit: refused at load.
    std::fs::write(
        &config,
        r#"{"do_center_crop": false, "size": {"height": 48, "width": 48}}"#,
    )
    .unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("preprocessor_config.json") && e.contains("do_center_crop"),
        "{e}"
    );

    // A shortest-edge resize fits square images only: the others are an error naming the
    // image (it used to panic in the decoding thread).
    std::fs::write(
        &config,
        r#"{"do_center_crop": false, "do_convert_rgb": false}"#,
    )
    .unwrap();
    let clip = Clip::load(&ModelSpec::local(&d)).unwrap();
    assert!(
        clip.warnings.iter().any(|w| w.contains("do_convert_rgb")),
        "{:?}",
        clip.warnings
    );
    assert_eq!(clip.stored_dtypes, ["F32"]);
    let (square, wide) = (tmp.path().join("square.png"), tmp.path().join("wide.png"));
    image::RgbImage::new(50, 50).save(&square).unwrap();
    image::RgbImage::new(60, 40).save(&wide).unwrap();
    let pre = &clip.preprocess;
    let px = pre
        .read_view(&square, &View::Center, Decode::Exact, 0)
        .unwrap();
    assert_eq!(px.dimensions(), (32, 32));
    let e = pre
        .read_view(&wide, &View::Center, Decode::Exact, 0)
        .unwrap_err();
    assert!(
        e.path == wide && e.msg.contains("48x32") && e.msg.contains("do_center_crop"),
        "{e:?}"
    );
}

/// Lays out `files` as a Hugging Face hub cache entry for `repo` at `revision`.
fn fake_hub_cache(hub: &Path, repo: &str, revision: &str, files: &Path) {
    let root = hub.join(format!("models--{}", repo.replace('/', "--")));
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let refs = root.join("refs").join(revision);
    std::fs::create_dir_all(refs.parent().unwrap()).unwrap();
    std::fs::write(&refs, commit).unwrap();
    copy_dir(files, &root.join("snapshots").join(commit));
}

#[test]
fn hub_ids_resolve_from_the_cache_when_offline() {
    let ws = Workspace::new();
    let hf_home = ws.path().join("hf");
    fake_hub_cache(
        &hf_home.join("hub"),
        "someone/tiny-clip",
        "main",
        &fixtures().join("tiny-clip"),
    );
    let out = ws
        .bare("info")
        .args(["--model", "someone/tiny-clip"])
        .env("HF_HOME", &hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(common::stdout(&out).contains("someone/tiny-clip"));
    // A commit hash finds its snapshot folder (huggingface_hub writes no ref for one).
    let out = ws
        .bare("info")
        .args(["--model", "someone/tiny-clip", "--revision"])
        .arg("0123456789abcdef0123456789abcdef01234567")
        .env("HF_HOME", &hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    // The default model's known-good ref is used when no --revision is given.
    fake_hub_cache(
        &hf_home.join("hub"),
        "openai/clip-vit-base-patch32",
        "refs/pr/15",
        &fixtures().join("tiny-clip"),
    );
    let out = ws
        .bare("info")
        .args(["--model", "openai/clip-vit-base-patch32"])
        .env("HF_HOME", &hf_home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(common::stdout(&out).contains("refs/pr/15"));
    // HF_HUB_CACHE wins over HF_HOME.
    let out = ws
        .bare("info")
        .args(["--model", "someone/tiny-clip"])
        .env("HF_HOME", ws.path().join("elsewhere"))
        .env("HF_HUB_CACHE", hf_home.join("hub"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn offline_and_not_cached_says_how_to_get_the_model() {
    let ws = Workspace::new();
    let out = ws
        .bare("info")
        .args(["--model", "openai/clip-vit-base-patch32"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("not in the Hugging Face cache") && e.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
    assert!(e.contains("config.json"), "{e}");
    // The typed error is available to library callers.
    std::env::set_var("HF_HOME", ws.path().join("hf2"));
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let err = clipft::model::hub::resolve("someone/else", None, false).unwrap_err();
    assert!(matches!(err, LoadError::NotCached { .. }), "{err}");
}

#[test]
fn unreachable_hub_gives_a_clear_download_error() {
    let ws = Workspace::new();
    // A closed local port: the request fails at once, as it does on a machine without network.
    let out = ws
        .bare("info")
        // ("404" in the URL must not read as "file not found".)
        .args(["--model", "someone/not-cached-404"])
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .timeout(std::time::Duration::from_secs(120))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let e = stderr(&out);
    assert!(
        e.contains("could not download `config.json` of model `someone/not-cached-404`"),
        "{e}"
    );
    assert!(e.contains("HF_HUB_OFFLINE=1"), "{e}");
}

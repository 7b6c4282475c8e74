//! The extraction pipeline as a library: batches, unreadable images, recycled batch buffers and
//! both ways pixels travel to the model give the features of each image encoded alone.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use clipft::features::{image_batches, image_features, ExtractOptions, PixelTransfer};
use clipft::model::{synth, Clip, ModelSpec};
use clipft::preprocess::{Decode, View};

/// A tiny random model and 12 images (PNG and JPEG) with a corrupt JPEG among them.
fn setup(dir: &Path) -> (Clip, Vec<PathBuf>) {
    synth::write_checkpoint(&dir.join("model"), &synth::tiny_config(), 3).unwrap();
    synth::write_dataset(
        &dir.join("data"),
        3,
        [("train", 4), ("val", 0), ("test", 0)],
        3,
    )
    .unwrap();
    let mut paths: Vec<PathBuf> = walk(&dir.join("data/train"));
    paths.sort();
    let bad = dir.join("data/train/corrupt.jpg");
    std::fs::write(&bad, b"\xFF\xD8\xFF\xE0 not a jpeg").unwrap();
    paths.insert(5, bad);
    (
        Clip::load(&ModelSpec::local(dir.join("model"))).unwrap(),
        paths,
    )
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Features of one image encoded on its own, from the CPU preprocessing path.
fn alone(clip: &Clip, path: &Path) -> Vec<f32> {
    let (h, w) = clip.preprocess.crop;
    let mut px = vec![0f32; 3 * h as usize * w as usize];
    clip.preprocess
        .read_into(path, &View::Center, Decode::Exact, 0, &mut px)
        .unwrap();
    let x = Tensor::from_vec(px, (1, 3, h as usize, w as usize), &Device::Cpu).unwrap();
    clip.model.image_features(&x).unwrap().to_vec2().unwrap()[0].clone()
}

#[test]
fn both_pixel_transfers_give_each_images_own_features_across_batches_and_bad_images() {
    let tmp = tempfile::tempdir().unwrap();
    let (clip, paths) = setup(tmp.path());
    let bad = 5;
    let mut by_transfer = Vec::new();
    for transfer in [PixelTransfer::Normalized, PixelTransfer::Bytes] {
        // Batches of 4 over 13 paths: four batches, the second with the bad image, the buffers
        // of the first batches reused by the later ones.
        let opts = ExtractOptions {
            batch_size: 4,
            skip_bad_images: true,
            transfer,
            ..ExtractOptions::default()
        };
        let f = image_features(&clip, &paths, &View::Center, &opts).unwrap();
        let expected_kept: Vec<usize> = (0..paths.len()).filter(|&i| i != bad).collect();
        assert_eq!(f.kept, expected_kept, "{transfer:?}");
        assert_eq!(f.skipped.len(), 1);
        assert_eq!(f.skipped[0].path, paths[bad]);
        let rows: Vec<Vec<f32>> = f.features.to_vec2().unwrap();
        for (row, &i) in rows.iter().zip(&f.kept) {
            let want = alone(&clip, &paths[i]);
            let diff = row
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{transfer:?}: image {i} differs by {diff}");
        }
        by_transfer.push(rows);
    }
    // The same model input either way, so the same bits.
    assert_eq!(by_transfer[0], by_transfer[1]);
}

#[test]
fn image_batches_hands_over_model_inputs_and_per_path_errors_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let (clip, paths) = setup(tmp.path());
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let (h, w) = clip.preprocess.crop;
    for transfer in [PixelTransfer::Normalized, PixelTransfer::Bytes] {
        let opts = ExtractOptions {
            batch_size: 5,
            transfer,
            ..ExtractOptions::default()
        };
        let mut seen = Vec::new();
        image_batches(&clip, &refs, &View::Center, &opts, |x, errors| {
            let n_good = errors.iter().filter(|e| e.is_none()).count();
            let x = x.expect("every batch has a good image");
            assert_eq!(x.dims(), &[n_good, 3, h as usize, w as usize]);
            assert_eq!(x.dtype(), clip.dtype);
            seen.extend(errors.iter().map(Option::is_some));
            Ok(())
        })
        .unwrap();
        let want: Vec<bool> = (0..paths.len()).map(|i| i == 5).collect();
        assert_eq!(seen, want, "{transfer:?}");
    }
}

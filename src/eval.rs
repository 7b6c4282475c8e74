//! Classification metrics and the result table / JSON of `clipft eval`.

use std::io::Write;

use anyhow::Result;
use candle_core::Tensor;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct ClassAccuracy {
    pub class: String,
    pub n: usize,
    /// Top-1 accuracy in percent; `None` when the split has no (readable) image of the class.
    pub top1: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub method: String,
    pub split: String,
    pub n: usize,
    /// Percent.
    pub top1: f64,
    /// Percent; only with at least 5 classes.
    pub top5: Option<f64>,
    pub per_class: Vec<ClassAccuracy>,
    /// Images that could not be read and were skipped (`--skip-bad-images`).
    pub skipped: usize,
}

/// Rank of the true class: classes with a strictly higher logit, plus equal ones with a lower index
/// (a stable descending sort), so ties never count in the model's favour twice. A NaN true-class
/// logit ranks last (every comparison with NaN is false, which would otherwise rank it first).
fn rank(row: &[f32], label: usize) -> usize {
    let l = row[label];
    if l.is_nan() {
        return row.len();
    }
    row.iter()
        .enumerate()
        .filter(|&(j, &x)| x > l || (x == l && j < label))
        .count()
}

/// NaN or infinite logits: the model or adapter is broken. Typed so that `eval` can name the
/// adapter file the numbers came from.
#[derive(Debug)]
pub struct NonFiniteLogits {
    pub method: String,
    /// Images whose logits are not all finite, of `n`.
    pub bad: usize,
    pub n: usize,
    pub split: String,
}

impl std::fmt::Display for NonFiniteLogits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} gives non-finite logits (NaN or infinite) for {} of {} {} images: the model or \
             adapter is broken (a fine-tune whose training diverged? retrain it with a lower --lr)",
            self.method, self.bad, self.n, self.split
        )
    }
}

impl std::error::Error for NonFiniteLogits {}

/// Top-1/top-5 and per-class accuracy of `logits` (`[N, C]`) against `labels`.
pub fn evaluate(
    logits: &Tensor,
    labels: &[usize],
    class_names: &[String],
    method: &str,
    split: &str,
    skipped: usize,
) -> Result<EvalReport> {
    let rows = logits.to_vec2::<f32>()?;
    anyhow::ensure!(
        rows.len() == labels.len(),
        "{} logit rows for {} labels",
        rows.len(),
        labels.len()
    );
    anyhow::ensure!(
        !labels.is_empty(),
        "{method} on {split}: no image to score ({skipped} unreadable image(s) skipped)"
    );
    // A broken model (e.g. a diverged fine-tune) gives NaN or infinite logits; any accuracy
    // computed from them would be meaningless.
    let bad = rows
        .iter()
        .filter(|r| r.iter().any(|x| !x.is_finite()))
        .count();
    if bad > 0 {
        return Err(NonFiniteLogits {
            method: method.to_string(),
            bad,
            n: rows.len(),
            split: split.to_string(),
        }
        .into());
    }
    let c = class_names.len();
    let mut hits1 = 0usize;
    let mut hits5 = 0usize;
    let mut per = vec![(0usize, 0usize); c];
    for (row, &y) in rows.iter().zip(labels) {
        anyhow::ensure!(
            row.len() == c && y < c,
            "logits have {} classes, expected {c}",
            row.len()
        );
        let r = rank(row, y);
        hits1 += (r == 0) as usize;
        hits5 += (r < 5) as usize;
        per[y].0 += 1;
        per[y].1 += (r == 0) as usize;
    }
    let n = labels.len();
    let pct = |h: usize, n: usize| {
        if n == 0 {
            0.0
        } else {
            100.0 * h as f64 / n as f64
        }
    };
    Ok(EvalReport {
        method: method.to_string(),
        split: split.to_string(),
        n,
        top1: pct(hits1, n),
        top5: (c >= 5).then(|| pct(hits5, n)),
        per_class: class_names
            .iter()
            .zip(per)
            .map(|(name, (k, h))| ClassAccuracy {
                class: name.clone(),
                n: k,
                top1: (k > 0).then(|| pct(h, k)),
            })
            .collect(),
        skipped,
    })
}

/// CLIP's zero-shot logits: `100 · f · Wᵀ` on L2-normalised features and classifier.
pub fn zero_shot_logits(normalized_features: &Tensor, classifier: &Tensor) -> Result<Tensor> {
    Ok((normalized_features.matmul(&classifier.t()?)? * 100.0)?)
}

/// The human-readable table.
pub fn write_table(report: &EvalReport, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{} on {} ({} images)",
        report.method, report.split, report.n
    )?;
    writeln!(out, "  top-1  {:6.2}%", report.top1)?;
    if let Some(t5) = report.top5 {
        writeln!(out, "  top-5  {t5:6.2}%")?;
    }
    if report.skipped > 0 {
        writeln!(out, "  skipped {} unreadable image(s)", report.skipped)?;
    }
    // Columns by display width: a decomposed accent takes no column, a CJK character two.
    use unicode_width::UnicodeWidthStr;
    let width = report
        .per_class
        .iter()
        .map(|c| c.class.width())
        .max()
        .unwrap_or(5)
        .clamp(5, 40);
    let pad = |s: &str| format!("{s}{}", " ".repeat(width.saturating_sub(s.width())));
    writeln!(out, "  {}  {:>6}  {:>7}", pad("class"), "n", "top-1")?;
    for c in &report.per_class {
        let class = pad(&c.class);
        match c.top1 {
            Some(t) => writeln!(out, "  {class}  {:>6}  {t:>6.2}%", c.n)?,
            None => writeln!(out, "  {class}  {:>6}  {:>7}", c.n, "-")?,
        }
    }
    Ok(())
}

/// Everything `clipft eval` computes for one split, whatever the method.
pub struct EvalRun {
    pub report: EvalReport,
    /// `[N, C]` logits of the readable images, rows in dataset order.
    pub logits: Tensor,
    pub labels: Vec<usize>,
    pub paths: Vec<std::path::PathBuf>,
    /// The images skipped as unreadable, with why.
    pub skipped: Vec<crate::preprocess::ImageError>,
}

/// Scores a split with any classifier on CLIP image features: centre-crop features (through the
/// feature cache), L2-normalised, given to `logits_of`, then the metrics.
pub fn evaluate_split(
    clip: &crate::model::Clip,
    dataset: &crate::data::Dataset,
    split: crate::data::Split,
    opts: &crate::features::ExtractOptions,
    method: &str,
    logits_of: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<EvalRun> {
    use crate::features::{image_features, l2_normalize};
    let samples = dataset.samples(split)?;
    let paths: Vec<_> = samples.iter().map(|s| s.path.clone()).collect();
    let feats = image_features(clip, &paths, &crate::preprocess::View::Center, opts)?;
    let logits = logits_of(&l2_normalize(&feats.features)?)?;
    let labels: Vec<usize> = feats.kept.iter().map(|&i| samples[i].label).collect();
    let report = evaluate(
        &logits,
        &labels,
        &dataset.class_names(),
        method,
        split.as_str(),
        feats.skipped.len(),
    )?;
    let paths = feats
        .kept
        .iter()
        .map(|&i| samples[i].path.clone())
        .collect();
    Ok(EvalRun {
        report,
        logits,
        labels,
        paths,
        skipped: feats.skipped,
    })
}

/// Zero-shot CLIP on a split: prompt-ensemble classifier, centre-crop image features, `100·cos`.
pub fn zero_shot(
    clip: &crate::model::Clip,
    dataset: &crate::data::Dataset,
    split: crate::data::Split,
    template_set: &[String],
    opts: &crate::features::ExtractOptions,
) -> Result<EvalRun> {
    let classifier = crate::features::text_classifier(
        clip,
        &dataset.class_names(),
        template_set,
        crate::features::TEXT_BATCH,
        opts.progress,
    )?;
    evaluate_split(clip, dataset, split, opts, "zeroshot", |f| {
        zero_shot_logits(f, &classifier)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn topk_and_per_class() {
        let names: Vec<String> = (0..6).map(|i| format!("c{i}")).collect();
        let logits = Tensor::new(
            &[
                [9f32, 1., 2., 3., 4., 5.], // label 0: rank 0
                [9., 1., 2., 3., 4., 5.],   // label 1: rank 5 (misses top-5)
                [1., 2., 9., 3., 4., 5.],   // label 3: rank 2
                [1., 1., 1., 1., 1., 1.],   // label 2: tie, rank 2
            ],
            &Device::Cpu,
        )
        .unwrap();
        let r = evaluate(&logits, &[0, 1, 3, 2], &names, "m", "test", 0).unwrap();
        assert_eq!(r.n, 4);
        assert!((r.top1 - 25.0).abs() < 1e-9);
        assert!((r.top5.unwrap() - 75.0).abs() < 1e-9);
        assert_eq!(r.per_class[0].top1, Some(100.0));
        assert_eq!(r.per_class[1].top1, Some(0.0));
        assert_eq!(r.per_class[4].n, 0);
        assert_eq!(
            r.per_class[4].top1, None,
            "no image of the class: no accuracy"
        );
        let few = evaluate(
            &logits.narrow(1, 0, 4).unwrap(),
            &[0, 1, 3, 2],
            &names[..4],
            "m",
            "t",
            0,
        )
        .unwrap();
        assert!(few.top5.is_none());
    }

    /// The table's columns line up for names with decomposed accents or wide characters.
    #[test]
    fn table_columns_go_by_display_width() {
        let names: Vec<String> = ["cafe\u{301}", "\u{65e5}\u{672c}", "dog"]
            .map(String::from)
            .to_vec();
        let logits = Tensor::new(&[[1f32, 0., 0.], [0., 1., 0.]], &Device::Cpu).unwrap();
        let r = evaluate(&logits, &[0, 1], &names, "m", "test", 0).unwrap();
        let mut out = Vec::new();
        write_table(&r, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        use unicode_width::UnicodeWidthStr;
        let rows: Vec<&str> = text.lines().skip_while(|l| !l.contains("class")).collect();
        assert_eq!(rows.len(), 4, "{text}");
        for row in &rows {
            assert_eq!(row.width(), rows[0].width(), "{text}");
        }
    }

    /// NaN never ranks first, and logits with NaN or infinities are refused with the method and
    /// split named, instead of scoring a broken model as perfect.
    #[test]
    fn non_finite_logits_are_refused() {
        assert_eq!(rank(&[f32::NAN, f32::NAN, f32::NAN], 1), 3);
        assert_eq!(rank(&[1.0, f32::NAN, 0.5], 0), 0);
        let names: Vec<String> = (0..3).map(|i| format!("c{i}")).collect();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let logits = Tensor::new(&[[1f32, 0., 0.], [0., bad, 0.]], &Device::Cpu).unwrap();
            let e = evaluate(&logits, &[0, 1], &names, "fd-align", "val", 0)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("fd-align") && e.contains("1 of 2 val images"),
                "{e}"
            );
        }
    }
}

//! CLIP tokenisation from a Hugging Face `tokenizer.json`.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::LoadError;

/// A `tokenizer.json` tokenizer that truncates like `transformers` does with
/// `truncation=True, max_length=context_length`: the text is cut so that the sequence, with its
/// start and end tokens, fits the context; the end token is always kept.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    context_length: usize,
}

impl ClipTokenizer {
    pub fn from_file(path: &Path, context_length: usize) -> Result<Self, LoadError> {
        let bad = |msg: String| LoadError::BadFile {
            path: path.to_path_buf(),
            msg,
        };
        let mut inner = Tokenizer::from_file(path).map_err(|e| bad(e.to_string()))?;
        inner
            .with_truncation(Some(TruncationParams {
                max_length: context_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| bad(e.to_string()))?;
        // Padding is done by the text tower; the pooled EOS token never sees it (causal mask).
        inner.with_padding(None);
        Ok(Self {
            inner,
            context_length,
        })
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Token ids with start/end tokens, truncated to the context length, unpadded.
    pub fn encode_batch(&self, texts: &[String]) -> anyhow::Result<Vec<Vec<u32>>> {
        Ok(self.encode_batch_noting_cuts(texts)?.0)
    }

    /// [`ClipTokenizer::encode_batch`], and how many of the texts were cut to fit the context.
    pub fn encode_batch_noting_cuts(
        &self,
        texts: &[String],
    ) -> anyhow::Result<(Vec<Vec<u32>>, usize)> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing prompts: {e}"))?;
        let cut = encodings
            .iter()
            .filter(|e| !e.get_overflowing().is_empty())
            .count();
        Ok((
            encodings
                .into_iter()
                .map(|e| e.get_ids().to_vec())
                .collect(),
            cut,
        ))
    }

    /// Whether two texts give the same tokens, those past the context length included.
    pub fn same_tokens(&self, a: &str, b: &str) -> anyhow::Result<bool> {
        let all = |text: &str| -> anyhow::Result<Vec<u32>> {
            let e = self
                .inner
                .encode(text, true)
                .map_err(|e| anyhow::anyhow!("tokenizing `{text}`: {e}"))?;
            let mut ids = e.get_ids().to_vec();
            for part in e.get_overflowing() {
                ids.extend_from_slice(part.get_ids());
            }
            Ok(ids)
        };
        Ok(all(a)? == all(b)?)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The largest token id it can produce (added tokens included), with its token: what must
    /// fit the text tower's embedding table. A vocabulary with gaps has ids beyond its size.
    pub fn max_id(&self) -> Option<(u32, String)> {
        self.inner
            .get_vocab(true)
            .into_iter()
            .map(|(t, id)| (id, t))
            .max()
    }
}

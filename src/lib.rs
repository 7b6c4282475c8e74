//! clipft: few-shot adaptation of CLIP in one binary.
//!
//! Layout: [`model`] loads checkpoints (config, weights, tokenizer) and holds the CLIP towers;
//! [`preprocess`] turns image files into pixels exactly as `CLIPImageProcessor` does; [`data`]
//! reads dataset folders and samples few-shot sets; [`features`] is the shared, cached, pipelined
//! feature extractor; [`eval`] scores logits; [`cli`] is the command line on top of all of it.

pub mod alloc;
pub mod cli;
pub mod data;
pub mod demo;
pub mod eval;
pub mod features;
pub mod interrupt;
pub mod io;
pub mod methods;
pub mod model;
pub mod preprocess;
pub mod progress;
pub mod templates;
#[cfg(test)]
pub(crate) mod testutil;

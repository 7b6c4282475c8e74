//! Few-shot adaptation methods built on the feature core: each keeps its math in pure functions
//! on tensors (testable without a model) and adds thin orchestration over [`crate::model::Clip`],
//! [`crate::data::Dataset`] and [`crate::features`].

pub mod fdalign;
pub mod fdalign_cli;
pub mod fdalign_train;
pub mod optim;
pub mod tip;
pub mod tip_cli;

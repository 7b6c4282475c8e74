//! Helpers shared by the unit tests.

use candle_core::Tensor;

/// `max |a − b|` over all elements (f32 tensors).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

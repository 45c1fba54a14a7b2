//! Helpers shared by chunk-run's integration tests.
#![allow(dead_code)]

use ftk::tensors::TensorFile;
use std::collections::BTreeMap;
use std::path::Path;

/// Every tensor of a safetensors file as f32, by name.
pub fn load(p: &Path) -> BTreeMap<String, Vec<f32>> {
    let f = TensorFile::open(p).unwrap();
    f.names()
        .into_iter()
        .map(|n| {
            let v = f.require(&n).unwrap().to_f32_vec().unwrap();
            (n, v)
        })
        .collect()
}

/// max |a − b| / max |b| over one tensor, the scale floored at `floor`.
pub fn rel_err(a: &[f32], b: &[f32], floor: f64) -> f64 {
    let scale = b
        .iter()
        .map(|x| f64::from(x.abs()))
        .fold(0.0, f64::max)
        .max(floor);
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
        / scale
}

//! diffuse-synth's own test helpers, over the workspace's `ftk-test`.
#![allow(dead_code)]

use assert_cmd::Command;
use ftk::tensors::TensorFile;
use std::path::{Path, PathBuf};

/// testdata/diffuse-synth
pub fn td() -> PathBuf {
    ftk_test::testdata("diffuse-synth")
}

/// The diffuse-synth binary, quiet.
pub fn bin() -> Command {
    ftk_test::tool("diffuse-synth")
}

/// A tensor of a safetensors file as f32.
pub fn f32s(p: &Path, name: &str) -> Vec<f32> {
    TensorFile::open(p)
        .unwrap()
        .require(name)
        .unwrap()
        .to_f32_vec()
        .unwrap()
}

/// The `latents` a run wrote.
pub fn latents(p: &Path) -> Vec<f32> {
    f32s(p, "latents")
}

/// max |a − b| over two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The checked-in tiny random pipeline (testdata/gen/diffuse_synth_ref.py).
pub fn tiny() -> PathBuf {
    td().join("tiny-sd")
}

/// `diffuse-synth --model tiny-sd`, quiet.
pub fn sample_tiny() -> Command {
    let mut c = bin();
    c.arg("--model").arg(tiny());
    c
}

/// `diffuse-synth describe --model tiny-sd`, quiet.
pub fn describe_tiny() -> Command {
    let mut c = bin();
    c.arg("describe").arg("--model").arg(tiny());
    c
}

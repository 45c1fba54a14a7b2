//! diffuse-synth's own test helpers, over the workspace's `ftk-test`.
#![allow(dead_code)]

use assert_cmd::Command;
use candle_core::{Device, Tensor};
use diffuse_synth::classifier::Classifier;
use diffuse_synth::guidance::{loss_and_grad, Denoiser, FedCado};
use diffuse_synth::model;
use diffuse_synth::place::Placement;
use diffuse_synth::scheduler::{Config, Kind, Scheduler};
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
    f32_of(&TensorFile::open(p).unwrap(), name)
}

/// Tensor `name` of an open file as f32.
pub fn f32_of(f: &TensorFile, name: &str) -> Vec<f32> {
    f.require(name).unwrap().to_f32_vec().unwrap()
}

/// A reference file's metadata and its `runs` list (one JSON object per
/// pipeline run the generator made).
pub fn runs_of(
    f: &TensorFile,
) -> (
    &std::collections::HashMap<String, String>,
    Vec<serde_json::Value>,
) {
    let meta = f.metadata().unwrap();
    let runs = serde_json::from_str(&meta["runs"]).unwrap();
    (meta, runs)
}

/// max |v|.
pub fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0.0, |a, b| a.max(b.abs()))
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

/// Row 0 of a [B, ...] tensor as a [1, ...] f32 CPU tensor.
pub fn row0(f: &TensorFile, name: &str) -> Tensor {
    let t = f.require(name).unwrap();
    let mut shape = t.shape.to_vec();
    let v = t.to_f32_vec().unwrap();
    let n = v.len() / shape[0];
    shape[0] = 1;
    Tensor::from_vec(v[..n].to_vec(), shape, &Device::Cpu).unwrap()
}

/// FedCADO's (loss, d loss / d z) at the first DDPM step of testdata/gen's case
/// (tiny SD, JSON classifier, class 1, CFG 3), with the UNet and VAE on `p`.
pub fn fedcado_loss_and_grad(p: &Placement, with_ce: bool) -> (f32, Vec<f32>) {
    let td = td();
    let unet = model::load_unet_on(&td.join("tiny-sd"), p).unwrap();
    let vae = model::load_vae_on(&td.join("tiny-sd"), p).unwrap();
    let clf = Classifier::load(
        &td.join("classifier.json"),
        &td.join("classifier.safetensors"),
    )
    .unwrap();
    let pipe = TensorFile::open(&td.join("pipeline.safetensors")).unwrap();
    let ctx = cfg_context(&pipe);
    let z0 = row0(&pipe, "latents");
    let (_, raw, src) = model::read_scheduler_config(&td.join("tiny-sd")).unwrap();
    let mut cfg = Config::from_json(Kind::Ddpm, &raw, &src).unwrap();
    cfg.apply_pipeline_fixes();
    let den = Denoiser {
        unet: &unet,
        ctx,
        class_labels: None,
        weights: vec![3.0],
        guided: true,
    };
    let fc = FedCado {
        classifier: &clf,
        class: 1,
        size: 12,
        bn_weight: 0.1,
    };
    let mut sched = Scheduler::new(&cfg, 4, 0.0).unwrap();
    let z: Vec<f32> = z0
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v * sched.init_noise_sigma())
        .collect();
    let t = sched.timesteps()[0];
    loss_and_grad(&den, &vae, &fc, &mut sched, 0, t, &z, (1, 4, 8, 8), with_ce).unwrap()
}

/// The CFG context of the pipeline fixture: its negative row, then its positive row.
pub fn cfg_context(pipe: &TensorFile) -> Tensor {
    Tensor::cat(
        &[
            row0(pipe, "negative_prompt_embeds"),
            row0(pipe, "prompt_embeds"),
        ],
        0,
    )
    .unwrap()
}

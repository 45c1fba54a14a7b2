//! The GPU code path without a GPU: a placement other than f32-on-the-CPU makes every
//! layer take candle's own ops instead of the CPU kernels (what runs on CUDA), with the
//! casts, attention slicing and f32 hand-offs of `place.rs`. Run here on the CPU in f64
//! (FedCADO's loss and latent gradient against PyTorch's, as tests/fedcado.rs checks the
//! f32 kernels: rel 1e-3) and in f16 (the half-precision plumbing: the same noise
//! prediction and image within a few percent of their scale; candle's CPU matmul has no
//! bf16, which tests/cuda.rs covers on a GPU).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use diffuse_synth::classifier::Classifier;
use diffuse_synth::guidance::{loss_and_grad, Denoiser, FedCado};
use diffuse_synth::model;
use diffuse_synth::place::Placement;
use diffuse_synth::scheduler::{Config, Kind, Scheduler};
use ftk::tensors::TensorFile;

fn row0(f: &TensorFile, name: &str) -> Tensor {
    let t = f.require(name).unwrap();
    let mut shape = t.shape.to_vec();
    let v = t.to_f32_vec().unwrap();
    let n = v.len() / shape[0];
    shape[0] = 1;
    Tensor::from_vec(v[..n].to_vec(), shape, &Device::Cpu).unwrap()
}

fn place(dtype: DType) -> Placement {
    Placement {
        device: Device::Cpu,
        dtype,
    }
}

/// FedCADO's (loss, d loss / d z) at the first DDPM step with the UNet and VAE on `p`.
fn fedcado(p: &Placement, with_ce: bool) -> (f32, Vec<f32>) {
    let td = td();
    let unet = model::load_unet_on(&td.join("tiny-sd"), p).unwrap();
    let vae = model::load_vae_on(&td.join("tiny-sd"), p).unwrap();
    let clf = Classifier::load(
        &td.join("classifier.json"),
        &td.join("classifier.safetensors"),
    )
    .unwrap();
    let pipe = TensorFile::open(&td.join("pipeline.safetensors")).unwrap();
    let ctx = Tensor::cat(
        &[
            row0(&pipe, "negative_prompt_embeds"),
            row0(&pipe, "prompt_embeds"),
        ],
        0,
    )
    .unwrap();
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

#[test]
fn f64_candle_ops_path_matches_pytorch_gradients() {
    let reff = TensorFile::open(&td().join("fedcado.safetensors")).unwrap();
    for (tag, with_ce) in [("ce_bn", true), ("bn", false)] {
        let (loss, g) = fedcado(&place(DType::F64), with_ce);
        let want_loss = reff
            .require(&format!("loss.{tag}"))
            .unwrap()
            .to_f32_vec()
            .unwrap()[0];
        let want = reff
            .require(&format!("grad.{tag}"))
            .unwrap()
            .to_f32_vec()
            .unwrap();
        let scale = want.iter().fold(0f32, |a, b| a.max(b.abs()));
        let d = max_abs_diff(&g, &want);
        eprintln!(
            "f64 {tag}: loss {loss} (torch {want_loss}), grad rel diff {:e}",
            d / scale
        );
        assert!(
            (loss - want_loss).abs() <= 1e-4 * want_loss.abs(),
            "{tag}: {loss} vs {want_loss}"
        );
        assert!(d <= 1e-3 * scale, "{tag}: gradient rel diff {}", d / scale);
    }
}

/// The noise prediction of a CFG batch and the VAE decode, half precision against f32.
#[test]
fn half_precision_plumbing_runs_and_stays_close() {
    let td = td();
    let pipe = TensorFile::open(&td.join("pipeline.safetensors")).unwrap();
    let ctx = Tensor::cat(
        &[
            row0(&pipe, "negative_prompt_embeds"),
            row0(&pipe, "prompt_embeds"),
        ],
        0,
    )
    .unwrap();
    let z = row0(&pipe, "latents");
    let x = Tensor::cat(&[&z, &z], 0).unwrap();
    let run = |p: &Placement| -> (Vec<f32>, Vec<f32>) {
        let unet = model::load_unet_on(&td.join("tiny-sd"), p).unwrap();
        let vae = model::load_vae_on(&td.join("tiny-sd"), p).unwrap();
        let e = unet.eps(&x, 981.0, &ctx, None).unwrap();
        assert_eq!(e.dtype(), DType::F32);
        let img = model::decode(&vae, &z).unwrap();
        assert_eq!(img.dtype(), DType::F32);
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        (flat(e), flat(img))
    };
    let (e32, i32_) = run(&Placement::cpu());
    // candle's CPU matmul has no bf16: bf16 runs on CUDA only (tests/cuda.rs)
    let (e, i) = run(&place(DType::F16));
    let re = max_abs_diff(&e, &e32) / e32.iter().fold(0f32, |a, b| a.max(b.abs()));
    let ri = max_abs_diff(&i, &i32_) / i32_.iter().fold(0f32, |a, b| a.max(b.abs()));
    eprintln!("f16: eps rel diff {re:e}, image rel diff {ri:e}");
    assert!(re <= 5e-2 && ri <= 5e-2, "f16: eps {re}, image {ri}");
}

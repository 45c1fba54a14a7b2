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
use diffuse_synth::model;
use diffuse_synth::place::Placement;
use ftk::tensors::TensorFile;

fn place(dtype: DType) -> Placement {
    Placement {
        device: Device::Cpu,
        dtype,
    }
}

#[test]
fn f64_candle_ops_path_matches_pytorch_gradients() {
    let reff = TensorFile::open(&td().join("fedcado.safetensors")).unwrap();
    for (tag, with_ce) in [("ce_bn", true), ("bn", false)] {
        let (loss, g) = fedcado_loss_and_grad(&place(DType::F64), with_ce);
        let want_loss = f32_of(&reff, &format!("loss.{tag}"))[0];
        let want = f32_of(&reff, &format!("grad.{tag}"));
        let scale = max_abs(&want);
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
    let ctx = cfg_context(&pipe);
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
    let re = max_abs_diff(&e, &e32) / max_abs(&e32);
    let ri = max_abs_diff(&i, &i32_) / max_abs(&i32_);
    eprintln!("f16: eps rel diff {re:e}, image rel diff {ri:e}");
    assert!(re <= 5e-2 && ri <= 5e-2, "f16: eps {re}, image {ri}");
}

//! FedCADO's loss and gradient w.r.t. the latents against PyTorch (testdata/gen:
//! diffusers UNet + DDPM x0 + VAE decode + torch bicubic + a BN conv net), rel 1e-3;
//! and a guided run through the CLI.

mod common;

use common::*;

use diffuse_synth::classifier::bicubic_matrix;
use diffuse_synth::place::Placement;
use diffuse_synth::sd;
use ftk::tensors::TensorFile;
use std::path::Path;

#[test]
fn gradients_match_pytorch() {
    let _ = sd::attention::LayerNormSlow::new; // the differentiable LayerNorm is in use
    let td = td();
    let reff = TensorFile::open(&td.join("fedcado.safetensors")).unwrap();
    for (tag, with_ce) in [("ce_bn", true), ("bn", false)] {
        let (loss, g) = fedcado_loss_and_grad(&Placement::cpu(), with_ce);
        let want_loss = f32_of(&reff, &format!("loss.{tag}"))[0];
        let want = f32_of(&reff, &format!("grad.{tag}"));
        assert!(
            (loss - want_loss).abs() <= 1e-4 * want_loss.abs(),
            "{tag}: loss {loss} vs {want_loss}"
        );
        let scale = max_abs(&want);
        assert!(scale > 0.0);
        let d = max_abs_diff(&g, &want);
        eprintln!(
            "{tag}: loss {loss} (torch {want_loss}), grad rel diff {:e}",
            d / scale
        );
        assert!(
            d <= 1e-3 * scale,
            "{tag}: gradient differs from PyTorch by {d} (max |grad| {scale})"
        );
    }
}

#[test]
fn bicubic_rows_sum_to_one_and_identity_at_same_size() {
    for (i, o) in [(16, 12), (16, 224), (7, 3)] {
        let m = bicubic_matrix(i, o);
        for r in 0..o {
            let s: f32 = m[r * i..(r + 1) * i].iter().sum();
            assert!((s - 1.0).abs() < 1e-5, "{i}->{o} row {r} sums to {s}");
        }
    }
    let m = bicubic_matrix(5, 5);
    for r in 0..5 {
        for c in 0..5 {
            assert!((m[r * 5 + c] - f32::from(u8::from(r == c))).abs() < 1e-6);
        }
    }
}

#[test]
fn guided_run_through_the_cli() {
    let td = td();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g.safetensors");
    let plain = dir.path().join("p.safetensors");
    let run = |o: &Path, guided: bool| {
        let mut c = sample_tiny();
        c.args([
            "--scheduler",
            "ddpm",
            "--steps",
            "3",
            "--guidance-scale",
            "3",
            "--seed",
            "4",
            "--batch",
            "2",
            "--shard",
            "0/2",
        ])
        .arg("--prompt-embeds")
        .arg(td.join("pipeline.safetensors"))
        .arg("-o")
        .arg(o);
        if guided {
            c.arg("--classifier")
                .arg(td.join("classifier.safetensors"))
                .arg("--classifier-arch")
                .arg(td.join("classifier.json"))
                .args([
                    "--class",
                    "1",
                    "--classifier-size",
                    "12",
                    "--noise-edit-steps",
                    "2",
                    "--classifier-scale",
                    "50",
                ]);
        }
        c.assert().success();
        TensorFile::open(o)
            .unwrap()
            .require("latents")
            .unwrap()
            .to_f32_vec()
            .unwrap()
    };
    let g = run(&out, true);
    let p = run(&plain, false);
    let d = max_abs_diff(&g, &p);
    assert!(
        d > 1e-3,
        "guidance must change the samples (max change {d})"
    );
    let mut c = sample_tiny();
    let o = c
        .args([
            "--steps", "2", "--seed", "1", "--batch", "2", "--class", "7",
        ])
        .arg("--prompt-embeds")
        .arg(td.join("pipeline.safetensors"))
        .arg("--classifier")
        .arg(td.join("classifier.safetensors"))
        .arg("--classifier-arch")
        .arg(td.join("classifier.json"))
        .arg("-o")
        .arg(dir.path().join("x.safetensors"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--class 7"));
}

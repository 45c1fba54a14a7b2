//! `diffuse-synth describe` (FedDEO) against the same three SGD steps in PyTorch
//! (testdata/gen: diffusers VAE encode + DDPM add_noise + UNet, lr 10, fixed draws).

mod common;

use common::*;

use ftk::records::{DiffuseSynthDescription, DiffuseSynthSample};
use ftk::tensors::TensorFile;
use std::path::Path;

#[test]
fn help_documents_the_records() {
    ftk_test::assert_documented::<DiffuseSynthSample>(&ftk_test::help("diffuse-synth", &[]));
    ftk_test::assert_documented::<DiffuseSynthDescription>(&ftk_test::help(
        "diffuse-synth",
        &["describe"],
    ));
}

#[test]
fn description_matches_pytorch_sgd() {
    let td = td();
    let fx = td.join("describe.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.safetensors");
    let o = describe_tiny()
        .arg("--images")
        .arg(&fx)
        .arg("--init")
        .arg(&fx)
        .arg("--train-noise")
        .arg(&fx)
        .args(["--lr", "10"])
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rec: DiffuseSynthDescription = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((rec.images, rec.steps), (3, 3));
    assert_eq!(rec.path, out.display().to_string());
    let losses = f32s(&fx, "losses");
    let l0 = rec.loss_first.unwrap();
    let l2 = rec.loss_last.unwrap();
    assert!(
        (l0 - losses[0]).abs() <= 1e-4 * losses[0],
        "{l0} vs {}",
        losses[0]
    );
    assert!(
        (l2 - losses[2]).abs() <= 1e-4 * losses[2],
        "{l2} vs {}",
        losses[2]
    );
    let got = f32s(&out, "prompt_embeds");
    let want = f32s(&fx, "final");
    let init = f32s(&fx, "prompt_embeds");
    // compare the learned change, relative to its size
    let change = max_abs_diff(&want, &init);
    assert!(change > 1e-2, "the fixture's SGD must move the description");
    let d = max_abs_diff(&got, &want);
    assert!(
        d <= 1e-3 * change,
        "description differs from PyTorch by {d} (change {change})"
    );
}

#[test]
fn describe_rejects_bad_input() {
    let td = td();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("d.safetensors");
    let o = describe_tiny()
        .arg("--images")
        .arg(td.join("multi.safetensors"))
        .arg("--init")
        .arg(td.join("describe.safetensors"))
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("multi.safetensors") && err.contains("images"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1);
    assert!(!out.exists());
}

/// `--images DIR` reads PNGs (8-bit, sorted by name) as the same [N,3,H,W]
/// tensor a safetensors file of those 8-bit values gives: the learned
/// descriptions are identical.
#[test]
fn png_directory_equals_the_same_pixels_as_safetensors() {
    use ftk::tensors::{write_safetensors, OutTensor};
    let td = td();
    let fx = td.join("describe.safetensors");
    let f = TensorFile::open(&fx).unwrap();
    let t = f.require("images").unwrap();
    let shape = t.shape.to_vec();
    let px = t.to_f32_vec().unwrap();
    let (n, per) = (shape[0], shape[1] * shape[2] * shape[3]);
    let dir = tempfile::tempdir().unwrap();
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    for i in 0..n {
        // reversed names: the directory order, not the creation order, counts
        let p = imgs.join(format!("img{}.png", n - 1 - i));
        let chw = &px[(n - 1 - i) * per..(n - i) * per];
        diffuse_synth::png::write_png_chw(&p, chw, shape[1], shape[2], shape[3]).unwrap();
    }
    let q: Vec<f32> = px
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() / 255.0)
        .collect();
    let qf = dir.path().join("q.safetensors");
    write_safetensors(&qf, &[OutTensor::f32("images", shape.clone(), &q)], None).unwrap();
    let run = |images: &Path, out: &Path| {
        let o = describe_tiny()
            .arg("--images")
            .arg(images)
            .arg("--init")
            .arg(&fx)
            .arg("--train-noise")
            .arg(&fx)
            .arg("-o")
            .arg(out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        f32s(out, "prompt_embeds")
    };
    let a = run(&imgs, &dir.path().join("a.safetensors"));
    let b = run(&qf, &dir.path().join("b.safetensors"));
    assert_eq!(a, b);
    // a directory without PNGs is a usage error
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let o = describe_tiny()
        .arg("--images")
        .arg(&empty)
        .arg("--init")
        .arg(&fx)
        .arg("-o")
        .arg(dir.path().join("x.safetensors"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no .png images"));
}

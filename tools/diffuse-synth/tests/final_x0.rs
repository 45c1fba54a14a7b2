//! `--final x0`: FedCADO's and FedDEO's generators stop before the last
//! timestep and keep the last step's pred_original_sample. Checked against
//! that loop over diffusers' DDPM on the tiny pipeline
//! (testdata/gen/diffuse_synth_final_ref.py).

mod common;

use common::*;

use ftk::tensors::TensorFile;

fn latents(final_mode: Option<&str>) -> Vec<f32> {
    let td = td();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let mut c = sample_tiny();
    c.args([
        "--scheduler",
        "ddpm",
        "--steps",
        "4",
        "--guidance-scale",
        "3",
    ])
    .arg("--prompt-embeds")
    .arg(td.join("pipeline.safetensors"))
    .arg("--latents")
    .arg(td.join("pipeline.safetensors"))
    .arg("--step-noise")
    .arg(td.join("final-x0.safetensors"))
    .arg("-o")
    .arg(&out);
    if let Some(m) = final_mode {
        c.args(["--final", m]);
    }
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    TensorFile::open(&out)
        .unwrap()
        .require("latents")
        .unwrap()
        .to_f32_vec()
        .unwrap()
}

#[test]
fn final_x0_matches_the_authors_loop() {
    let want = f32s(&td().join("final-x0.safetensors"), "x0");
    let got = latents(Some("x0"));
    let d = max_abs_diff(&got, &want);
    assert!(d <= 1e-4, "max abs diff {d}");
    // Without a classifier the default is diffusers' behaviour: every step.
    let plain = latents(None);
    assert_eq!(plain, latents(Some("sample")));
    assert!(plain.iter().zip(&got).any(|(a, b)| (a - b).abs() > 1e-3));
}

//! FedDISC / Stable-unCLIP conditioning against diffusers on the checked-in tiny random
//! unCLIP pipeline (testdata/gen/diffuse_synth_unclip_ref.py): final latents within 1e-4
//! (max abs) of StableUnCLIPImg2ImgPipeline for PNDM v-prediction, DDIM and DPM++ 2M with
//! the noise-augmentation draw fed in; FedDISC's three-branch guidance with re-noised
//! uploads and per-client global embeddings against a diffusers-UNet loop; and the seeded
//! augmentation's properties (shards, per-sample draws, the noise level matters).

mod common;

use common::*;

use assert_cmd::Command;
use diffuse_synth::unclip::timestep_embedding;
use ftk::tensors::TensorFile;
use std::path::Path;

/// The tiny unCLIP model with the reference's text embeddings.
fn base(td: &Path) -> Command {
    let mut c = bin();
    c.arg("--model")
        .arg(td.join("tiny-unclip"))
        .arg("--prompt-embeds")
        .arg(td.join("unclip.safetensors"));
    c
}

#[test]
fn stable_unclip_pipeline_runs_match_diffusers() {
    let td = td();
    let refp = td.join("unclip.safetensors");
    let f = TensorFile::open(&refp).unwrap();
    let (meta, runs) = runs_of(&f);
    assert_eq!(runs.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    for r in &runs {
        let key = r["key"].as_str().unwrap();
        let out = dir.path().join(format!("{key}.safetensors"));
        let o = base(&td)
            .args(["--scheduler", r["scheduler"].as_str().unwrap()])
            .args(["--steps", &meta["steps"]])
            .args(["--guidance-scale", &r["guidance"].to_string()])
            .args(["--noise-level", &r["noise_level"].to_string()])
            .arg("--latents")
            .arg(&refp)
            .arg("--image-embeds")
            .arg(&refp)
            .arg("--image-embeds-noise")
            .arg(td.join(format!("unclip-noise-{key}.safetensors")))
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{key}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let want = f32_of(&f, &format!("final.{key}"));
        let d = max_abs_diff(&latents(&out), &want);
        eprintln!("{key}: max |diff| {d:e}");
        assert!(
            d <= 1e-4,
            "{key}: final latents differ from diffusers by {d}"
        );
    }
}

fn feddisc(td: &Path, out: &Path) -> Command {
    let mut c = base(td);
    c.args(["--steps", "4", "--class", "1"])
        .arg("--latents")
        .arg(td.join("unclip.safetensors"))
        .arg("--image-embeds")
        .arg(td.join("feddisc.safetensors"))
        .arg("--global-embeds")
        .arg(td.join("feddisc.safetensors"))
        .arg("--global-embeds")
        .arg(td.join("feddisc-client1.safetensors"))
        .arg("-o")
        .arg(out);
    c
}

#[test]
fn feddisc_three_branch_guidance_matches_pytorch() {
    // defaults: the folder's PNDM (v-prediction), guidance 2, noise level 200
    let td = td();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fd.safetensors");
    let o = feddisc(&td, &out)
        .arg("--image-embeds-noise")
        .arg(td.join("feddisc.safetensors"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = TensorFile::open(&td.join("feddisc.safetensors")).unwrap();
    let meta = f.metadata().unwrap();
    assert_eq!(meta["noise_level"], "200");
    assert_eq!(meta["guidance"], "2.0");
    let want = f32_of(&f, "final");
    let d = max_abs_diff(&latents(&out), &want);
    eprintln!("feddisc: max |diff| {d:e}");
    assert!(d <= 1e-4, "FedDISC final latents differ by {d}");
    // the global branch matters: without it the result moves
    let two = dir.path().join("two.safetensors");
    let o = base(&td)
        .args(["--steps", "4", "--class", "1"])
        .arg("--latents")
        .arg(td.join("unclip.safetensors"))
        .arg("--image-embeds")
        .arg(td.join("feddisc.safetensors"))
        .arg("--image-embeds-noise")
        .arg(td.join("feddisc.safetensors"))
        .arg("-o")
        .arg(&two)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(max_abs_diff(&latents(&two), &want) > 1e-2);
}

#[test]
fn seeded_augmentation_shards_and_levels() {
    let td = td();
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| -> (Vec<f32>, String) {
        let out = dir.path().join(name);
        let o = base(&td)
            .args(["--steps", "3", "--seed", "11", "--batch", "2"])
            .arg("--image-embeds")
            .arg(td.join("unclip.safetensors"))
            .args(extra)
            .arg("-o")
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        (
            latents(&out),
            String::from_utf8_lossy(&o.stdout).into_owned(),
        )
    };
    let (all, manifest) = run("all.safetensors", &[]);
    assert_eq!(manifest.lines().count(), 2);
    let (s0, _) = run("s0.safetensors", &["--shard", "0/2"]);
    let (s1, _) = run("s1.safetensors", &["--shard", "1/2"]);
    let joined: Vec<f32> = s0.iter().chain(&s1).copied().collect();
    assert_eq!(joined, all, "shards must reproduce the rows of one run");
    let (again, _) = run("again.safetensors", &[]);
    assert_eq!(again, all, "a seeded run is reproducible");
    // level 999 nearly replaces the embedding by noise; level 0 keeps it
    let (hi, _) = run("hi.safetensors", &["--noise-level", "999"]);
    let (lo, _) = run("lo.safetensors", &["--noise-level", "0"]);
    assert!(max_abs_diff(&hi, &lo) > 1e-2);
}

#[test]
fn augmentation_draws_are_per_sample() {
    use diffuse_synth::{sample_seed, unclip};
    let td = td();
    let img = td.join("unclip.safetensors");
    let flags = |level| unclip::Flags {
        image_embeds: &img,
        key: None,
        global_embeds: &[],
        noise_level: level,
        noise_file: None,
        class: None,
    };
    // 2 rows for 4 samples: samples 0 and 1 use row 0, 2 and 3 row 1
    let c = unclip::Conditioning::new(&td.join("tiny-unclip"), 16, &flags(0), 4).unwrap();
    let lab = |g: usize, seed: u64, guided: bool| -> Vec<f32> {
        let t = c.labels(g, sample_seed(seed, g), guided).unwrap();
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let (l0, l1) = (lab(0, 11, false), lab(1, 11, false));
    assert_eq!(l0.len(), 16);
    assert_eq!(l0, lab(0, 11, false), "the same seed draws the same noise");
    assert!(
        max_abs_diff(&l0[..8], &l1[..8]) > 0.0,
        "each sample draws its own noise"
    );
    assert_ne!(l0, lab(0, 12, false));
    // noise level 0 leaves the embedding nearly as it is; the level embedding is emb(0)
    let raw = TensorFile::open(&img)
        .unwrap()
        .require("image_embeds")
        .unwrap()
        .to_f32_vec()
        .unwrap();
    assert!(max_abs_diff(&l0[..8], &raw[..8]) < 0.05);
    assert_eq!(l0[8..], timestep_embedding(0.0, 8)[..]);
    // guided: the unconditional branch's label is zeros, then the image label
    let g = lab(0, 11, true);
    assert_eq!(g.len(), 32);
    assert!(g[..16].iter().all(|&v| v == 0.0));
    assert_eq!(g[16..], l0[..]);
}

#[test]
fn noise_level_embedding_is_diffusers() {
    // get_timestep_embedding(t, 8, flip_sin_to_cos=True, downscale_freq_shift=0):
    // [cos(t w), sin(t w)] with w_i = 10000^(-i/4), i = 0..3
    let e = timestep_embedding(200.0, 8);
    for i in 0..4 {
        let w = 10000f64.powf(-(i as f64) / 4.0);
        let a = 200.0 * w;
        assert!((f64::from(e[i]) - a.cos()).abs() < 1e-4, "cos {i}");
        assert!((f64::from(e[i + 4]) - a.sin()).abs() < 1e-4, "sin {i}");
    }
    assert_eq!(timestep_embedding(0.0, 5), vec![1.0, 1.0, 0.0, 0.0, 0.0]);
}

#[test]
fn bad_unclip_input_exits_2_and_names_it() {
    let td = td();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.safetensors");
    let check = |mut c: Command, needle: &str| {
        let o = c.arg("-o").arg(&out).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{needle}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(needle), "expected {needle:?} in: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(!out.exists());
    };
    let unclip = || {
        let mut c = base(&td);
        c.args(["--steps", "2", "--seed", "1", "--batch", "2"]);
        c
    };
    // an unCLIP UNet without image embeddings
    check(unclip(), "give --image-embeds");
    // image embeddings for a UNet without a class embedding
    let mut c = bin();
    c.arg("--model")
        .arg(td.join("tiny-sd"))
        .arg("--prompt-embeds")
        .arg(td.join("pipeline.safetensors"))
        .args(["--steps", "2", "--seed", "1", "--batch", "2"])
        .arg("--image-embeds")
        .arg(td.join("unclip.safetensors"));
    check(c, "no class embedding");
    // rows of the wrong width (the prompt embeddings are rank 3; latents are rank 4)
    let mut c = unclip();
    c.arg("--image-embeds")
        .arg(td.join("unclip-noise-ddim.g1.n0.safetensors"))
        .args(["--image-embeds-key", "noise", "--noise-level", "5"]);
    // [2, 8] noise rows are 8 wide: valid as embeddings, so this one succeeds
    let o = c.arg("-o").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(&out).unwrap();
    let mut c = unclip();
    c.arg("--image-embeds")
        .arg(td.join("resnet.safetensors"))
        .args(["--image-embeds-key", "resnet18.logits"]);
    check(c, "5 wide");
    // a noise level outside the noising scheduler's range
    let mut c = unclip();
    c.arg("--image-embeds")
        .arg(td.join("unclip.safetensors"))
        .args(["--noise-level", "1000"]);
    check(c, "--noise-level 1000");
    // a class no upload has
    let mut c = unclip();
    c.arg("--image-embeds")
        .arg(td.join("feddisc.safetensors"))
        .args(["--class", "7"]);
    check(c, "label 7");
    // three samples cannot split two rows evenly
    let mut c = base(&td);
    c.args(["--steps", "2", "--seed", "1", "--batch", "3"])
        .arg("--image-embeds")
        .arg(td.join("unclip.safetensors"));
    check(c, "multiple");
}

//! The whole sampler against diffusers' StableDiffusionPipeline on the checked-in tiny
//! random pipeline (testdata/diffuse-synth/tiny-sd, made by testdata/gen/diffuse_synth_ref.py):
//! final latents within 1e-4 (max abs, float32) for every scheduler, with and without
//! classifier-free guidance, and the VAE decode of diffusers' own latents.

mod common;

use common::*;

use candle_core::{Device, Tensor};
use ftk::tensors::TensorFile;
use std::path::{Path, PathBuf};

#[test]
fn vae_decode_matches_diffusers() {
    let vae = diffuse_synth::model::load_vae(&td().join("tiny-sd")).unwrap();
    let f = TensorFile::open(&td().join("pipeline.safetensors")).unwrap();
    let lat = f.require("final.pndm.g3").unwrap();
    let shape = lat.shape.to_vec();
    let t = Tensor::from_vec(lat.to_f32_vec().unwrap(), shape, &Device::Cpu).unwrap();
    let img = diffuse_synth::model::decode(&vae, &t).unwrap();
    let got = img.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let want = f32_of(&f, "images.pndm.g3");
    let d = max_abs_diff(&got, &want);
    assert!(d <= 1e-4, "VAE decode differs from diffusers by {d}");
}

fn read(p: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let f = TensorFile::open(p).unwrap();
    let t = f.require(name).unwrap();
    (t.shape.to_vec(), t.to_f32_vec().unwrap())
}

#[test]
fn every_scheduler_matches_stable_diffusion_pipeline() {
    let td = td();
    let pipe = td.join("pipeline.safetensors");
    let f = TensorFile::open(&pipe).unwrap();
    let (meta, runs) = runs_of(&f);
    let steps = meta["steps"].clone();
    assert_eq!(runs.len(), 12);
    let dir = tempfile::tempdir().unwrap();
    let mut worst = 0f32;
    for r in &runs {
        let key = r["key"].as_str().unwrap();
        let out = dir.path().join(format!("{key}.safetensors"));
        let mut cmd = bin();
        cmd.arg("--model")
            .arg(td.join("tiny-sd"))
            .args([
                "--scheduler",
                r["scheduler"].as_str().unwrap(),
                "--steps",
                &steps,
            ])
            .args(["--guidance-scale", &r["guidance"].to_string()])
            .arg("--prompt-embeds")
            .arg(&pipe)
            .arg("--latents")
            .arg(&pipe)
            .arg("-o")
            .arg(&out);
        let noise = td.join(format!("noise-{key}.safetensors"));
        if noise.exists() {
            cmd.arg("--step-noise").arg(&noise);
        }
        cmd.assert().success();
        let (shape, got) = read(&out, "latents");
        let name = format!("final.{key}");
        let want = f.require(&name).unwrap();
        assert_eq!(shape, want.shape);
        let d = max_abs_diff(&got, &want.to_f32_vec().unwrap());
        assert!(
            d <= 1e-4,
            "{key}: final latents differ from diffusers by {d}"
        );
        worst = worst.max(d);
        let (_, img) = read(&out, "images");
        let want = f32_of(&f, &format!("images.{key}"));
        let d = max_abs_diff(&img, &want);
        assert!(d <= 1e-4, "{key}: images differ from diffusers by {d}");
    }
    eprintln!("worst final-latent difference {worst:e}");
}

#[test]
fn default_scheduler_is_the_folders() {
    let td = td();
    let pipe = td.join("pipeline.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    sample_tiny()
        .args(["--steps", "4", "--guidance-scale", "3", "--prompt-embeds"])
        .arg(&pipe)
        .arg("--latents")
        .arg(&pipe)
        .arg("-o")
        .arg(&out)
        .assert()
        .success();
    let (_, got) = read(&out, "latents");
    let (_, want) = read(&pipe, "final.pndm.g3");
    assert!(max_abs_diff(&got, &want) <= 1e-4);
}

fn seeded(dir: &Path, name: &str, extra: &[&str]) -> (PathBuf, String) {
    let td = td();
    let out = dir.join(name);
    let o = sample_tiny()
        .args([
            "--scheduler",
            "euler-ancestral",
            "--steps",
            "3",
            "--guidance-scale",
            "2",
        ])
        .arg("--prompt-embeds")
        .arg(td.join("pipeline.safetensors"))
        .args([
            "--seed", "11", "--batch", "2", "--class", "3", "--client", "c7",
        ])
        .args(extra)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (out, String::from_utf8(o.stdout).unwrap())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SampleRecord {
    kind: String,
    index: usize,
    seed: Option<u64>,
    class: Option<i64>,
    client: Option<String>,
    path: String,
}

#[test]
fn shards_reproduce_the_rows_of_one_run_and_write_pngs() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("png");
    let (full, manifest) = seeded(
        dir.path(),
        "full.safetensors",
        &["--png-dir", png.to_str().unwrap()],
    );
    let (s0, m0) = seeded(dir.path(), "s0.safetensors", &["--shard", "0/2"]);
    let (s1, m1) = seeded(dir.path(), "s1.safetensors", &["--shard", "1/2"]);
    let (_, f) = read(&full, "latents");
    let (_, a) = read(&s0, "latents");
    let (_, b) = read(&s1, "latents");
    assert_eq!(a.len() + b.len(), f.len());
    assert_eq!(
        [a, b].concat(),
        f,
        "shards must be exactly the rows of the full run"
    );
    let recs: Vec<SampleRecord> = manifest
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[1].index, 1);
    assert_eq!(recs[1].class, Some(3));
    assert_eq!(recs[1].client.as_deref(), Some("c7"));
    assert!(recs.iter().all(|r| r.kind == "sample" && r.seed.is_some()));
    let bytes = std::fs::read(&recs[1].path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let r1: SampleRecord = serde_json::from_str(m1.lines().next().unwrap()).unwrap();
    assert_eq!((r1.index, r1.seed), (1, recs[1].seed));
    assert_eq!(m0.lines().count(), 1);
    // a different seed gives different samples
    let (other, _) = seeded(
        dir.path(),
        "o.safetensors",
        &["--shard", "0/2", "--height", "16"],
    );
    let (_, o) = read(&other, "latents");
    assert_eq!(
        o,
        read(&s0, "latents").1,
        "explicit default height must not change the result"
    );
}

#[test]
fn several_weighted_conditions_reduce_to_cfg() {
    // e_u + w (e_1 - e_u) with one file is CFG; two files with weights (w, 0) must
    // give the same latents as one file with w (the zero-weight condition drops out).
    let td = td();
    let pipe = td.join("pipeline.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, files: usize, g: &str| {
        let out = dir.path().join(name);
        let mut c = bin();
        c.arg("--model")
            .arg(td.join("tiny-sd"))
            .args(["--scheduler", "ddim", "--steps", "3"]);
        for _ in 0..files {
            c.arg("--prompt-embeds").arg(&pipe);
        }
        c.args(["--guidance-scale", g])
            .arg("--latents")
            .arg(&pipe)
            .arg("-o")
            .arg(&out);
        c.assert().success();
        read(&out, "latents").1
    };
    let one = run("one.safetensors", 1, "3");
    let two = run("two.safetensors", 2, "3,0");
    let d = max_abs_diff(&one, &two);
    // batch 3 vs 2 through the UNet changes float32 rounding, nothing else
    assert!(d <= 1e-4, "zero-weight condition changed the result by {d}");
    let split = run("split.safetensors", 2, "1.5,1.5");
    let d = max_abs_diff(&one, &split);
    assert!(
        d <= 1e-4,
        "weights 1.5+1.5 on the same condition must equal 3: {d}"
    );
}

fn fails(args: &[&str], needle: &str) {
    let td = td();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let mut c = bin();
    c.current_dir(&td);
    let o = c.args(args).arg("-o").arg(&out).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "args {args:?}: stderr {err}");
    assert_eq!(err.lines().count(), 1, "one-line error expected, got {err}");
    assert!(
        err.contains(needle),
        "args {args:?}: {err:?} does not mention {needle:?}"
    );
    assert!(!out.exists(), "no output on error");
}

#[test]
fn bad_input_is_one_line_exit_2_and_no_output() {
    let base = [
        "--model",
        "tiny-sd",
        "--steps",
        "2",
        "--prompt-embeds",
        "pipeline.safetensors",
    ];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    fails(
        &with(&["--latents", "pipeline.safetensors", "--scheduler", "heun"]),
        "--scheduler \"heun\"",
    );
    fails(
        &with(&[
            "--latents",
            "pipeline.safetensors",
            "--scheduler",
            "ddim",
            "--karras",
        ]),
        "use_karras_sigmas",
    );
    fails(
        &with(&[
            "--latents",
            "pipeline.safetensors",
            "--scheduler",
            "pndm",
            "--beta-schedule",
            "cosine",
        ]),
        "beta_schedule",
    );
    fails(
        &with(&["--seed", "1", "--batch", "2", "--shard", "2/2"]),
        "--shard",
    );
    fails(&with(&["--seed", "1"]), "--batch");
    fails(
        &with(&["--latents", "noise-ddpm.g3.safetensors"]),
        "noise-ddpm.g3.safetensors",
    );
    fails(
        &with(&[
            "--latents",
            "pipeline.safetensors",
            "--guidance-scale",
            "1,2,3",
        ]),
        "--guidance-scale",
    );
    fails(
        &[
            "--model",
            "tiny-sd",
            "--prompt-embeds",
            "noise-ddpm.g3.safetensors",
            "--seed",
            "1",
            "--batch",
            "1",
        ],
        "prompt_embeds",
    );
    fails(
        &[
            "--model",
            "no-such-dir",
            "--prompt-embeds",
            "pipeline.safetensors",
            "--seed",
            "1",
            "--batch",
            "1",
        ],
        "no-such-dir",
    );
    fails(
        &with(&["--latents", "schedulers.safetensors"]),
        "schedulers.safetensors",
    );
    fails(
        &with(&[
            "--latents",
            "pipeline.safetensors",
            "--step-noise",
            "pipeline.safetensors",
            "--scheduler",
            "ddpm",
        ]),
        "noise",
    );
}

#[test]
fn two_weighted_conditions_match_a_diffusers_loop() {
    // testdata/gen: e = e_u + 2 (e_1 - e_u) + 1.5 (e_2 - e_u) with diffusers' UNet and DDIM.
    let td = td();
    let pipe = td.join("pipeline.safetensors");
    let multi = td.join("multi.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.safetensors");
    sample_tiny()
        .args([
            "--scheduler",
            "ddim",
            "--steps",
            "4",
            "--guidance-scale",
            "2,1.5",
        ])
        .arg("--prompt-embeds")
        .arg(&pipe)
        .arg("--prompt-embeds")
        .arg(&multi)
        .arg("--latents")
        .arg(&pipe)
        .arg("-o")
        .arg(&out)
        .assert()
        .success();
    let (_, got) = read(&out, "latents");
    let (_, want) = read(&multi, "final");
    let d = max_abs_diff(&got, &want);
    assert!(
        d <= 1e-4,
        "weighted conditions differ from the diffusers loop by {d}"
    );
}

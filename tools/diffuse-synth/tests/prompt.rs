//! `--prompt` end to end against diffusers' StableDiffusionPipeline(prompt=...,
//! negative_prompt=...) on the checked-in tiny pipeline with its tiny CLIP text encoder
//! (testdata/gen/diffuse_synth_ref.py, gen_text): final latents within 1e-4 for a prompt
//! per sample with per-sample negatives, one prompt for every sample, clip_skip, no CFG;
//! then a text condition next to a --prompt-embeds file, and bad input.

mod common;

use common::*;

use ftk::tensors::TensorFile;
use serde_json::Value;
use std::path::Path;

fn texts(v: &Value) -> Vec<String> {
    match v {
        Value::Null => vec![],
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().map(|x| x.as_str().unwrap().to_string()).collect(),
        o => panic!("{o}"),
    }
}

#[test]
fn prompts_match_stable_diffusion_pipeline() {
    let td = td();
    let refs = td.join("prompt.safetensors");
    let f = TensorFile::open(&refs).unwrap();
    let (meta, runs) = runs_of(&f);
    assert_eq!(runs.len(), 4);
    let dir = tempfile::tempdir().unwrap();
    for r in &runs {
        let key = r["key"].as_str().unwrap();
        let out = dir.path().join(format!("{key}.safetensors"));
        let mut c = bin();
        c.arg("--model")
            .arg(td.join("tiny-sd"))
            .args(["--scheduler", r["scheduler"].as_str().unwrap()])
            .args(["--steps", &meta["steps"]])
            .args(["--guidance-scale", &r["guidance"].to_string()])
            .arg("--latents")
            .arg(td.join("pipeline.safetensors"))
            .arg("-o")
            .arg(&out);
        for p in texts(&r["prompt"]) {
            c.args(["--prompt", &p]);
        }
        for p in texts(&r["negative"]) {
            c.args(["--negative-prompt", &p]);
        }
        if let Some(k) = r["clip_skip"].as_u64() {
            c.args(["--clip-skip", &k.to_string()]);
        }
        c.assert().success();
        let got = latents(&out);
        let want = f32_of(&f, &format!("final.{key}"));
        assert_eq!(got.len(), want.len(), "{key}");
        let d = max_abs_diff(&got, &want);
        assert!(
            d <= 1e-4,
            "{key}: final latents differ from diffusers by {d}"
        );
    }
}

/// A text condition and a --prompt-embeds condition at once: u + w1 (text - u) + w2 (file - u),
/// with the text's negative as u; against the same run given the text's embeddings as a file.
#[test]
fn text_and_embedding_conditions_combine() {
    let td = td();
    let dir = tempfile::tempdir().unwrap();
    let te = diffuse_synth::text::TextEncoder::load(&td.join("tiny-sd")).unwrap();
    let emb = te.encode(&["a photo of a cat".to_string()], 0).unwrap();
    let neg = te.encode(&[String::new()], 0).unwrap();
    let ef = dir.path().join("text.safetensors");
    ftk::tensors::write_safetensors(
        &ef,
        &[
            ftk::tensors::OutTensor::f32("prompt_embeds", vec![1, 77, 24], &emb),
            ftk::tensors::OutTensor::f32("negative_prompt_embeds", vec![1, 77, 24], &neg),
        ],
        None,
    )
    .unwrap();
    let other = dir.path().join("other.safetensors");
    let f = TensorFile::open(&td.join("text.safetensors")).unwrap();
    let v = f32_of(&f, "sd.embeds");
    ftk::tensors::write_safetensors(
        &other,
        &[ftk::tensors::OutTensor::f32(
            "prompt_embeds",
            vec![1, 77, 24],
            &v[77 * 24..2 * 77 * 24],
        )],
        None,
    )
    .unwrap();
    let run = |args: &[&std::ffi::OsStr], out: &Path| {
        sample_tiny()
            .args([
                "--scheduler",
                "ddim",
                "--steps",
                "3",
                "--seed",
                "5",
                "--batch",
                "2",
            ])
            .args(["--guidance-scale", "2,1.5"])
            .args(args)
            .arg("-o")
            .arg(out)
            .assert()
            .success();
        latents(out)
    };
    let a = run(
        &[
            "--prompt".as_ref(),
            "a photo of a cat".as_ref(),
            "--prompt-embeds".as_ref(),
            other.as_os_str(),
        ],
        &dir.path().join("a.safetensors"),
    );
    let b = run(
        &[
            "--prompt-embeds".as_ref(),
            ef.as_os_str(),
            "--prompt-embeds".as_ref(),
            other.as_os_str(),
        ],
        &dir.path().join("b.safetensors"),
    );
    let d = max_abs_diff(&a, &b);
    assert!(d <= 1e-5, "text condition != its embeddings as a file: {d}");
}

fn fails(args: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let o = bin()
        .current_dir(td())
        .args(args)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "args {args:?}: stderr {err}");
    assert!(
        err.contains(needle),
        "args {args:?}: {err:?} does not mention {needle:?}"
    );
    if !needle.starts_with("the argument") && !needle.contains("required") {
        assert_eq!(err.lines().count(), 1, "one-line error expected, got {err}");
    }
    assert!(!out.exists(), "no output on error");
}

#[test]
fn bad_prompt_input_is_exit_2_and_no_output() {
    let base = ["--model", "tiny-sd", "--steps", "2", "--seed", "1"];
    let with = |extra: &[&'static str]| -> Vec<&'static str> {
        base.iter().copied().chain(extra.iter().copied()).collect()
    };
    fails(
        &with(&["--batch", "3", "--prompt", "a", "--prompt", "b"]),
        "--prompt given 2 times",
    );
    fails(
        &with(&[
            "--batch",
            "2",
            "--prompt",
            "a",
            "--prompt",
            "b",
            "--negative-prompt",
            "x",
            "--negative-prompt",
            "y",
            "--negative-prompt",
            "z",
        ]),
        "--negative-prompt given 3 times",
    );
    fails(
        &with(&["--batch", "1", "--prompt", "a", "--clip-skip", "3"]),
        "has 2 layers",
    );
    fails(
        &with(&["--batch", "1", "--prompt", "a", "--guidance-scale", "2,3"]),
        "2 values for 1 conditions",
    );
    // no text encoder in the folder
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m");
    std::fs::create_dir(&m).unwrap();
    for sub in ["unet", "vae", "scheduler"] {
        std::os::unix::fs::symlink(td().join("tiny-sd").join(sub), m.join(sub)).unwrap();
    }
    let ms = m.to_str().unwrap().to_string();
    let ms: &'static str = Box::leak(ms.into_boxed_str());
    fails(
        &[
            "--model", ms, "--seed", "1", "--batch", "1", "--prompt", "a",
        ],
        "--prompt needs tokenizer/ and text_encoder/",
    );
    // a tokenizer without model_max_length
    let m2 = dir.path().join("m2");
    std::fs::create_dir(&m2).unwrap();
    for sub in ["unet", "vae", "scheduler", "text_encoder"] {
        std::os::unix::fs::symlink(td().join("tiny-sd").join(sub), m2.join(sub)).unwrap();
    }
    std::fs::create_dir(m2.join("tokenizer")).unwrap();
    std::fs::copy(
        td().join("tiny-sd/tokenizer/tokenizer.json"),
        m2.join("tokenizer/tokenizer.json"),
    )
    .unwrap();
    std::fs::write(m2.join("tokenizer/tokenizer_config.json"), "{}").unwrap();
    let ms2: &'static str = Box::leak(m2.to_str().unwrap().to_string().into_boxed_str());
    fails(
        &[
            "--model", ms2, "--seed", "1", "--batch", "1", "--prompt", "a",
        ],
        "model_max_length",
    );
    // --negative-prompt needs --prompt (clap)
    fails(
        &[
            "--model",
            "tiny-sd",
            "--prompt-embeds",
            "pipeline.safetensors",
            "--seed",
            "1",
            "--batch",
            "1",
            "--negative-prompt",
            "x",
        ],
        "required",
    );
}

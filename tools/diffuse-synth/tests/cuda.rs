//! `--device` / `--dtype`. Everywhere: the flags parse, half precision on the CPU and
//! `--device cuda` without a GPU are usage errors (exit 2, one line, no output left
//! behind), and `auto` without a GPU is the CPU path bit for bit. Where a GPU exists and
//! the binary has CUDA support (tools/diffuse-synth/cuda/build.sh test): every mode on
//! the checked-in tiny pipelines (CFG, text prompt, FedCADO with a JSON classifier and a
//! torchvision ResNet, FedDISC, FedDEO describe) on CUDA against the CPU path (itself
//! checked against diffusers/PyTorch): f32 within 1e-3 of each output's scale, bf16 and
//! f16 within 5e-2; skipped with the reason otherwise.

mod common;

use common::*;
use std::path::{Path, PathBuf};

/// One named run: its arguments after the binary (output `-o` added by `run`) and the
/// tensor compared.
struct Case {
    name: &'static str,
    args: Vec<String>,
    key: &'static str,
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn p(x: PathBuf) -> String {
    x.display().to_string()
}

fn cases() -> Vec<Case> {
    let td = td();
    let tiny = p(td.join("tiny-sd"));
    let pipe = p(td.join("pipeline.safetensors"));
    let mut v = vec![
        Case {
            name: "cfg-dpmpp",
            args: [
                s(&["--model", &tiny, "--scheduler", "dpmpp-2m", "--karras"]),
                s(&[
                    "--steps",
                    "10",
                    "--guidance-scale",
                    "3",
                    "--prompt-embeds",
                    &pipe,
                ]),
                s(&["--seed", "7", "--batch", "2"]),
            ]
            .concat(),
            key: "images",
        },
        Case {
            name: "prompt-ddim",
            args: [
                s(&["--model", &tiny, "--scheduler", "ddim", "--steps", "10"]),
                s(&["--guidance-scale", "3", "--prompt", "a photo of a cat"]),
                s(&["--negative-prompt", "blurry", "--seed", "7", "--batch", "2"]),
            ]
            .concat(),
            key: "latents",
        },
        Case {
            name: "fedcado-json",
            args: [
                s(&["--model", &tiny, "--scheduler", "ddpm", "--steps", "10"]),
                s(&["--guidance-scale", "3", "--prompt-embeds", &pipe]),
                s(&["--seed", "7", "--batch", "2", "--class", "1"]),
                s(&["--classifier", &p(td.join("classifier.safetensors"))]),
                s(&["--classifier-arch", &p(td.join("classifier.json"))]),
                s(&["--classifier-size", "12"]),
            ]
            .concat(),
            key: "latents",
        },
        Case {
            name: "fedcado-resnet18",
            args: [
                s(&["--model", &tiny, "--scheduler", "ddpm", "--steps", "10"]),
                s(&["--guidance-scale", "3", "--prompt-embeds", &pipe]),
                s(&["--seed", "7", "--batch", "2", "--noise-edit-steps", "2"]),
                s(&["--classifier", &p(td.join("resnet18-narrow.safetensors"))]),
                s(&["--classifier-arch", "resnet18", "--class", "3"]),
                s(&["--classifier-size", "36"]),
            ]
            .concat(),
            key: "latents",
        },
        Case {
            name: "feddisc-unclip",
            args: [
                s(&["--model", &p(td.join("tiny-unclip"))]),
                s(&["--prompt-embeds", &p(td.join("unclip.safetensors"))]),
                s(&["--image-embeds", &p(td.join("feddisc.safetensors"))]),
                s(&["--class", "1", "--seed", "7", "--batch", "2"]),
                s(&["--global-embeds", &p(td.join("feddisc.safetensors"))]),
            ]
            .concat(),
            key: "latents",
        },
    ];
    let desc = p(td.join("describe.safetensors"));
    v.push(Case {
        name: "describe",
        args: [
            s(&["describe", "--model", &tiny, "--images", &desc]),
            s(&["--init", &desc, "--lr", "10", "--seed", "0"]),
        ]
        .concat(),
        key: "prompt_embeds",
    });
    v
}

/// Run `case` on `device` in `dtype`; the compared tensor.
fn run(case: &Case, dir: &Path, device: &str, dtype: &str) -> Vec<f32> {
    let out = dir.join(format!("{}-{device}-{dtype}.safetensors", case.name));
    let o = bin()
        .args(&case.args)
        .args(["--device", device, "--dtype", dtype, "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{} on {device} {dtype}: {}",
        case.name,
        String::from_utf8_lossy(&o.stderr)
    );
    f32s(&out, case.key)
}

fn scale(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6)
}

/// Exit 2, one `diffuse-synth: error:` line holding `needle`, no stdout, no `out`.
fn assert_usage_error(o: &std::process::Output, needle: &str, out: &Path) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(o.stdout.is_empty(), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("diffuse-synth: error: "), "{err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    assert!(!out.exists(), "{} left behind", out.display());
}

#[test]
fn device_flags_parse_and_refuse() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let base = &cases()[0];
    let o = bin()
        .args(&base.args)
        .args(["--device", "gpu", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert_usage_error(&o, "use auto, cpu, cuda or cuda:N", &out);
    for dtype in ["bf16", "f16"] {
        let o = bin()
            .args(&base.args)
            .args(["--device", "cpu", "--dtype", dtype, "-o"])
            .arg(&out)
            .output()
            .unwrap();
        assert_usage_error(&o, "CUDA only", &out);
    }
    let o = bin()
        .args(&base.args)
        .args(["--dtype", "fp8", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert_usage_error(&o, "fp8", &out);
}

#[test]
fn without_a_gpu_cuda_is_refused_and_auto_is_the_cpu() {
    if ftk::device::cuda_devices().is_ok() && cfg!(feature = "cuda") {
        eprintln!("skipped: a CUDA device is present (cuda_agrees_with_cpu covers it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let pngs = dir.path().join("pngs");
    for case in cases() {
        for dev in ["cuda", "cuda:1"] {
            let o = bin()
                .args(&case.args)
                .args(["--device", dev, "--png-dir"])
                .arg(&pngs)
                .arg("-o")
                .arg(&out)
                .output()
                .unwrap();
            // describe has no --png-dir: clap refuses it first, also exit 2
            if case.name == "describe" {
                assert_eq!(o.status.code(), Some(2));
                continue;
            }
            assert_usage_error(&o, "--device cpu", &out);
            assert!(
                std::fs::read_dir(&pngs).map_or(true, |mut d| d.next().is_none()),
                "PNGs left behind"
            );
        }
    }
    let describe = cases().pop().unwrap();
    let o = bin()
        .args(&describe.args)
        .args(["--device", "cuda", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert_usage_error(&o, "--device cpu", &out);
    // auto: the CPU path, bit for bit
    let all = cases();
    for case in [&all[0], &all[5]] {
        let cpu = run(case, dir.path(), "cpu", "f32");
        let auto = run(case, dir.path(), "auto", "f32");
        assert_eq!(cpu, auto, "{}", case.name);
    }
}

#[test]
fn cuda_agrees_with_cpu() {
    if !cfg!(feature = "cuda") {
        eprintln!(
            "skipped: built without the `cuda` feature (tools/diffuse-synth/cuda/build.sh test)"
        );
        return;
    }
    if let Err(why) = ftk::device::cuda_devices() {
        eprintln!("skipped: no CUDA device ({why})");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut worst = vec![];
    for case in cases() {
        let cpu = run(&case, dir.path(), "cpu", "f32");
        let sc = scale(&cpu);
        for (dtype, tol) in [("f32", 1e-3f32), ("bf16", 5e-2), ("f16", 5e-2)] {
            let gpu = run(&case, dir.path(), "cuda", dtype);
            let rel = max_abs_diff(&cpu, &gpu) / sc;
            eprintln!(
                "{} {dtype}: max |cuda - cpu| / scale = {rel:.3e}",
                case.name
            );
            if rel > tol {
                worst.push(format!("{} {dtype}: {rel:.3e} > {tol:e}", case.name));
            }
        }
    }
    assert!(
        worst.is_empty(),
        "CUDA differs from the CPU path: {worst:?}"
    );
}

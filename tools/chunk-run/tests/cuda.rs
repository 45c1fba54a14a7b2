//! The CUDA engine against the CPU engine (itself checked against PyTorch in
//! torch_reference.rs): y, the input gradient and every weight gradient
//! agree to 1e-5 (f32) and 1e-2 (bf16) of each tensor's scale, for every
//! recompute mode; measured device activation memory follows mem-plan's
//! model. Run when a GPU exists, skipped with the reason otherwise; without
//! one, `--device cuda` and `--dtype bf16` on the CPU are usage errors.

use serde_json::Value;
use std::collections::BTreeMap;

const SHAPE: &[&str] = &[
    "--hidden",
    "96",
    "--ffn",
    "160",
    "--experts",
    "8",
    "--topk",
    "2",
    "--tokens",
    "300",
    "--layers",
    "2",
    "--seed",
    "5",
];

fn run(device: &str, dtype: &str, extra: &[&str]) -> (Vec<Value>, BTreeMap<String, Vec<f32>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.safetensors");
    let out = ftk_test::tool("chunk-run")
        .args(SHAPE)
        .args(["--device", device, "--dtype", dtype, "--grads-out"])
        .arg(&path)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{device} {dtype} {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recs = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (recs, ftk_test::tensors_f32(&path))
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    ftk_test::rel_err(a, b, 1e-3)
}

#[test]
fn cuda_agrees_with_cpu() {
    if let Err(why) = ftk::device::cuda_devices() {
        eprintln!("skipped: no CUDA device ({why})");
        let out = ftk_test::tool("chunk-run")
            .args(SHAPE)
            .args(["--device", "cuda"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--device cpu"), "{err}");
        let out = ftk_test::tool("chunk-run")
            .args(SHAPE)
            .args(["--dtype", "bf16"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("CUDA only"));
        return;
    }
    for routing in [
        &["--synthetic", "hot:0.4"][..],
        &["--norm-topk-prob", "false"][..],
    ] {
        for mode in ["none", "full", "chunked:3"] {
            let extra: Vec<&str> = routing
                .iter()
                .copied()
                .chain(["--recompute", mode])
                .collect();
            let (crec, cpu) = run("cpu", "f32", &extra);
            for (dtype, tol) in [("f32", 1e-5), ("bf16", 1e-2)] {
                let (grec, gpu) = run("cuda", dtype, &extra);
                assert_eq!(cpu.len(), gpu.len());
                for (name, want) in &cpu {
                    let got = &gpu[name];
                    assert_eq!(got.len(), want.len(), "{name}");
                    let err = rel_err(got, want);
                    assert!(
                        err <= tol,
                        "{dtype} {mode} {routing:?}: {name} differs by {err:.2e} of its scale"
                    );
                }
                let (g, c) = (&grec[0], &crec[0]);
                assert_eq!(g["device"], "cuda:0");
                assert_eq!(g["chunks_per_layer"], c["chunks_per_layer"]);
                assert_eq!(g["max_expert_tokens"], c["max_expert_tokens"]);
                let rel = (g["loss"].as_f64().unwrap() - c["loss"].as_f64().unwrap()).abs()
                    / c["loss"].as_f64().unwrap().abs().max(1e-3);
                assert!(
                    rel <= 10.0 * tol,
                    "{dtype} {mode}: loss differs by {rel:.2e}"
                );
                // Device buffers follow the same lifetimes as the CPU's, so
                // mem-plan's itemised model (with 2-byte expert activations
                // for bf16) predicts their high-water mark.
                let (m, p) = (
                    g["peak_act_bytes"].as_f64().unwrap(),
                    g["predicted_act_bytes"].as_f64().unwrap(),
                );
                assert!(
                    (m - p).abs() <= 0.02 * p,
                    "{dtype} {mode}: measured {m} vs predicted {p}"
                );
            }
        }
    }
}

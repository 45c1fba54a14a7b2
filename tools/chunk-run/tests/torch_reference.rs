//! chunk-run's outputs and gradients against PyTorch autograd through
//! transformers' own MixtralSparseMoeBlock / Qwen3MoeSparseMoeBlock
//! (testdata/gen/chunk_run_ref.py), for every recompute mode.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/chunk-run")
}

/// max |a − b| / max |b| over one tensor. The scale is floored at 1e-2: with
/// top-1 and renormalisation the combine weight is exactly 1, so the gate's
/// true gradient is 0 and PyTorch's is rounding noise (~3e-7).
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    ftk_test::rel_err(a, b, 1e-2)
}

fn run_case(case: &Value, mode: &str, extra: &[&str]) -> BTreeMap<String, Vec<f32>> {
    let name = case["name"].as_str().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("grads.safetensors");
    let flags: Vec<&str> = case["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    let res = ftk_test::tool("chunk-run")
        .current_dir(data())
        .args([
            "--weights",
            &format!("{name}.weights.safetensors"),
            "--input",
            &format!("{name}.input.safetensors"),
        ])
        .args(&flags)
        .args(["--recompute", mode])
        .args(extra)
        .arg("--grads-out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{name} {mode}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let rec: Value = serde_json::from_slice(&res.stdout).unwrap();
    let loss = rec["loss"].as_f64().unwrap();
    let want = case["loss"].as_f64().unwrap();
    assert!(
        (loss - want).abs() <= 1e-4 * want.abs().max(1.0),
        "{name} {mode}: loss {loss} vs {want}"
    );
    ftk_test::tensors_f32(&out)
}

#[test]
fn every_mode_matches_pytorch_autograd() {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(data().join("cases.json")).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let want = ftk_test::tensors_f32(&data().join(format!("{name}.expected.safetensors")));
        let mut by_mode = vec![];
        for (mode, extra) in [
            ("none", vec![]),
            ("full", vec![]),
            ("chunked:2", vec![]),
            ("chunked:7", vec![]),
            // MACT with a budget that fits (a budget nothing fits is a "no",
            // exit 1, tested in testdata/bad/cases.txt).
            (
                "auto",
                vec!["--device-mem", "1GiB", "--chunk-bins", "1,2,4,8,16"],
            ),
        ] {
            let got = run_case(case, mode, &extra);
            assert_eq!(
                got.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>(),
                "{name} {mode}: tensor names"
            );
            for (k, w) in &want {
                let e = rel_err(&got[k], w);
                assert!(e <= 1e-4, "{name} {mode}: {k} relative error {e:.2e}");
            }
            by_mode.push(got);
        }
        // Chunking changes memory, not math: every mode gives the same gradients.
        for other in &by_mode[1..] {
            for (k, v) in &by_mode[0] {
                assert!(
                    rel_err(&other[k], v) <= 1e-5,
                    "{name}: {k} differs between modes"
                );
            }
        }
    }
}

#[test]
fn skewed_case_is_skewed_and_counted() {
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(data().join("cases.json")).unwrap()).unwrap();
    let case = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "skewed")
        .unwrap();
    let counts: Vec<u64> = case["layer0_expert_counts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .collect();
    let max = *counts.iter().max().unwrap();
    assert!(
        max as f64 >= 0.4 * counts.iter().sum::<u64>() as f64,
        "{counts:?}"
    );
    let res = ftk_test::tool("chunk-run")
        .current_dir(data())
        .args([
            "--weights",
            "skewed.weights.safetensors",
            "--input",
            "skewed.input.safetensors",
            "--topk",
            "2",
            "--layers",
            "2",
            "--prefix",
            "layers.{l}.",
        ])
        .output()
        .unwrap();
    let rec: Value = serde_json::from_slice(&res.stdout).unwrap();
    assert!(rec["max_expert_tokens"].as_u64().unwrap() >= max);
}

#[test]
fn weights_with_a_layer_pattern_run_every_block_unless_layers_is_given() {
    // skewed.weights holds layers.0 and layers.1: without --layers both run
    // (the README's shard example must not silently stop at layer 0).
    let run = |prefix: &str, extra: &[&str]| {
        ftk_test::tool("chunk-run")
            .current_dir(data())
            .args(["--weights", "skewed.weights.safetensors"])
            .args(["--input", "skewed.input.safetensors", "--topk", "2"])
            .args(["--prefix", prefix, "--no-timing"])
            .args(extra)
            .output()
            .unwrap()
    };
    let layers_run = |extra: &[&str]| {
        let res = run("layers.{l}.", extra);
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        let rec: Value = serde_json::from_slice(&res.stdout).unwrap();
        rec["layers"].as_u64().unwrap()
    };
    assert_eq!(layers_run(&[]), 2);
    assert_eq!(layers_run(&["--layers", "1"]), 1);
    let res = run("blocks.{l}.", &[]);
    assert_eq!(res.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&res.stderr).contains("check --prefix"));
}

//! mofa-predict against hand-derived cases and the published measurements.

use assert_cmd::Command;
use serde_json::Value;
use std::path::PathBuf;

fn root(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(p)
}

fn run(args: &[&str], stdin: &str) -> (Option<i32>, Vec<Value>, String) {
    let out = Command::cargo_bin("mofa-predict")
        .unwrap()
        .current_dir(root(""))
        .args(args)
        .write_stdin(stdin)
        .output()
        .unwrap();
    let recs = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (
        out.status.code(),
        recs,
        String::from_utf8(out.stderr).unwrap(),
    )
}

const JOB: &str = r#"{"id":"g","model":{"arch":"gpt","layers":24,"hidden":2304,"heads":24,"vocab":51200,"seq":2048},"cluster":{"gpu":"A100-80GB","gpus":32},"strategy":{"tp":1,"pp":1,"mbs":1,"gbs":512,"recompute":"full","zero":0},"run":{"tokens":3e11}}"#;

#[test]
fn predicts_one_line_with_consistent_fields() {
    let (code, recs, err) = run(&[], JOB);
    assert_eq!(code, Some(0), "{err}");
    let p = &recs[0];
    assert_eq!(p["kind"], "mofa_predict");
    assert_eq!(p["id"], "g");
    let f = |k: &str| p[k].as_f64().unwrap();
    // tokens/s = gbs·s / iter_s; MFU = tflops / 312.
    assert!((f("tokens_per_s") - 512.0 * 2048.0 / f("iter_s")).abs() < 1e-6 * f("tokens_per_s"));
    assert!((f("mfu") - f("tflops_per_gpu") / 312.0).abs() < 1e-12);
    // Full recompute: hardware FLOPs are 4/3 of the layer FLOPs plus the head.
    assert!(f("hw_tflops_per_gpu") > 1.3 * f("tflops_per_gpu"));
    let b = &p["breakdown"];
    let sum: f64 = b
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((sum - f("iter_s")).abs() < 1e-9 * sum);
    // Train days: tokens / (tokens_per_s · goodput) / 86400.
    let days = 3e11 / f("tokens_per_s") / p["ft"]["goodput"].as_f64().unwrap() / 86400.0;
    assert!((f("train_days") - days).abs() < 1e-9 * days);
}

#[test]
fn bad_input_is_one_line_exit_2() {
    for (input, want) in [
        ("{\"id\":1,", "<stdin>: line 1: malformed JSON"),
        (
            &JOB.replace("\"tp\":1", "\"tp\":0"),
            "<stdin>: line 1: strategy.tp: must be a positive integer, got 0",
        ),
        (&JOB.replace("\"gpus\":32", "\"gpus\":0"), ""),
        (
            &JOB.replace("\"hidden\":2304", "\"hidden\":NaN"),
            "malformed JSON",
        ),
        (
            &format!("{JOB}\n{}", JOB.replace("\"vocab\":51200,", "")),
            "<stdin>: line 2: model.vocab: missing",
        ),
        (
            &JOB.replace("\"gbs\":512", "\"gbs\":100"),
            "strategy.gbs: must be a multiple of mbs·dp = 32",
        ),
    ] {
        let (code, _, err) = run(&[], input);
        if want.is_empty() {
            // gpus 0 = derive from the strategy; fine.
            assert_eq!(code, Some(0), "{err}");
            continue;
        }
        assert_eq!(code, Some(2), "{input}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(want), "{err}");
    }
    let (code, _, err) = run(
        &[
            "--cluster",
            "H100",
            "--gpus",
            "0",
            "--strategy",
            "tp=1",
            "--model",
            "testdata/configs/llama-3-8b/config.json",
            "--seq",
            "4096",
        ],
        "",
    );
    assert_eq!(code, Some(2), "{err}");
}

#[test]
fn flags_mode_with_hf_config_and_table() {
    let (code, recs, err) = run(
        &[
            "--model",
            "testdata/configs/mixtral-8x7b/config.json",
            "--seq",
            "4096",
            "--cluster",
            "H100",
            "--gpus",
            "64",
            "--strategy",
            "tp=2,pp=4,ep=8,mbs=1,gbs=256",
            "--tokens",
            "1e12",
        ],
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    let p = &recs[0];
    assert!(p["breakdown"]["ep_comm_s"].as_f64().unwrap() > 0.0);
    assert!(
        (p["params_b"].as_f64().unwrap() - 46.7).abs() < 0.2,
        "{}",
        p["params_b"]
    );
    let out = Command::cargo_bin("mofa-predict")
        .unwrap()
        .current_dir(root(""))
        .args(["--table"])
        .write_stdin(JOB)
        .output()
        .unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    assert!(s.contains("bottleneck") && s.contains("pp_bubble"), "{s}");
}

#[test]
fn calibration_rows_meet_their_errors() {
    let (code, recs, err) = run(&["calibrate"], "");
    assert_eq!(code, Some(0), "{err}");
    let s = recs.last().unwrap();
    assert_eq!(s["kind"], "mofa_calibrate");
    assert_eq!(s["n_calib"], 6);
    assert_eq!(s["n_valid"], 26);
    // Fitted constants reproduce the calibration rows closely, the validation
    // rows clearly better than a constant-MFU model; both numbers are the
    // ones reported in the README (checked here so they cannot drift).
    assert!(s["mape_calib"].as_f64().unwrap() < 3.0, "{s}");
    let v = s["mape_valid"].as_f64().unwrap();
    assert!(v < 9.0, "{s}");
    assert!(s["baseline_constant_mfu_mape_valid"].as_f64().unwrap() > 2.0 * v);
    // Every run that was actually trained must fit in memory, except 1T
    // under selective recompute (see README: our activation model).
    for r in recs.iter().filter(|r| r["kind"] == "mofa_calib_row") {
        if r["split"] == "calib" {
            assert!(r["ape"].as_f64().unwrap() < 15.0, "{r}");
            assert_eq!(r["fits"], true, "{r}");
        }
    }
}

#[test]
fn tune_ranks_fitting_strategies() {
    let (code, recs, err) = run(
        &[
            "tune",
            "--model",
            "testdata/configs/llama-3-8b/config.json",
            "--seq",
            "8192",
            "--cluster",
            "H100",
            "--gpus",
            "64",
            "--gbs",
            "256",
            "--top",
            "5",
        ],
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    let sum = recs.last().unwrap();
    assert_eq!(sum["kind"], "mofa_tune_summary");
    assert!(sum["candidates"].as_u64().unwrap() > 100);
    let ranked: Vec<&Value> = recs.iter().filter(|r| r["kind"] == "mofa_tune").collect();
    assert_eq!(ranked.len(), 5);
    let key = |r: &Value| {
        1.0 / (r["tokens_per_s"].as_f64().unwrap() * r["ft"]["goodput"].as_f64().unwrap())
    };
    for w in ranked.windows(2) {
        assert!(key(w[0]) <= key(w[1]));
    }
    assert!(ranked
        .iter()
        .all(|r| r["fits"] == true && r["bottleneck"].is_string()));
}

/// Llama-3-70B (the published config) on 1024 H100s with a Megatron-style
/// strategy. Meta reports 380-430 model TFLOP/s per GPU (38-43% BF16 MFU)
/// for Llama 3 405B on 8,192-16,384 H100s (Dubey et al. 2024, Table 4).
/// That is a different model and scale, so this is a sanity band, not a
/// fit: a 70B run on 1024 GPUs has a smaller hidden size (relatively more
/// TP traffic) but far less data-parallel traffic and a smaller bubble, so
/// it should land near that range, not at half or at 1.5x of it.
#[test]
fn llama3_70b_on_1024_h100_is_in_llama3s_band() {
    let (code, recs, err) = run(
        &[
            "--model",
            "testdata/configs/llama-3-70b/config.json",
            "--seq",
            "8192",
            "--cluster",
            "H100",
            "--gpus",
            "1024",
            "--strategy",
            "tp=8,pp=4,vpp=2,mbs=1,gbs=1024,recompute=selective,zero=1",
            "--tokens",
            "15e12",
        ],
        "",
    );
    assert_eq!(code, Some(0), "{err}");
    let p = &recs[0];
    let f = |k: &str| p[k].as_f64().unwrap();
    // The config gives the published 70.6B parameters.
    assert!((f("params_b") - 70.6).abs() < 0.1, "{p}");
    assert_eq!(p["fits"], true, "{p}");
    let tf = f("tflops_per_gpu");
    assert!(
        (0.8 * 380.0..=1.1 * 430.0).contains(&tf),
        "{tf} TFLOP/s is outside the sanity band around Llama 3's 380-430"
    );
    assert!((f("mfu") - tf / 989.0).abs() < 1e-12);
    // 15T tokens at this rate: months, not days or years.
    assert!((60.0..400.0).contains(&f("train_days")), "{p}");
}

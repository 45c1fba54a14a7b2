//! mem-plan against published numbers (MemFine Table 4, Korthikanti et al.'s
//! formulas, mixed-precision Adam's 16 bytes per parameter) and properties of
//! MACT's choice that would fail if a term were wrong.

use assert_cmd::Command;
use serde_json::Value;
use std::path::PathBuf;

fn testdata(p: &str) -> PathBuf {
    ftk_test::testdata(p)
}

fn config(name: &str) -> String {
    testdata(&format!("configs/{name}/config.json"))
        .display()
        .to_string()
}

fn run(args: &[&str]) -> (Option<i32>, Vec<Value>, String) {
    ftk_test::run_any(ftk_test::tool("mem-plan").args(args).arg("--uniform"))
}

fn summary(recs: &[Value]) -> &Value {
    let s = recs.last().unwrap();
    assert_eq!(s["kind"], "mem_plan_summary");
    s
}

fn u(v: &Value) -> f64 {
    v.as_f64().unwrap()
}

/// MemFine Table 4, Model II (DeepSeek-V3 shape, 8 layers, t = c = b = 1,
/// s = 4096, BF16): active memory 22.9 GB under full recompute, 11.9 GB at
/// C = 2 (MACT), 3.7 GB at C = 8. The model is linear in s', so two runs give
/// its intercept and slope; the printed values then bound s' to an interval.
/// With a wrong term (say h_d = 128) the interval is empty.
#[test]
fn reproduces_memfine_table4_activation_column() {
    let m2 = testdata("mem-plan/memfine-model2.json")
        .display()
        .to_string();
    let act = |s_recv: f64, c: u64| -> f64 {
        let (code, recs, err) = run(&[
            "--model",
            &m2,
            "--ep",
            "32",
            "--dp",
            "32",
            "--tokens-received",
            &s_recv.to_string(),
            "--chunks",
            &c.to_string(),
        ]);
        assert_eq!(code, Some(0), "{err}");
        let r = &recs[0];
        assert_eq!(r["kind"], "mem_plan");
        assert_eq!(u(&r["act_bytes"]["full"]), u(&recs[0]["act_bytes"]["full"]));
        u(&r["act_bytes"]["chunked"])
    };
    let seq = act(0.0, 1);
    let per = (act(1e6, 1) - seq) / 1e6;
    // 0.8997 GB is the s-term the reference notes derive from Table 2.
    assert!((seq / 1e9 - 0.8997).abs() < 1e-4, "s-term {seq}");
    // s' range that makes each printed value round correctly (GB = 1e9 bytes).
    let mut lo: f64 = 0.0;
    let mut hi = f64::INFINITY;
    for (c, printed) in [(1.0, 22.9), (2.0, 11.9), (8.0, 3.7)] {
        lo = lo.max(((printed - 0.05) * 1e9 - seq) * c / per);
        hi = hi.min(((printed + 0.05) * 1e9 - seq) * c / per);
    }
    assert!(lo < hi, "no s' reproduces Table 4: [{lo}, {hi})");
    let mid = ((lo + hi) / 2.0).round();
    for (c, printed) in [(1, 22.9), (2, 11.9), (8, 3.7)] {
        let gb = act(mid, c) / 1e9;
        assert_eq!((gb * 10.0).round() / 10.0, printed, "C={c} at s'={mid}");
    }
    // The paper's reductions follow: 83.84% at C = 8 and 48.03% at C = 2 (from the rounded values).
    assert_eq!(((22.9f64 - 3.7) / 22.9 * 1e4).round() / 100.0, 83.84);
    // And the implied s' is about 8 local experts × 75k tokens (reference notes: ≈ 5.97e5).
    assert!((mid - 5.97e5).abs() < 2e3, "{mid}");
}

/// Korthikanti et al. 2022, Table 2: per-layer activations sbh(34 + 5as/h),
/// sbh(10 + 24/t + 5as/(ht)) with TP, sbh(34/t + 5as/(ht)) with TP + SP.
/// With pp = 1 one micro-batch is in flight, so "peak none" minus static is
/// exactly layers × that.
#[test]
fn dense_layers_follow_korthikanti() {
    let (s, h, a, layers) = (1024.0, 768.0, 12.0, 12.0);
    let sbh = s * h;
    for (tp, sp, per_layer) in [
        (1, false, sbh * (34.0 + 5.0 * a * s / h)),
        (
            2,
            false,
            sbh * (10.0 + 24.0 / 2.0 + 5.0 * a * s / (h * 2.0)),
        ),
        (4, true, sbh * (34.0 / 4.0 + 5.0 * a * s / (h * 4.0))),
    ] {
        let tps = tp.to_string();
        let mut args = vec![
            "--model",
            &*Box::leak(config("gpt2").into_boxed_str()),
            "--seq",
            "1024",
            "--tp",
            &tps,
            "--dense-act",
            "korthikanti",
        ];
        if sp {
            args.push("--sequence-parallel");
        }
        let (code, recs, err) = run(&args);
        assert_eq!(code, Some(0), "{err}");
        let st = &summary(&recs)["stages"][0];
        let act = u(&st["peak_bytes"]["none"]) - u(&st["static_bytes"]);
        assert!(
            (act - layers * per_layer).abs() <= 2.0,
            "tp={tp} sp={sp}: {act} vs {}",
            layers * per_layer
        );
    }
}

/// Static memory is mixed-precision Adam's 16 bytes per parameter (2 for
/// weights, 2 for grads, 12 for fp32 master/m/v), with ZeRO-1 dividing the 12
/// over DP and experts spread over EP.
#[test]
fn static_memory_is_mixed_precision_adam() {
    let mix = config("mixtral-8x7b");
    let static_of = |extra: &[&str]| {
        let mut args = vec!["--model", mix.as_str()];
        args.extend_from_slice(extra);
        let (code, recs, err) = run(&args);
        assert_eq!(code, Some(0), "{err}");
        (
            u(&summary(&recs)["stages"][0]["static_bytes"]),
            u(&summary(&recs)["params"]),
        )
    };
    let (st, params) = static_of(&[]);
    assert_eq!(params, 46_702_792_704.0);
    assert!((st - 16.0 * params).abs() <= 1.0, "{st}");
    let (st, _) = static_of(&["--grad-fp32"]);
    assert!((st - 18.0 * params).abs() <= 1.0);
    let (st, _) = static_of(&["--zero", "1", "--dp", "8"]);
    assert!((st - (4.0 + 12.0 / 8.0) * params).abs() <= 1.0);
    // EP 8 over DP 8: each GPU keeps 1 of the 8 experts of every layer.
    let experts = 32.0 * 8.0 * 3.0 * 4096.0 * 14336.0;
    let (st, _) = static_of(&["--ep", "8", "--dp", "8"]);
    assert!((st - 16.0 * (params - experts + experts / 8.0)).abs() <= 1.0);
    // The per-layer shares add up to the GPU's static memory, less the
    // embedding and the output head (+ final norm).
    let (_, recs, _) = run(&["--model", mix.as_str(), "--ep", "8", "--dp", "8"]);
    let layers: f64 = recs
        .iter()
        .filter(|r| r["kind"] == "mem_plan" && r["rank"] == 0)
        .map(|r| u(&r["layer_static_bytes"]))
        .sum();
    let outside = 16.0 * (2.0 * 32000.0 * 4096.0 + 4096.0);
    assert!(
        (layers + outside - st).abs() <= 32.0,
        "{layers} + {outside} vs {st}"
    );
}

#[test]
fn pipeline_stages_hold_the_papers_in_flight_count() {
    let (code, recs, err) = run(&["--model", &config("mixtral-8x7b"), "--pp", "4"]);
    assert_eq!(code, Some(0), "{err}");
    let m_g: Vec<u64> = summary(&recs)["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["m_g"].as_u64().unwrap())
        .collect();
    assert_eq!(m_g, vec![7, 5, 3, 1]);
    // none-recompute activations shrink with m_g; full recompute does not depend on it
    let st = summary(&recs)["stages"].as_array().unwrap();
    assert!(u(&st[0]["peak_bytes"]["none"]) > u(&st[1]["peak_bytes"]["none"]));
}

/// MACT: C is the smallest bin >= ceil(s'/s'_max), where s'_max is the stage's
/// eq. (8) value; the peak at that C fits and at the bin below does not.
#[test]
fn mact_picks_the_smallest_bin_that_fits() {
    let q = config("qwen3-30b-a3b");
    let base = [
        "--model",
        q.as_str(),
        "--ep",
        "16",
        "--dp",
        "16",
        "--tp",
        "2",
        "--pp",
        "2",
        "--zero",
        "1",
        "--seq",
        "8192",
        "--device-mem",
        "40GB",
    ];
    let mut seen = std::collections::BTreeSet::new();
    let mut probe = base.to_vec();
    probe.extend(["--tokens-received", "0"]);
    let s_max0 = u(&summary(&run(&probe).1)["stages"][0]["s_max"]);
    assert!(s_max0 > 1e5, "{s_max0}");
    for f in [0.5, 1.5, 3.0, 6.0, 12.0] {
        let s_recv = (f * s_max0).round();
        let mut args = base.to_vec();
        let sr = s_recv.to_string();
        args.extend(["--tokens-received", sr.as_str()]);
        let (code, recs, err) = run(&args);
        let s = summary(&recs);
        let budget = u(&s["budget_bytes"]);
        assert_eq!(budget, (40e9f64 * 0.9).floor());
        for st in s["stages"].as_array().unwrap() {
            let s_max = u(&st["s_max"]);
            let c_need = (s_recv / s_max).ceil();
            let chunks = st["chunks"].as_u64().unwrap();
            match [1u64, 2, 4, 8].into_iter().find(|&b| b as f64 >= c_need) {
                Some(b) => {
                    assert_eq!(chunks, b, "s'={s_recv}");
                    assert_eq!(st["fits"], true);
                    seen.insert(b);
                }
                None => {
                    assert_eq!(st["fits"], false);
                    assert_eq!(code, Some(1));
                    assert!(
                        err.contains("does not fit") && err.contains("smallest peak"),
                        "{err}"
                    );
                    seen.insert(0);
                }
            }
        }
        // records agree with the chunked formula: act = seq + (full - seq) / C
        for r in recs.iter().filter(|r| r["kind"] == "mem_plan") {
            let c = u(&r["chunks"]);
            let (full, ch) = (u(&r["act_bytes"]["full"]), u(&r["act_bytes"]["chunked"]));
            let seq = full - (full - ch) * c / (c - 1.0).max(1e-9);
            if c > 1.0 {
                assert!(seq > 0.0 && seq < ch, "{r}");
            } else {
                assert_eq!(full, ch);
            }
            let peak = u(&r["static_bytes"]) + u(&r["ckpt_bytes"]) + ch;
            assert!((peak - u(&r["peak_bytes"])).abs() <= 2.0);
        }
    }
    assert!(
        seen.len() >= 4,
        "the sweep should exercise several bins and a failure: {seen:?}"
    );
}

#[test]
fn histograms_set_tokens_received() {
    let mix = config("mixtral-8x7b");
    let hist = Command::cargo_bin("route-hist").ok();
    // route-hist is a sibling crate; build the histogram with it when present,
    // else from a hand-written record.
    let text = match hist {
        Some(mut c) => {
            let out = c
                .args([
                    "--synthetic",
                    "hot:0.5",
                    "--model",
                    &mix,
                    "--tokens",
                    "4096",
                    "--layers",
                    "2",
                    "--ep",
                    "4",
                    "--seed",
                    "3",
                ])
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap()
        }
        None => String::new(),
    };
    let text = if text.is_empty() {
        r#"{"kind":"route_hist","layer":0,"step":0,"experts":8,"topk":2,"tokens":4096,"counts":[4096,2048,512,512,256,256,256,256],"ep":1,"rank_counts":[8192],"max_vio":3.0,"a2a":[[8192]]}"#.to_string()
    } else {
        text
    };
    let out = ftk_test::output_ok(
        ftk_test::tool("mem-plan")
            .args([
                "--model", &mix, "--hist", "-", "--ep", "8", "--dp", "8", "--seq", "2048",
            ])
            .write_stdin(text),
        "mem-plan",
    );
    let recs: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let s = summary(&recs);
    assert_eq!(s["routing"], "histograms");
    // A measured layer's copies add up to ep·b·s·k whatever the skew; the
    // layers without a histogram take the worst rank-wise, so they hold more.
    let total = |layer: u64| -> f64 {
        recs.iter()
            .filter(|r| r["kind"] == "mem_plan" && r["layer"] == layer)
            .map(|r| u(&r["tokens_received"]))
            .sum()
    };
    let measured = s["hist_layers"].as_u64().unwrap();
    assert!(measured >= 1);
    for layer in 0..32u64 {
        if layer < measured {
            assert!(
                (total(layer) - 8.0 * 2048.0 * 2.0).abs() <= 8.0,
                "layer {layer}: {}",
                total(layer)
            );
        } else {
            assert!(total(layer) >= 8.0 * 2048.0 * 2.0 - 8.0);
        }
    }
    let max = recs
        .iter()
        .filter(|r| r["kind"] == "mem_plan")
        .map(|r| u(&r["tokens_received"]))
        .fold(0.0, f64::max);
    assert!(
        max > 1.5 * 2048.0 * 2.0,
        "a hot expert should load one rank well above uniform: {max}"
    );
    // Uniform routing: b·s·k per rank.
    let (_, recs, _) = run(&["--model", &mix, "--ep", "8", "--dp", "8", "--seq", "2048"]);
    assert!(recs
        .iter()
        .filter(|r| r["kind"] == "mem_plan")
        .all(|r| u(&r["tokens_received"]) == 4096.0));
}

#[test]
fn bad_input_exits_2_with_one_line_and_no_output() {
    let mix = config("mixtral-8x7b");
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "{\"hidden_size\": 4096,").unwrap();
    let cases: Vec<(Vec<String>, Option<&str>, &str)> = vec![
        (
            vec!["--model".into(), mix.clone()],
            Some("{\"kind\":\"route_hist\",\n"),
            "<stdin>: line 1",
        ),
        (
            vec!["--model".into(), mix.clone()],
            Some(
                r#"{"kind":"route_hist","layer":0,"step":0,"experts":4,"topk":2,"tokens":1,"counts":[1,1,0,0],"ep":1,"rank_counts":[2],"max_vio":1.0,"a2a":[[2]]}"#,
            ),
            "experts",
        ),
        (
            vec!["--model".into(), mix.clone()],
            Some(
                r#"{"kind":"route_hist","layer":0,"step":0,"experts":8,"topk":2,"tokens":1,"counts":[1,1,1,0,0,0,0,0],"ep":1,"rank_counts":[3],"max_vio":3.0,"a2a":[[3]]}"#,
            ),
            "counts",
        ),
        (
            vec!["--model".into(), mix.clone()],
            Some(r#"{"kind":"route_hist","layer":0,"step":0,"experts":8}"#),
            "missing field `topk`",
        ),
        (
            vec!["--model".into(), "/nonexistent/config.json".into()],
            None,
            "/nonexistent/config.json",
        ),
        (
            vec!["--model".into(), broken.display().to_string()],
            None,
            "broken.json",
        ),
        (
            vec!["--model".into(), mix.clone(), "--ep".into(), "3".into()],
            None,
            "--ep 3",
        ),
        (
            vec!["--model".into(), mix.clone(), "--ep".into(), "8".into()],
            None,
            "--dp",
        ),
        (
            vec![
                "--model".into(),
                mix.clone(),
                "--device-mem".into(),
                "24XB".into(),
            ],
            None,
            "24XB",
        ),
        (
            vec![
                "--model".into(),
                mix.clone(),
                "--alpha".into(),
                "1.5".into(),
            ],
            None,
            "--alpha",
        ),
        (
            vec![
                "--model".into(),
                mix.clone(),
                "--chunk-bins".into(),
                "4,2".into(),
            ],
            None,
            "--chunk-bins",
        ),
    ];
    for (args, stdin, needle) in cases {
        let mut c = ftk_test::tool("mem-plan");
        c.args(&args);
        match stdin {
            Some(s) => c.args(["--hist", "-"]).write_stdin(s),
            None => c.arg("--uniform"),
        };
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
        // clap adds a "For more information, try --help" line to usage errors.
        assert!(
            err.lines().filter(|l| !l.trim().is_empty()).count() <= 2 && err.contains(needle),
            "{args:?}: {err}"
        );
        assert!(!err.contains("panicked"));
    }
}

#[test]
fn help_documents_the_records() {
    let h = ftk_test::help("mem-plan", &[]);
    ftk_test::assert_documented::<ftk::records::MemPlan>(&h);
    ftk_test::assert_documented::<ftk::records::MemPlanSummary>(&h);
}

#[test]
fn histograms_with_a_corrupt_count_list_say_so() {
    // 3 counts for 8 experts: the record contradicts itself, which is not
    // "the model has another expert count".
    let dir = tempfile::tempdir().unwrap();
    let h = dir.path().join("h.jsonl");
    std::fs::write(
        &h,
        r#"{"kind":"route_hist","layer":0,"step":0,"experts":8,"topk":2,"tokens":4,"counts":[4,2,2],"ep":1,"rank_counts":[8],"max_vio":1.0,"a2a":[[8]]}"#,
    )
    .unwrap();
    let out = ftk_test::tool("mem-plan")
        .args(["--model", &config("mixtral-8x7b"), "--hist"])
        .arg(&h)
        .output()
        .unwrap();
    ftk_test::assert_error(
        "mem-plan",
        &out,
        2,
        &["h.jsonl: line 1", "3 entries", "'experts' is 8"],
    );
}

//! `--flower-api message` (Flower's Message-API strategies) and fractional
//! client weights. The live comparison with Flower itself is python/tests
//! (`make test-python`); these check the properties that define the variants.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// The 9 clients of m_r1_9.jsonl with the given weights (any JSON number).
fn manifest(dir: &Path, name: &str, n: usize, weight: impl Fn(usize) -> String) -> PathBuf {
    let m = std::fs::read_to_string(data().join("m_r1_9.jsonl")).unwrap();
    let s: String = m
        .lines()
        .take(n)
        .enumerate()
        .map(|(i, l)| {
            let v: Value = serde_json::from_str(l).unwrap();
            format!(
                "{{\"kind\":\"client_update\",\"cid\":\"{}\",\"path\":\"{}\",\"num_examples\":{}}}\n",
                v["cid"].as_str().unwrap(),
                data().join(v["path"].as_str().unwrap()).display(),
                weight(i)
            )
        })
        .collect();
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn fractional_weights_give_the_weighted_mean() {
    let t = tempfile::tempdir().unwrap();
    let w = |i: usize| 0.25 + 1.5 * i as f64;
    let m = manifest(t.path(), "frac.jsonl", 9, |i| format!("{}", w(i)));
    let out = t.path().join("out.safetensors");
    run_ok(&["--strategy", "fedavg", "-o", s(&out), s(&m)]);
    // The mean computed here from the client files themselves.
    let rows: Vec<Value> = std::fs::read_to_string(data().join("m_r1_9.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let clients: Vec<_> = rows
        .iter()
        .map(|v| load(&data().join(v["path"].as_str().unwrap())))
        .collect();
    let total: f64 = (0..9).map(w).sum();
    let got = load(&out);
    for (name, (_, g)) in &got {
        for (k, gv) in g.iter().enumerate() {
            let want: f64 = (0..9).map(|i| w(i) * clients[i][name].1[k]).sum::<f64>() / total;
            assert!(
                (gv - want).abs() <= 1e-6 * want.abs().max(1e-3),
                "{name}[{k}]: {gv} vs {want}"
            );
        }
    }
    let bad = manifest(t.path(), "neg.jsonl", 2, |_| "-1.5".to_string());
    let o = cmd()
        .args(["--strategy", "fedavg", "-o", s(&out), s(&bad)])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("non-negative number"), "{err}");
}

#[test]
fn message_api_fedadam_is_legacy_with_tau_1e_3() {
    let t = tempfile::tempdir().unwrap();
    let m = manifest(t.path(), "m.jsonl", 5, |i| format!("{}", 100 + 37 * i));
    let g = data().join("global0.safetensors");
    let run = |name: &str, extra: &[&str]| -> (PathBuf, Value) {
        let out = t.path().join(format!("{name}.safetensors"));
        let st = t.path().join(format!("{name}.state.safetensors"));
        let mut args = vec!["--strategy", "fedadam", "--global", s(&g)];
        args.extend_from_slice(&["--state", s(&st), "--init-state", "-o", s(&out)]);
        args.extend_from_slice(extra);
        args.push(s(&m));
        let v = run_ok(&args);
        (out, v)
    };
    let (msg, v) = run("msg", &["--flower-api", "message"]);
    assert_eq!(v["flower_api"], "message");
    let (tau3, v3) = run("tau3", &["--tau", "1e-3"]);
    assert!(v3.get("flower_api").is_none());
    let (legacy, _) = run("legacy", &[]);
    assert_eq!(
        std::fs::read(&msg).unwrap(),
        std::fs::read(&tau3).unwrap(),
        "message API == legacy with tau 1e-3"
    );
    assert_ne!(
        std::fs::read(&msg).unwrap(),
        std::fs::read(&legacy).unwrap(),
        "tau 1e-9 must change the step"
    );
}

#[test]
fn message_api_bulyan_selects_the_multikrum_set_of_one_pass() {
    let t = tempfile::tempdir().unwrap();
    let m = manifest(t.path(), "m7.jsonl", 7, |i| format!("{}", 10 + i));
    let out = t.path().join("o.safetensors");
    let f = "1";
    let bul = run_ok(&[
        "--strategy",
        "bulyan",
        "--flower-api",
        "message",
        "--num-malicious",
        f,
        "-o",
        s(&out),
        s(&m),
    ]);
    // select_multikrum(n - 2f) is MultiKrum's selection with K = n - 2f.
    let mk = run_ok(&[
        "--strategy",
        "multikrum",
        "--num-malicious",
        f,
        "--to-keep",
        "5",
        "-o",
        s(&t.path().join("mk.safetensors")),
        s(&m),
    ]);
    let set = |v: &Value| -> Vec<String> {
        let mut s: Vec<String> = v["selected"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect();
        s.sort();
        s
    };
    assert_eq!(set(&bul), set(&mk));
    assert_eq!(set(&bul).len(), 5);
}

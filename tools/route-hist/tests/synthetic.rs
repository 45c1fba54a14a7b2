//! Properties of --synthetic routing that would fail if the sampler were wrong.

use serde_json::Value;

fn run(args: &[&str]) -> Vec<Value> {
    ftk_test::run_ok(
        ftk_test::tool("route-hist").args(args),
        &format!("{args:?}"),
    )
}

fn u(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let args = [
        "--synthetic",
        "zipf:1.1",
        "--tokens",
        "5000",
        "--experts",
        "16",
        "--topk",
        "2",
        "--layers",
        "3",
        "--ep",
        "4",
    ];
    let run = |seed: &str, threads: Option<&str>| {
        let mut c = ftk_test::tool("route-hist");
        if let Some(t) = threads {
            c.env("RAYON_NUM_THREADS", t);
        }
        c.args(args).args(["--seed", seed]).output().unwrap().stdout
    };
    let a = run("7", None);
    assert_eq!(a, run("7", None));
    assert_ne!(a, run("8", None));
    // Thread count must not change the bytes.
    assert_eq!(a, run("7", Some("1")));
}

#[test]
fn totals_are_consistent() {
    for skew in ["uniform", "zipf:1.5", "dirichlet:0.3", "hot:0.7"] {
        let recs = run(&[
            "--synthetic",
            skew,
            "--tokens",
            "3001",
            "--experts",
            "32",
            "--topk",
            "4",
            "--layers",
            "2",
            "--steps",
            "2",
            "--ep",
            "8",
            "--capacity-factor",
            "1.0",
        ]);
        assert_eq!(recs.len(), 4);
        for r in &recs {
            let counts = u(&r["counts"]);
            assert_eq!(counts.iter().sum::<u64>(), 3001 * 4, "{skew}");
            let rc = u(&r["rank_counts"]);
            for (i, c) in rc.iter().enumerate() {
                assert_eq!(*c, counts[i * 4..i * 4 + 4].iter().sum::<u64>());
            }
            // every source rank sends k copies of each of its tokens
            let a2a: Vec<Vec<u64>> = r["a2a"].as_array().unwrap().iter().map(u).collect();
            for (src, row) in a2a.iter().enumerate() {
                let n = (src as u64 + 1) * 3001 / 8 - src as u64 * 3001 / 8;
                assert_eq!(row.iter().sum::<u64>(), 4 * n);
            }
            for dst in 0..8 {
                assert_eq!(a2a.iter().map(|row| row[dst]).sum::<u64>(), rc[dst]);
            }
            // no expert can take a token twice: at most one copy per token
            assert!(counts.iter().all(|&c| c <= 3001), "{skew}");
            assert!(r["dropped"].as_u64().unwrap() <= 3001 * 4);
        }
    }
}

#[test]
fn uniform_passes_chi_square() {
    let r = &run(&[
        "--synthetic",
        "uniform",
        "--tokens",
        "200000",
        "--experts",
        "64",
        "--topk",
        "8",
        "--seed",
        "3",
    ])[0];
    let counts = u(&r["counts"]);
    let mean = 200000.0 * 8.0 / 64.0;
    let chi2: f64 = counts
        .iter()
        .map(|&c| (c as f64 - mean).powi(2) / mean)
        .sum();
    // 63 degrees of freedom: the 99.9th percentile is ~103.4. Sampling without
    // replacement has slightly lower variance, so this bound is conservative.
    assert!(chi2 < 103.4, "chi2 {chi2}");
    assert!(r["max_vio"].as_f64().unwrap() < 0.05);
}

#[test]
fn hot_expert_gets_its_fraction() {
    let r = &run(&[
        "--synthetic",
        "hot:0.3",
        "--tokens",
        "100000",
        "--experts",
        "16",
        "--topk",
        "2",
        "--seed",
        "1",
    ])[0];
    let counts = u(&r["counts"]);
    let max = *counts.iter().max().unwrap() as f64;
    // Binomial(100000, 0.3): sd ~ 145; 5 sd tolerance.
    assert!((max - 30000.0).abs() < 725.0, "hot count {max}");
    // the others share the remaining 170000 copies uniformly
    let rest: Vec<f64> = counts
        .iter()
        .map(|&c| c as f64)
        .filter(|&c| c != max)
        .collect();
    let m = rest.iter().sum::<f64>() / rest.len() as f64;
    assert!((m - 170000.0 / 15.0).abs() < 200.0, "{m}");
}

#[test]
fn zipf_ratio_follows_the_exponent() {
    // top-1 routing makes inclusion probability equal p: count(rank1)/count(rank2) ~ 2^s
    let r = &run(&[
        "--synthetic",
        "zipf:1.0",
        "--tokens",
        "400000",
        "--experts",
        "8",
        "--topk",
        "1",
        "--seed",
        "5",
    ])[0];
    let mut c: Vec<f64> = u(&r["counts"]).into_iter().map(|x| x as f64).collect();
    c.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let h8: f64 = (1..=8).map(|i| 1.0 / i as f64).sum();
    for (i, ci) in c.iter().enumerate() {
        let want = 400000.0 / ((i + 1) as f64 * h8);
        assert!(
            (ci - want).abs() < 5.0 * want.sqrt() + 1.0,
            "rank {i}: {ci} vs {want}"
        );
    }
}

#[test]
fn dirichlet_concentration_controls_skew() {
    let vio = |a: &str| {
        let recs = run(&[
            "--synthetic",
            &format!("dirichlet:{a}"),
            "--tokens",
            "20000",
            "--experts",
            "64",
            "--topk",
            "2",
            "--layers",
            "8",
        ]);
        recs.iter()
            .map(|r| r["max_vio"].as_f64().unwrap())
            .sum::<f64>()
            / recs.len() as f64
    };
    let (sharp, flat) = (vio("0.2"), vio("50"));
    assert!(sharp > 2.0 && flat < 0.5, "sharp {sharp} flat {flat}");
}

#[test]
fn bad_synthetic_flags_exit_2() {
    // (flags replacing the defaults below, a needle of the one-line error;
    // "" for flag values clap itself refuses, whose message is clap's)
    let cases: [(&[&str], &str); 6] = [
        (&["--synthetic", "zipf:x"], ""),
        (&["--topk", ""], "--topk"),
        (&["--topk", "9"], "--topk 9"),
        (&["--tokens", "0"], "--tokens"),
        (&["--ep", "3"], "--ep 3"),
        (&["--capacity-factor", "-1"], ""),
    ];
    for (change, needle) in cases {
        let mut args = vec![
            "--synthetic",
            "uniform",
            "--tokens",
            "10",
            "--experts",
            "8",
            "--topk",
            "2",
        ];
        match args.iter().position(|a| *a == change[0]) {
            // an empty value drops the flag
            Some(i) if change[1].is_empty() => drop(args.drain(i..i + 2)),
            Some(i) => args[i + 1] = change[1],
            None => args.extend(change),
        }
        let out = ftk_test::tool("route-hist").args(&args).output().unwrap();
        if needle.is_empty() {
            assert_eq!(out.status.code(), Some(2), "{args:?}");
            assert!(out.stdout.is_empty(), "{args:?}");
        } else {
            ftk_test::assert_error("route-hist", &out, 2, &[needle]);
        }
    }
}

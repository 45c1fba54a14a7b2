//! testdata/bad/cases.txt: every case exits as written, with one line on
//! stderr naming the tool, no panic, and nothing created, changed or removed
//! in its directory.

use ftk_checks::{path_env, snapshot, temps_in, testdata};
use std::process::Command;

struct Case {
    name: String,
    setup: Vec<String>,
    run: String,
    exit: i32,
    expect: Vec<String>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(testdata().join("bad/cases.txt")).unwrap();
    let mut out: Vec<Case> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (key, val) = line.split_once(": ").unwrap_or((line, ""));
        if key == "case" {
            out.push(Case {
                name: val.into(),
                setup: vec![],
                run: String::new(),
                exit: -1,
                expect: vec![],
            });
            continue;
        }
        let c = out.last_mut().expect("a 'case:' line first");
        match key {
            "setup" => c.setup.push(val.into()),
            "run" => c.run = val.into(),
            "exit" => c.exit = val.parse().unwrap(),
            "expect" => c.expect.push(val.into()),
            other => panic!("cases.txt: unknown key '{other}'"),
        }
    }
    out
}

fn sh(dir: &std::path::Path, script: &str) -> std::process::Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .current_dir(dir)
        .env("PATH", path_env())
        .env("T", testdata())
        .env("D", dir)
        .env("FTK_NO_PROGRESS", "1")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap()
}

#[test]
fn every_bad_case_is_refused_cleanly() {
    let all = cases();
    assert!(all.len() >= 30, "only {} cases", all.len());
    let mut failures = Vec::new();
    for c in &all {
        let dir = tempfile::tempdir().unwrap();
        for s in &c.setup {
            let o = sh(dir.path(), s);
            assert!(
                o.status.success(),
                "{}: setup failed: {s}\n{}",
                c.name,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let before = snapshot(dir.path());
        let o = sh(dir.path(), &c.run);
        let after = snapshot(dir.path());
        let err = String::from_utf8_lossy(&o.stderr);
        let tool = c.run.split_whitespace().next().unwrap();
        let mut why = Vec::new();
        if o.status.code() != Some(c.exit) {
            why.push(format!("exit {:?}, expected {}", o.status.code(), c.exit));
        }
        let lines: Vec<&str> = err.lines().collect();
        if lines.len() != 1 {
            why.push(format!("{} lines on stderr", lines.len()));
        }
        let prefix = if c.exit == 2 {
            format!("{tool}: error: ")
        } else {
            format!("{tool}: ")
        };
        if !err.starts_with(&prefix) {
            why.push(format!("stderr does not start with '{prefix}'"));
        }
        if err.contains("panicked") || err.contains("internal error") {
            why.push("a panic".into());
        }
        for e in &c.expect {
            if !err.contains(e.as_str()) {
                why.push(format!("message lacks '{e}'"));
            }
        }
        if c.exit == 2 && !o.stdout.is_empty() {
            why.push("output on stdout".into());
        }
        if before != after {
            let changed: Vec<_> = after
                .iter()
                .filter(|(k, v)| before.get(*k) != Some(v))
                .map(|(k, _)| k.display().to_string())
                .chain(
                    before
                        .keys()
                        .filter(|k| !after.contains_key(*k))
                        .map(|k| format!("-{}", k.display())),
                )
                .collect();
            why.push(format!("files changed: {changed:?}"));
        }
        if !temps_in(dir.path()).is_empty() {
            why.push("a temporary file was left".into());
        }
        if !why.is_empty() {
            failures.push(format!(
                "{}: {}\n  stderr: {}",
                c.name,
                why.join("; "),
                err.trim()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("bad corpus: {} cases passed", all.len());
}

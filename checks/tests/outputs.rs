//! The output-file rules through the real tools: devices and FIFOs are
//! written through, symlinks keep pointing at the replaced file, modes are
//! kept, stdin is never read unless asked, `--model` takes a directory, and
//! `--no-timing` makes records byte-identical.

use ftk_checks::{bin_dir, temps_in, testdata};
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn tool(name: &str, args: &[&str], dir: &Path) -> Output {
    Command::new(bin_dir().join(name))
        .args(args)
        .current_dir(dir)
        .env("FTK_NO_PROGRESS", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// A chunk-run shape that runs in milliseconds.
const TINY_MOE: [&str; 10] = [
    "--hidden",
    "16",
    "--ffn",
    "8",
    "--experts",
    "4",
    "--topk",
    "2",
    "--tokens",
    "8",
];

fn ok(o: &Output) {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn manifest() -> String {
    testdata()
        .join("fed-aggregate/m_r1_5.jsonl")
        .display()
        .to_string()
}

#[test]
fn dev_null_fifo_and_stdout_are_written_through() {
    let d = tempfile::tempdir().unwrap();
    let mut a = TINY_MOE.to_vec();
    a.extend(["--grads-out", "/dev/null"]);
    ok(&tool("chunk-run", &a, d.path()));
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());

    // The reference bytes, then the same through a FIFO.
    let reference = d.path().join("ref.safetensors");
    ok(&tool(
        "fed-aggregate",
        &[
            "--strategy",
            "fedavg",
            "-o",
            reference.to_str().unwrap(),
            &manifest(),
        ],
        d.path(),
    ));
    let fifo = d.path().join("pipe");
    let c = CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read(fifo).unwrap())
    };
    ok(&tool(
        "fed-aggregate",
        &[
            "--strategy",
            "fedavg",
            "-o",
            fifo.to_str().unwrap(),
            &manifest(),
        ],
        d.path(),
    ));
    assert_eq!(reader.join().unwrap(), std::fs::read(&reference).unwrap());
    assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());

    // /dev/stdout: the safetensors bytes go to stdout (after nothing else:
    // fed-aggregate prints its summary after committing).
    let o = tool(
        "fed-aggregate",
        &["--strategy", "fedavg", "-o", "/dev/stdout", &manifest()],
        d.path(),
    );
    ok(&o);
    let r = std::fs::read(&reference).unwrap();
    assert_eq!(&o.stdout[..r.len()], &r[..]);
    assert!(temps_in(d.path()).is_empty());
}

#[test]
fn symlink_target_is_replaced_and_modes_are_kept() {
    let d = tempfile::tempdir().unwrap();
    let real = d.path().join("real.safetensors");
    std::fs::write(&real, b"old").unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::symlink("real.safetensors", d.path().join("link.safetensors")).unwrap();
    ok(&tool(
        "fed-aggregate",
        &[
            "--strategy",
            "fedavg",
            "-o",
            "link.safetensors",
            &manifest(),
        ],
        d.path(),
    ));
    let link = d.path().join("link.safetensors");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_ne!(std::fs::read(&real).unwrap(), b"old");
    assert_eq!(
        std::fs::metadata(&real).unwrap().permissions().mode() & 0o777,
        0o640
    );
    // A new file: 0666 minus the umask (022 here).
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 022 && {} --strategy fedavg -o new.safetensors {}",
            bin_dir().join("fed-aggregate").display(),
            manifest()
        ))
        .current_dir(d.path())
        .output()
        .unwrap();
    ok(&o);
    assert_eq!(
        std::fs::metadata(d.path().join("new.safetensors"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o644
    );
}

#[test]
fn mem_plan_leaves_stdin_alone_and_model_takes_a_directory() {
    let d = tempfile::tempdir().unwrap();
    let junk = d.path().join("list");
    std::fs::write(&junk, "not a histogram\nsecond line\n").unwrap();
    let dir = testdata().join("configs/mixtral-8x7b");
    let o = Command::new(bin_dir().join("mem-plan"))
        .args(["--model", dir.to_str().unwrap(), "--ep", "8", "--dp", "8"])
        .stdin(std::fs::File::open(&junk).unwrap())
        .output()
        .unwrap();
    ok(&o);
    let o = tool(
        "route-hist",
        &[
            "--model",
            dir.to_str().unwrap(),
            "--synthetic",
            "uniform",
            "--tokens",
            "64",
            "--layers",
            "1",
        ],
        d.path(),
    );
    ok(&o);
    let o = tool(
        "chunk-run",
        &[
            "--model",
            dir.to_str().unwrap(),
            "--hidden",
            "16",
            "--ffn",
            "8",
            "--tokens",
            "8",
        ],
        d.path(),
    );
    ok(&o);
}

#[test]
fn no_timing_gives_the_same_bytes() {
    let d = tempfile::tempdir().unwrap();
    for (name, args) in [
        (
            "chunk-run",
            [&TINY_MOE[..], &["--recompute", "none,full", "--no-timing"]].concat(),
        ),
        (
            "fed-aggregate",
            vec!["--strategy", "fedavg", "-o", "g.safetensors", "--no-timing"],
        ),
    ] {
        let mut a = args.clone();
        let m = manifest();
        if name == "fed-aggregate" {
            a.push(&m);
        }
        let x = tool(name, &a, d.path());
        let y = tool(name, &a, d.path());
        ok(&x);
        let text = String::from_utf8_lossy(&x.stdout);
        assert!(!text.contains("_ms") && !text.contains("\"ms\""), "{text}");
        // Equal but for chunk-run's measured heap peaks, which move with
        // thread scheduling (they are measurements, not timings).
        let strip = |o: &Output| -> Vec<serde_json::Value> {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    if let Some(m) = v.as_object_mut() {
                        m.remove("peak_act_bytes");
                        m.remove("peak_bytes");
                    }
                    v
                })
                .collect()
        };
        assert_eq!(strip(&x), strip(&y), "{name}");
        if name == "fed-aggregate" {
            assert_eq!(x.stdout, y.stdout);
        }
    }
}

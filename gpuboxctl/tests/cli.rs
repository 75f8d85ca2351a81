//! gpuboxctl as a person or a script uses it: output, `--json`, exit codes.

use std::process::Command;

const CTL: &str = env!("CARGO_BIN_EXE_gpuboxctl");

fn ctl(args: &[&str], definitions: &str) -> (i32, String) {
    let out = Command::new(CTL)
        .args(args)
        .env("GPUBOX_DEFINITIONS_PATH", definitions)
        .env("GPUBOX_CDI_DIRS", "/nonexistent")
        .env("GPUBOX_NVIDIA_PROC", "/nonexistent")
        .output()
        .unwrap();
    (out.status.code().unwrap(), String::from_utf8(out.stdout).unwrap())
}

fn repo(path: &str) -> String {
    format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn validate_reports_each_definition_and_fails_on_any_error() {
    let (code, out) = ctl(&["validate"], &repo("tests/generator/bad-among-good/etc"));
    assert_eq!(code, 1);
    assert!(
        out.contains("bad-value.gpubox:3: [Container] Network=: expected one of none, host, found 'bridge'"),
        "{out}"
    );
    assert!(out.lines().any(|l| l.starts_with("ok ") && l.ends_with("good.gpubox")), "{out}");
    let (code, out) =
        ctl(&["validate", &repo("examples/train.gpubox"), &repo("examples/inference.gpubox")], "/nonexistent");
    // Right, and each warned that its selector matches no GPU of this (GPU-less) host.
    assert_eq!((code, out.lines().count()), (0, 4), "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with("warning ") && l.contains("matches no GPU")).count(), 2, "{out}");
    let (code, out) = ctl(&["validate", "--json"], &repo("tests/generator/bad-among-good/etc"));
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(code, 1);
    assert_eq!(list.as_array().unwrap().iter().filter(|v| v["ok"] == true).count(), 1);
}

/// Every mistake of a file at once, the nearest names suggested, systemd's own keys checked
/// against the installed systemd; `list` marks such a definition `invalid`.
#[test]
fn validate_finds_every_mistake_and_list_marks_the_definition_invalid() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("typos.gpubox"),
        "[Container]\nExec=/bin/true\nEnviroment=A=1\n[Service]\nMemroyMax=1G\n[GPU]\nDevice=nvidai:0\n",
    )
    .unwrap();
    let (code, out) = ctl(&["validate"], dir.path().to_str().unwrap());
    assert_eq!(code, 1);
    assert!(
        out.contains("typos.gpubox:3: [Container] Enviroment=: unknown key in [Container] (did you mean Environment=?"),
        "{out}"
    );
    assert!(
        out.contains("typos.gpubox:7: [GPU] Device=: unknown GPU selector 'nvidai:0' (did you mean nvidia:0?"),
        "{out}"
    );
    if std::path::Path::new("/usr/lib/systemd/systemd").exists()
        || std::path::Path::new("/lib/systemd/systemd").exists()
    {
        assert!(out.contains("typos.gpubox:5: [Service] MemroyMax=: unknown to this host's systemd, which would ignore it (did you mean MemoryMax=?)"), "{out}");
    }
    let (code, out) = ctl(&["list"], dir.path().to_str().unwrap());
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with("typos ") && l.contains("invalid")), "{out}");
    assert!(out.contains("invalid: ") && out.contains("Enviroment="), "{out}");
}

#[test]
fn devices_says_cleanly_when_the_nvidia_driver_is_absent() {
    let (code, out) = ctl(&["devices"], "/nonexistent");
    assert_eq!(code, 0);
    let nvidia: Vec<&str> = out.lines().filter(|l| l.starts_with("nvidia:")).collect();
    assert_eq!(nvidia.len(), 1, "one clear line: {out}");
    assert!(nvidia[0].starts_with("nvidia: not available: no NVIDIA driver (/nonexistent/gpus"), "{out}");
    let (code, out) = ctl(&["devices", "--json"], "/nonexistent");
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let nvidia = v["backends"].as_array().unwrap().iter().find(|b| b["name"] == "nvidia").unwrap();
    assert!(nvidia["absent"].as_str().unwrap().contains("no NVIDIA driver"));
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(ctl(&["frobnicate"], "/nonexistent").0, 2);
}

#[test]
fn shell_completions() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out) = ctl(&["completions", shell], "/nonexistent");
        assert_eq!(code, 0);
        // The script asks gpuboxctl itself at each completion.
        assert!(out.contains("COMPLETE") && out.contains("gpuboxctl"), "{shell}: {out}");
    }
    assert_eq!(ctl(&["completions", "tcsh"], "/nonexistent").0, 2);
}

/// What the shell gets when it asks: subcommands, definition names of this host for `logs`,
/// and GPU selectors for `attach` (none here but `all`).
#[test]
fn completions_name_commands_definitions_and_selectors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("trainer.gpubox"), "[Container]\nExec=/bin/true\n").unwrap();
    std::fs::write(dir.path().join("hidden.gpubox"), "").unwrap();
    let complete = |words: &[&str]| {
        let out = Command::new(CTL)
            .args(["--", "gpuboxctl"])
            .args(words)
            .env("COMPLETE", "fish")
            .env("GPUBOX_DEFINITIONS_PATH", dir.path())
            .env("GPUBOX_CDI_DIRS", "/nonexistent")
            .env("GPUBOX_NVIDIA_PROC", "/nonexistent")
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(complete(&["ex"]).lines().any(|l| l.starts_with("exec\t")), "{}", complete(&["ex"]));
    let names = complete(&["logs", ""]);
    assert!(names.lines().any(|l| l == "trainer") && !names.contains("hidden"), "{names}");
    assert!(complete(&["attach", "trainer", ""]).lines().any(|l| l == "all"));
}

#[test]
fn list_shows_definitions_but_not_masked_ones() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("shown.gpubox"), "[Container]\nExec=/bin/true\n").unwrap();
    std::fs::write(dir.path().join("masked.gpubox"), "").unwrap();
    let (code, out) = ctl(&["list"], dir.path().to_str().unwrap());
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with("shown ") && l.contains("inactive")), "{out}");
    assert!(!out.contains("masked"), "{out}");
}

/// `--help` exits 0 and `--version` answers, on every binary (`run --help` of the supervisor too).
#[test]
fn every_binary_has_help_and_version() {
    let dir = std::path::Path::new(CTL).parent().unwrap();
    for (binary, args) in [
        ("gpuboxctl", &["--help"][..]),
        ("gpuboxctl", &["--version"][..]),
        ("gpubox-supervisor", &["--help"][..]),
        ("gpubox-supervisor", &["run", "--help"][..]),
        ("gpubox-supervisor", &["--version"][..]),
        ("gpubox-generator", &["--help"][..]),
        ("gpubox-generator", &["--version"][..]),
    ] {
        let path = dir.join(binary);
        if !path.exists() {
            eprintln!("skipping {binary}: not built");
            continue;
        }
        let out = Command::new(&path).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{binary} {args:?}");
        assert!(!out.stdout.is_empty(), "{binary} {args:?} printed nothing");
    }
}

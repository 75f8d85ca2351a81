//! Golden files, as Quadlet tests its generator: each case in `tests/generator/CASE/` holds
//! definitions (`etc/`, `run/`, `usr/`, or the dirs listed in `search-path`), the exact output
//! tree the generator must write (`expected/`, links included), and `expected-log`, the exact
//! lines it must log. `@ROOT@` stands for the case's directory, `@REPO@` for the repository's. `UPDATE_GOLDEN=1` rewrites the
//! expectations from the current output, for review with `git diff`.
//!
//! Every unit the generator writes is also checked by the real `systemd-analyze verify`, with
//! the real `units/gpu@.service` beside it.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const GENERATOR: &str = env!("CARGO_BIN_EXE_gpubox-generator");

fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/generator").canonicalize().unwrap()
}

fn search_path(case: &Path) -> String {
    let dirs = match fs::read_to_string(case.join("search-path")) {
        Ok(list) => list.split_whitespace().map(|d| case.join(d).canonicalize().unwrap()).collect::<Vec<_>>(),
        Err(_) => ["etc", "run", "usr"].iter().map(|d| case.join(d)).collect(),
    };
    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":")
}

/// Runs the generator as systemd does (three output dirs) and returns its log.
fn generate(case: &Path, out: &Path) -> String {
    let early = out.with_extension("early");
    let late = out.with_extension("late");
    let result = Command::new(GENERATOR)
        .arg(out)
        .arg(&early)
        .arg(&late)
        .env("GPUBOX_DEFINITIONS_PATH", search_path(case))
        .env_remove("SYSTEMD_SCOPE")
        .output()
        .unwrap();
    assert!(result.status.success(), "generator failed for {}: {result:?}", case.display());
    assert!(result.stdout.is_empty(), "generator wrote to stdout");
    assert!(!early.exists() && !late.exists(), "only the normal directory is used");
    String::from_utf8(result.stderr).unwrap()
}

/// A tree as relative path → file text or `-> link target`.
fn read_tree(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for entry in entries {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let meta = path.symlink_metadata().unwrap();
            if meta.file_type().is_symlink() {
                out.insert(rel, format!("-> {}", fs::read_link(&path).unwrap().display()));
            } else if meta.is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(rel, fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn write_tree(root: &Path, tree: &BTreeMap<String, String>) {
    let _ = fs::remove_dir_all(root);
    for (rel, content) in tree {
        let path = root.join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        match content.strip_prefix("-> ") {
            Some(target) => std::os::unix::fs::symlink(target, &path).unwrap(),
            None => fs::write(&path, content).unwrap(),
        }
    }
}

fn cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> =
        fs::read_dir(cases_dir()).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    cases.sort();
    assert!(cases.len() >= 4, "golden cases missing");
    cases
}

#[test]
fn generator_output_matches_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for case in cases() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("normal");
        let root = case.display().to_string();
        let repo = cases_dir().join("../..").canonicalize().unwrap().display().to_string();
        let placeholders = |text: String| text.replace(&root, "@ROOT@").replace(&repo, "@REPO@");
        let log = placeholders(generate(&case, &out));
        let actual: BTreeMap<String, String> = read_tree(&out).into_iter().map(|(k, v)| (k, placeholders(v))).collect();
        if update {
            write_tree(&case.join("expected"), &actual);
            fs::write(case.join("expected-log"), &log).unwrap();
            continue;
        }
        let expected = read_tree(&case.join("expected"));
        let name = case.file_name().unwrap().to_string_lossy();
        assert_eq!(actual.keys().collect::<Vec<_>>(), expected.keys().collect::<Vec<_>>(), "{name}: files differ");
        for (rel, text) in &expected {
            assert_eq!(&actual[rel], text, "{name}: {rel} differs");
        }
        assert_eq!(log, fs::read_to_string(case.join("expected-log")).unwrap(), "{name}: log differs");
    }
}

/// The real template, installed as `make install` would, with a stand-in supervisor binary
/// (verify checks that ExecStart= is executable, not what it does).
fn install_template(root: &Path) -> PathBuf {
    let bindir = root.join("bin");
    let units = root.join("units");
    fs::create_dir_all(&bindir).unwrap();
    fs::create_dir_all(&units).unwrap();
    std::os::unix::fs::symlink("/bin/true", bindir.join("gpubox-supervisor")).unwrap();
    let template = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../units/gpu@.service")).unwrap();
    let template =
        template.replace("@BINDIR@", &bindir.display().to_string()).replace("@DOCDIR@", "/usr/share/doc/gpubox");
    fs::write(units.join("gpu@.service"), template).unwrap();
    units
}

/// `systemd-analyze verify` exits 0 even for keys it ignores, so anything it says is a failure.
fn verify(unit: &str, generated: &Path, units: &Path) -> Result<(), String> {
    let result = Command::new("systemd-analyze")
        .args(["verify", "--man=no", "--generators=no", unit])
        .env("SYSTEMD_UNIT_PATH", format!("{}:{}:", generated.display(), units.display()))
        .env("SYSTEMD_LOG_LEVEL", "notice")
        .output()
        .expect("systemd-analyze is missing: install systemd (tests/install-deps does)");
    let stderr = String::from_utf8_lossy(&result.stderr);
    match result.status.success() && stderr.trim().is_empty() {
        true => Ok(()),
        false => Err(format!("systemd-analyze verify {unit}: {}\n{stderr}", result.status)),
    }
}

#[test]
fn generated_units_pass_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let units = install_template(tmp.path());
    let mut verified = 0;
    for case in cases() {
        let out = tmp.path().join(case.file_name().unwrap());
        generate(&case, &out);
        for rel in read_tree(&out).keys() {
            if let Some(unit) = rel.strip_suffix(".d/10-gpubox.conf") {
                verify(unit, &out, &units).unwrap_or_else(|e| panic!("case {}: {e}", case.display()));
                verified += 1;
            }
        }
    }
    assert!(verified >= 8, "only {verified} units verified");
}

#[test]
fn verify_catches_a_bad_unit_line() {
    let tmp = tempfile::tempdir().unwrap();
    let units = install_template(tmp.path());
    let out = tmp.path().join("gen");
    fs::create_dir_all(out.join("gpu@x.service.d")).unwrap();
    verify("gpu@x.service", &out, &units).expect("the template alone is clean");
    fs::write(out.join("gpu@x.service.d/10-gpubox.conf"), "[Service]\nRestart=sometimes\n").unwrap();
    let e = verify("gpu@x.service", &out, &units).unwrap_err();
    assert!(e.contains("Failed to parse service restart specifier"), "{e}");
}

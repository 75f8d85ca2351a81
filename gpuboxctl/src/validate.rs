//! `gpuboxctl validate`: every mistake of every definition, as the generator and the supervisor
//! would find them, and what systemd itself would only warn about in its journal:
//!
//! - each file is read to its end and every assignment checked (`Sources::check`), each error
//!   with file, line, section and key, and the nearest known name when one is close;
//! - `[Unit]` and `[Service]` keys, which gpubox passes to systemd, are checked against the keys
//!   the installed systemd knows (`systemd --dump-configuration-items`, the table its unit
//!   parser uses: `systemd-analyze verify` says "Unknown key name" from the same table);
//! - a selector that matches no GPU of this host is a warning (the GPU may come later).

use anyhow::Result;
use gpubox_definition::{suggest, Definition, SearchPath, Sources};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::ExitCode;

/// One definition's findings.
#[derive(Debug, serde::Serialize)]
pub struct Report {
    pub file: String,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

pub fn validate(files: &[PathBuf], json: bool) -> Result<ExitCode> {
    let sources: Vec<Result<Sources, String>> = if files.is_empty() {
        SearchPath::from_env().discover()?.into_iter().filter(|s| !s.masked).map(Ok).collect()
    } else {
        files.iter().map(|f| Sources::from_file(f).map_err(|e| e.to_string())).collect()
    };
    let systemd = SystemdKeys::installed();
    let inventory = std::cell::OnceCell::new();
    let reports: Vec<Report> = sources
        .into_iter()
        .map(|s| match s {
            Ok(s) => {
                let mut report = check(&s, systemd.as_ref());
                if report.errors.is_empty() {
                    if let Ok(d) = s.load() {
                        report.warnings =
                            unmatched_selectors(&d, inventory.get_or_init(gpubox_devices::Inventory::discover));
                    }
                }
                report
            }
            Err(e) => Report { file: String::new(), errors: vec![e], warnings: Vec::new() },
        })
        .collect();
    let failed = reports.iter().any(|r| !r.errors.is_empty());
    if json {
        let list: Vec<serde_json::Value> = reports
            .iter()
            .map(|r| {
                serde_json::json!({"file": r.file, "ok": r.errors.is_empty(), "error": r.errors.first(),
                    "errors": r.errors, "warnings": r.warnings})
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        for r in &reports {
            if r.errors.is_empty() {
                println!("ok     {}", r.file);
            }
            for e in &r.errors {
                println!("error  {e}");
            }
            for w in &r.warnings {
                println!("warning  {w}");
            }
        }
        if reports.is_empty() {
            println!("no definitions found (searched {})", SearchPath::from_env().display());
        }
        if systemd.is_none() {
            eprintln!("gpuboxctl: systemd is not installed here: [Unit] and [Service] keys were not checked");
        }
    }
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

/// Every error of one definition: gpubox's own, and systemd's keys.
pub fn check(sources: &Sources, systemd: Option<&SystemdKeys>) -> Report {
    let (d, errors) = sources.load_all();
    let mut errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    if let Some(systemd) = systemd {
        for (section, keys) in [("Unit", &d.unit), ("Service", &d.service)] {
            for p in keys {
                if let Some(message) = systemd.unknown(section, &p.key) {
                    errors.push(format!("{}:{}: [{section}] {}=: {message}", p.path.display(), p.line, p.key));
                }
            }
        }
    }
    Report { file: sources.main.display().to_string(), errors, warnings: Vec::new() }
}

/// Selectors of the definition that match nothing on this host, each with what it has.
fn unmatched_selectors(d: &Definition, inventory: &gpubox_devices::Inventory) -> Vec<String> {
    d.gpu
        .devices
        .iter()
        .filter_map(|selector| gpubox_devices::select::select(inventory, std::slice::from_ref(selector), false).err())
        .map(|e| {
            let when = if d.gpu.hotplug { " (Hotplug=yes: the container waits for it)" } else { "" };
            format!("{}: {e}{when}", d.sources[0].display())
        })
        .collect()
}

/// The keys of each section that the installed systemd's unit parser knows.
pub struct SystemdKeys(BTreeMap<String, BTreeSet<String>>);

impl SystemdKeys {
    /// Asks the installed systemd; none where it is not installed.
    pub fn installed() -> Option<SystemdKeys> {
        let binary = ["/usr/lib/systemd/systemd", "/lib/systemd/systemd"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())?;
        let out = std::process::Command::new(binary).arg("--dump-configuration-items").output().ok()?;
        out.status.success().then(|| SystemdKeys::parse(&String::from_utf8_lossy(&out.stdout)))
    }

    /// `[Section]` lines, then `Key=TYPE` lines, as `--dump-configuration-items` prints them.
    pub fn parse(dump: &str) -> SystemdKeys {
        let mut sections: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut current = String::new();
        for line in dump.lines() {
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                current = name.to_owned();
            } else if let Some((key, _)) = line.split_once('=') {
                sections.entry(current.clone()).or_default().insert(key.to_owned());
            }
        }
        SystemdKeys(sections)
    }

    /// Why `key` is not a key of `[section]` for this systemd, with the nearest one.
    pub fn unknown(&self, section: &str, key: &str) -> Option<String> {
        let known = self.0.get(section)?;
        if known.contains(key) {
            return None;
        }
        let hint = suggest::did_you_mean(key, known.iter().map(String::as_str))
            .map(|k| format!(" (did you mean {k}=?)"))
            .unwrap_or_default();
        Some(format!("unknown to this host's systemd, which would ignore it{hint}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_keys_come_from_its_dump_and_suggest_the_nearest() {
        let keys = SystemdKeys::parse("[Unit]\nDescription=STRING\n[Service]\nMemoryMax=LIMIT\nCPUQuota=PERCENT\n");
        assert_eq!(keys.unknown("Service", "MemoryMax"), None);
        let e = keys.unknown("Service", "MemroyMax").unwrap();
        assert!(e.contains("did you mean MemoryMax=?"), "{e}");
        assert!(keys.unknown("Unit", "Frobnicate").is_some_and(|e| !e.contains("did you mean")));
    }
}

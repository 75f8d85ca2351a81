//! `gpuboxctl`, the command line for people. Exit status: 0 success, 1 a check failed
//! (`validate` found errors), 2 bad usage.

use anyhow::Result;
use clap::{Parser, Subcommand};
use gpubox_definition::{SearchPath, Sources};
use gpubox_devices::{select::selector_forms, Inventory};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "gpuboxctl", version, about = "GPU containers as systemd services")]
struct Cli {
    /// Machine-readable output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every GPU this host has, from every backend, and the selectors that name it.
    Devices,
    /// Checks definitions as the generator and supervisor would (all of them when no FILE is given).
    Validate { files: Vec<PathBuf> },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Devices => devices(cli.json),
        Command::Validate { files } => validate(&files, cli.json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gpuboxctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn devices(json: bool) -> Result<ExitCode> {
    let inventory = Inventory::discover();
    if json {
        let gpus: Vec<serde_json::Value> = inventory
            .gpus
            .iter()
            .map(|g| {
                let mut v = serde_json::to_value(g).expect("serialisable");
                v["selectors"] = selector_forms(g).into();
                v
            })
            .collect();
        let cdi: Vec<serde_json::Value> = inventory
            .cdi
            .devices()
            .into_iter()
            .map(|(q, spec, _)| serde_json::json!({"name": format!("cdi:{q}"), "spec": spec.path}))
            .collect();
        let out = serde_json::json!({"gpus": gpus, "cdi": cdi, "backends": inventory.backends, "cdi_problems": inventory.cdi.problems});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![["GPU".to_owned(), "DRIVER".into(), "NODES".into(), "ALSO SELECTED BY".into()]];
    for g in &inventory.gpus {
        let forms = selector_forms(g);
        let nodes: Vec<String> = g.nodes.iter().map(|n| n.path.display().to_string()).collect();
        rows.push([
            forms.first().cloned().unwrap_or_default(),
            g.driver.clone().unwrap_or_else(|| "-".into()),
            nodes.join(" "),
            forms[1..].join(" "),
        ]);
    }
    for (q, spec, device) in inventory.cdi.devices() {
        let nodes: Vec<String> = device.edits.device_nodes.iter().map(|n| n.path.display().to_string()).collect();
        rows.push([format!("cdi:{q}"), "cdi".into(), nodes.join(" "), spec.path.display().to_string()]);
    }
    if rows.len() == 1 {
        println!("No GPUs found.");
    } else {
        print_table(&rows);
    }
    for b in &inventory.backends {
        if let Some(why) = &b.absent {
            println!("{}: not available: {why}", b.name);
        }
    }
    for problem in &inventory.cdi.problems {
        println!("cdi: {problem}");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(rows: &[[String; 4]]) {
    let widths: Vec<usize> = (0..4).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = (0..4).map(|i| format!("{:w$}", r[i], w = widths[i])).collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn validate(files: &[PathBuf], json: bool) -> Result<ExitCode> {
    let sources: Vec<Result<Sources, String>> = if files.is_empty() {
        SearchPath::from_env().discover()?.into_iter().filter(|s| !s.masked).map(Ok).collect()
    } else {
        files.iter().map(|f| Sources::from_file(f).map_err(|e| e.to_string())).collect()
    };
    let mut results = Vec::new();
    for s in sources {
        let (file, error) = match s {
            Ok(s) => (s.main.display().to_string(), s.load().err().map(|e| e.to_string())),
            Err(e) => (String::new(), Some(e)),
        };
        results.push((file, error));
    }
    let failed = results.iter().filter(|(_, e)| e.is_some()).count();
    if json {
        let list: Vec<serde_json::Value> =
            results.iter().map(|(f, e)| serde_json::json!({"file": f, "ok": e.is_none(), "error": e})).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        for (file, error) in &results {
            match error {
                None => println!("ok     {file}"),
                Some(e) => println!("error  {e}"),
            }
        }
        if results.is_empty() {
            println!("no definitions found (searched {})", SearchPath::from_env().display());
        }
    }
    Ok(if failed > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

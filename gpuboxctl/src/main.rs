//! `gpuboxctl`, the command line for people. Exit status: 0 success, 1 the operation failed
//! (or `validate` found errors), 2 bad usage, 3 the container is not running; `run`: the
//! payload's status, 128+N if it was killed by signal N, 125 if the container could not start.

mod run;
mod usage;

use anyhow::Result;
use clap::{Parser, Subcommand};
use gpubox_definition::{SearchPath, Sources};
use gpubox_devices::{allocation, select::selector_forms, Inventory};
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
    /// Runs a one-off container as a transient unit (standalone where systemd is not PID 1).
    Run(run::RunArgs),
    /// Containers: every definition, and the state and devices of those that run.
    List,
    /// One running container: state, payload pid, devices and how they came.
    Status { name: String },
    /// Attaches GPUs to a running container (a selector, as in [GPU] Device=).
    Attach { name: String, selector: String },
    /// Detaches what was attached with this selector.
    Detach { name: String, selector: String },
    /// Prints a shell completion script: gpuboxctl completions bash > /etc/bash_completion.d/gpuboxctl
    Completions { shell: clap_complete::Shell },
    /// Tells every running container that a device came or went (as udev does by itself
    /// through the rules' tag): for scripts and hosts without gpubox's udev rules.
    Hotplug {
        #[arg(value_parser = ["add", "remove", "change", "bind", "unbind"])]
        action: String,
        devnode: String,
    },
    /// Every GPU this host has, from every backend, and the selectors that name it.
    Devices,
    /// Checks definitions as the generator and supervisor would (all of them when no FILE is given).
    Validate { files: Vec<PathBuf> },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::List => list(cli.json),
        Command::Status { name } => with_client(&name, cli.json, true, |c| c.status()),
        Command::Attach { name, selector } => with_client(&name, cli.json, false, |c| c.attach(&selector)),
        Command::Detach { name, selector } => with_client(&name, cli.json, false, |c| c.detach(&selector)),
        Command::Hotplug { action, devnode } => Ok(hotplug(&action, &devnode)),
        Command::Devices => devices(cli.json),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "gpuboxctl",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
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

const NOT_RUNNING: u8 = 3;

/// Calls the container's supervisor and prints the status it answers; with `usage`, also what
/// the container's processes use of its NVIDIA GPUs (usage.rs).
fn with_client(
    name: &str,
    json: bool,
    usage: bool,
    call: impl FnOnce(&gpubox_control::Client) -> Result<gpubox_control::Status, gpubox_control::Error>,
) -> Result<ExitCode> {
    let status = match gpubox_control::Client::connect(name).and_then(|c| call(&c)) {
        Ok(s) => s,
        Err(e @ gpubox_control::Error::NotRunning(..)) => {
            eprintln!("gpuboxctl: {e}");
            return Ok(ExitCode::from(NOT_RUNNING));
        }
        Err(e) => {
            eprintln!("gpuboxctl: {name}: {e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let usage = usage.then(|| usage::of(&status));
    if json {
        let mut value = serde_json::to_value(&status)?;
        match &usage {
            Some(Ok(u)) if !u.is_empty() => value["usage"] = serde_json::to_value(u)?,
            Some(Err(e)) => value["usage_unavailable"] = e.clone().into(),
            _ => {}
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        println!(
            "{} ({}), payload pid {}, hotplug {}",
            status.name,
            status.state,
            status.pid,
            if status.hotplug { "on" } else { "off" }
        );
        if status.devices.is_empty() {
            println!("  no devices");
        }
        for d in &status.devices {
            let nodes: Vec<String> = d.nodes.iter().map(|n| n.display().to_string()).collect();
            println!("  {} ({}): {}", d.name, d.how, nodes.join(" "));
            if !d.mounts.is_empty() {
                let mounts: Vec<String> = d.mounts.iter().map(|m| m.display().to_string()).collect();
                println!("    mounts: {}", mounts.join(" "));
            }
        }
        match &usage {
            Some(Ok(list)) => {
                for u in list {
                    let sm = u.sm_percent.map_or("SM -".to_owned(), |p| format!("SM {p} %"));
                    println!(
                        "  {}: {} process{} of the container's, {} of GPU memory, {sm}",
                        u.gpu,
                        u.processes,
                        if u.processes == 1 { "" } else { "es" },
                        usage::human(u.memory_bytes)
                    );
                }
            }
            Some(Err(e)) => println!("  GPU usage: not available: {e}"),
            None => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn list(json: bool) -> Result<ExitCode> {
    // Masked definitions are switched off: they are not containers to list.
    let mut names: Vec<String> = SearchPath::from_env()
        .discover()
        .map(|all| all.into_iter().filter(|s| !s.masked).map(|s| s.name).collect())
        .unwrap_or_default();
    for running in gpubox_control::running() {
        if !names.contains(&running) {
            names.push(running);
        }
    }
    names.sort();
    let statuses: Vec<(String, Option<gpubox_control::Status>)> = names
        .into_iter()
        .map(|n| {
            let status = gpubox_control::Client::connect(&n).and_then(|c| c.status()).ok();
            (n, status)
        })
        .collect();
    if json {
        let list: Vec<serde_json::Value> = statuses
            .iter()
            .map(|(n, s)| match s {
                Some(s) => serde_json::to_value(s).expect("serialisable"),
                None => serde_json::json!({"name": n, "state": "inactive"}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![["NAME".to_owned(), "STATE".into(), "PID".into(), "DEVICES".into()]];
    for (name, status) in &statuses {
        rows.push(match status {
            Some(s) => [
                name.clone(),
                s.state.clone(),
                s.pid.to_string(),
                s.devices.iter().map(|d| d.name.clone()).collect::<Vec<_>>().join(" "),
            ],
            None => [name.clone(), "inactive".into(), "-".into(), "-".into()],
        });
    }
    print_table(&rows);
    Ok(ExitCode::SUCCESS)
}

/// Never fails the udev rule: each container's answer is logged, the exit status is 0.
fn hotplug(action: &str, devnode: &str) -> ExitCode {
    for name in gpubox_control::running() {
        if let Err(e) = gpubox_control::Client::connect(&name).and_then(|c| c.hotplug(action, devnode)) {
            eprintln!("gpuboxctl hotplug {action} {devnode}: {name}: {e}");
        }
    }
    ExitCode::SUCCESS
}

/// Which running containers hold each node.
fn holders() -> Vec<(String, Vec<PathBuf>)> {
    gpubox_control::running()
        .into_iter()
        .filter_map(|name| {
            let status = gpubox_control::Client::connect(&name).and_then(|c| c.status()).ok()?;
            Some((name, status.devices.into_iter().flat_map(|d| d.nodes).collect()))
        })
        .collect()
}

fn held_by(holders: &[(String, Vec<PathBuf>)], nodes: &[&std::path::Path]) -> Vec<String> {
    holders
        .iter()
        .filter(|(_, held)| held.iter().any(|h| nodes.contains(&h.as_path())))
        .map(|(n, _)| n.clone())
        .collect()
}

fn devices(json: bool) -> Result<ExitCode> {
    let inventory = Inventory::discover();
    let holders = holders();
    if json {
        let gpus: Vec<serde_json::Value> = inventory
            .gpus
            .iter()
            .map(|g| {
                let mut v = serde_json::to_value(g).expect("serialisable");
                v["selectors"] = selector_forms(g).into();
                let nodes: Vec<&std::path::Path> = g.nodes.iter().map(|n| n.path.as_path()).collect();
                v["containers"] = held_by(&holders, &nodes).into();
                let allocated: Vec<serde_json::Value> = gpubox_control::locks::holders(&allocation::key_of(g))
                    .into_iter()
                    .map(|(container, exclusive)| serde_json::json!({"container": container, "exclusive": exclusive}))
                    .collect();
                v["holders"] = allocated.into();
                v
            })
            .collect();
        let cdi: Vec<serde_json::Value> = inventory
            .cdi
            .devices()
            .into_iter()
            .map(|(q, spec, device)| {
                let nodes: Vec<&std::path::Path> = device.edits.device_nodes.iter().map(|n| n.path.as_path()).collect();
                serde_json::json!({"name": format!("cdi:{q}"), "spec": spec.path, "nodes": nodes, "containers": held_by(&holders, &nodes)})
            })
            .collect();
        let out = serde_json::json!({"gpus": gpus, "cdi": cdi, "backends": inventory.backends, "cdi_problems": inventory.cdi.problems});
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows =
        vec![["GPU".to_owned(), "DRIVER".into(), "NODES".into(), "CONTAINERS".into(), "ALSO SELECTED BY".into()]];
    for g in &inventory.gpus {
        let forms = selector_forms(g);
        let nodes: Vec<&std::path::Path> = g.nodes.iter().map(|n| n.path.as_path()).collect();
        let mut containers = held_by(&holders, &nodes);
        // Who holds it and how, from the allocator's holder files (root only).
        for (name, exclusive) in gpubox_control::locks::holders(&allocation::key_of(g)) {
            containers.retain(|c| *c != name);
            containers.push(if exclusive { format!("{name} (exclusive)") } else { name });
        }
        rows.push([
            forms.first().cloned().unwrap_or_default(),
            g.driver.clone().unwrap_or_else(|| "-".into()),
            nodes.iter().map(|n| n.display().to_string()).collect::<Vec<_>>().join(" "),
            if containers.is_empty() { "-".into() } else { containers.join(",") },
            forms[1..].join(" "),
        ]);
    }
    for (q, spec, device) in inventory.cdi.devices() {
        let nodes: Vec<&std::path::Path> = device.edits.device_nodes.iter().map(|n| n.path.as_path()).collect();
        let containers = held_by(&holders, &nodes);
        rows.push([
            format!("cdi:{q}"),
            "cdi".into(),
            nodes.iter().map(|n| n.display().to_string()).collect::<Vec<_>>().join(" "),
            if containers.is_empty() { "-".into() } else { containers.join(",") },
            spec.path.display().to_string(),
        ]);
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

fn print_table<const N: usize>(rows: &[[String; N]]) {
    let widths: Vec<usize> = (0..N).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = (0..N).map(|i| format!("{:w$}", r[i], w = widths[i])).collect();
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

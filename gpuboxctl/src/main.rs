//! `gpuboxctl`, the command line for people. Exit status: 0 success, 1 the operation failed
//! (or `validate` found errors), 2 bad usage, 3 the container is not running; `run`: the
//! payload's status, 128+N if it was killed by signal N, 125 if the container could not start.

mod complete;
mod exec;
mod image;
mod pull_progress;
mod run;
mod usage;
mod validate;

use anyhow::Result;
use clap::{Parser, Subcommand};
use gpubox_definition::SearchPath;
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
    Run(Box<run::RunArgs>),
    /// Containers: every definition, and the state and devices of those that run.
    List,
    /// One running container: state, payload pid, devices and how they came.
    Status {
        #[arg(add = complete::running_names())]
        name: String,
    },
    /// Attaches GPUs to a running container (a selector, as in [GPU] Device=).
    Attach {
        #[arg(add = complete::running_names())]
        name: String,
        #[arg(add = complete::selectors())]
        selector: String,
    },
    /// Detaches what was attached with this selector.
    Detach {
        #[arg(add = complete::running_names())]
        name: String,
        selector: String,
    },
    /// Runs a command in a running container, confined as its payload is (root only).
    Exec(exec::ExecArgs),
    /// The container's log: what `journalctl -u gpu@NAME.service` shows (its payload's output
    /// and its supervisor's messages).
    Logs {
        #[arg(add = complete::definition_names())]
        name: String,
        /// Keep printing what comes.
        #[arg(short, long)]
        follow: bool,
        /// The last N lines only.
        #[arg(short = 'n', long, value_name = "N")]
        lines: Option<u64>,
        /// Only what came since then (journalctl's time syntax: "1 hour ago", "today", …).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
    },
    /// A login shell in a running container (bash where it has one, else sh; root only).
    Shell {
        #[arg(add = complete::running_names())]
        name: String,
        /// The user inside: a name, UID or UID:GID (default: the container's User=, else root).
        #[arg(short = 'u', long, value_name = "USER")]
        user: Option<String>,
    },
    /// Prints the shell's completion script, which asks gpuboxctl for names and selectors:
    /// gpuboxctl completions bash > /etc/bash_completion.d/gpuboxctl
    Completions {
        #[arg(value_parser = ["bash", "zsh", "fish", "elvish", "powershell"])]
        shell: String,
    },
    /// Tells every running container that a device came or went (as udev does by itself
    /// through the rules' tag): for scripts and hosts without gpubox's udev rules.
    Hotplug {
        #[arg(value_parser = ["add", "remove", "change", "bind", "unbind"])]
        action: String,
        devnode: String,
    },
    /// Every GPU this host has, from every backend, and the selectors that name it.
    Devices,
    /// The image store: pull, import, list, remove, prune (root only).
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Checks definitions as the generator and supervisor would (all of them when no FILE is given).
    Validate { files: Vec<PathBuf> },
}

fn main() -> ExitCode {
    // The shell asking for completions (complete.rs): answered, and nothing else done.
    clap_complete::CompleteEnv::with_factory(<Cli as clap::CommandFactory>::command).var(complete::VAR).complete();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(*args),
        Command::List => list(cli.json),
        Command::Status { name } => with_client(&name, cli.json, true, |c| c.status()),
        Command::Attach { name, selector } => with_client(&name, cli.json, false, |c| c.attach(&selector)),
        Command::Detach { name, selector } => with_client(&name, cli.json, false, |c| c.detach(&selector)),
        Command::Hotplug { action, devnode } => Ok(hotplug(&action, &devnode)),
        Command::Devices => devices(cli.json),
        Command::Image(command) => image::run(command, cli.json),
        Command::Exec(args) => exec::exec(args),
        Command::Logs { name, follow, lines, since } => logs(&name, follow, lines, since.as_deref()),
        Command::Shell { name, user } => exec::exec(exec::ExecArgs {
            name,
            tty: false,
            no_tty: false,
            interactive: true,
            user,
            env: Vec::new(),
            workdir: None,
            command: exec::SHELL.iter().map(|s| s.to_string()).collect(),
        }),
        Command::Completions { shell } => {
            complete::registration(&shell, &mut std::io::stdout()).map(|_| ExitCode::SUCCESS)
        }
        Command::Validate { files } => validate::validate(&files, cli.json),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("gpuboxctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub const NOT_RUNNING: u8 = 3;

/// Becomes `journalctl` for the container's unit: `gpu@NAME.service`, or `NAME.service` for a
/// `gpuboxctl run` container (whose payload's output went to the caller's terminal).
fn logs(name: &str, follow: bool, lines: Option<u64>, since: Option<&str>) -> Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    if !std::path::Path::new("/run/systemd/system").exists() {
        anyhow::bail!(
            "systemd is not running on this host, so there is no journal: a standalone container's \
             output goes to the stdout and stderr of its gpubox-supervisor (the terminal or file of \
             whoever started it), and gpubox keeps no log of its own"
        );
    }
    let one_off = name.starts_with("gpu-run-")
        || std::path::Path::new(&format!("/run/systemd/transient/{name}.service")).exists();
    let unit = if one_off { format!("{name}.service") } else { format!("gpu@{name}.service") };
    let mut journalctl = std::process::Command::new("journalctl");
    journalctl.args(["--unit", &unit]);
    if follow {
        journalctl.arg("--follow");
    }
    if let Some(n) = lines {
        journalctl.arg(format!("--lines={n}"));
    }
    if let Some(since) = since {
        journalctl.arg(format!("--since={since}"));
    }
    let e = journalctl.exec();
    Err(anyhow::Error::from(e).context("running journalctl"))
}

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
        if status.devices.is_empty() && status.waiting.is_empty() {
            println!("  no devices");
        }
        for selector in &status.waiting {
            println!("  {selector}: waiting for it to appear (Hotplug=yes; nothing on this host matches it yet)");
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
    let definitions: Vec<gpubox_definition::Sources> = SearchPath::from_env()
        .discover()
        .map(|all| all.into_iter().filter(|s| !s.masked).collect())
        .unwrap_or_default();
    let mut names: Vec<String> = definitions.iter().map(|s| s.name.clone()).collect();
    for running in gpubox_control::running() {
        if !names.contains(&running) {
            names.push(running);
        }
    }
    names.sort();
    let systemd = validate::SystemdKeys::installed();
    // What each row says: the running container's status, else whether its definition would
    // start (the first of its errors when it would not).
    let rows: Vec<(String, Option<gpubox_control::Status>, Option<String>)> = names
        .into_iter()
        .map(|n| {
            let status = gpubox_control::Client::connect(&n).and_then(|c| c.status()).ok();
            let error = match &status {
                Some(_) => None,
                None => definitions
                    .iter()
                    .find(|s| s.name == n)
                    .and_then(|s| validate::check(s, systemd.as_ref()).errors.into_iter().next()),
            };
            (n, status, error)
        })
        .collect();
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, s, error)| match (s, error) {
                (Some(s), _) => serde_json::to_value(s).expect("serialisable"),
                (None, Some(e)) => serde_json::json!({"name": n, "state": "invalid", "error": e}),
                (None, None) => serde_json::json!({"name": n, "state": "inactive"}),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = vec![["NAME".to_owned(), "STATE".into(), "PID".into(), "DEVICES".into()]];
    let mut problems = Vec::new();
    for (name, status, error) in &rows {
        table.push(match (status, error) {
            (Some(s), _) => [
                name.clone(),
                s.state.to_string(),
                s.pid.to_string(),
                s.devices.iter().map(|d| d.name.clone()).collect::<Vec<_>>().join(" "),
            ],
            (None, Some(e)) => {
                problems.push(e.clone());
                [name.clone(), "invalid".into(), "-".into(), "-".into()]
            }
            (None, None) => [name.clone(), "inactive".into(), "-".into(), "-".into()],
        });
    }
    print_table(&table);
    for p in problems {
        println!("invalid: {p}");
    }
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

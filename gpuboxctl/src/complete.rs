//! Shell completion: clap_complete's dynamic engine, so that the shell asks `gpuboxctl` itself
//! (`COMPLETE=bash gpuboxctl …`) and names and selectors come from this host as it is now:
//! running containers, definitions, and the selectors of its GPUs.

use clap_complete::engine::{ArgValueCandidates, CompletionCandidate};
use gpubox_definition::SearchPath;

/// The environment variable the registration scripts call us with.
pub const VAR: &str = "COMPLETE";

/// Names of running containers (what `exec`, `attach` and `status` take).
pub fn running_names() -> ArgValueCandidates {
    ArgValueCandidates::new(|| gpubox_control::running().into_iter().map(CompletionCandidate::new).collect())
}

/// Definitions that are not masked, and running containers (what `logs` and `validate` take).
pub fn definition_names() -> ArgValueCandidates {
    ArgValueCandidates::new(|| {
        let mut names: Vec<String> = SearchPath::from_env()
            .discover()
            .map(|all| all.into_iter().filter(|s| !s.masked).map(|s| s.name).collect())
            .unwrap_or_default();
        names.extend(gpubox_control::running());
        names.sort();
        names.dedup();
        names.into_iter().map(CompletionCandidate::new).collect()
    })
}

/// Every selector that names a GPU of this host, and `all`.
pub fn selectors() -> ArgValueCandidates {
    ArgValueCandidates::new(|| {
        let inventory = gpubox_devices::Inventory::discover();
        std::iter::once("all".to_owned())
            .chain(inventory.gpus.iter().flat_map(gpubox_devices::select::selector_forms))
            .chain(inventory.cdi.devices().into_iter().map(|(q, _, _)| format!("cdi:{q}")))
            .map(CompletionCandidate::new)
            .collect()
    })
}

/// The script that makes `shell` ask us: `gpuboxctl completions bash > …/gpuboxctl`.
pub fn registration(shell: &str, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let shells = clap_complete::env::Shells::builtins();
    let completer = shells.completer(shell).ok_or_else(|| {
        anyhow::anyhow!("unknown shell '{shell}'; one of {}", shells.names().collect::<Vec<_>>().join(", "))
    })?;
    completer.write_registration(VAR, "gpuboxctl", "gpuboxctl", "gpuboxctl", out)?;
    Ok(())
}

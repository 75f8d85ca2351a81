//! `gpuboxctl image` as an admin uses it (issue #14): import an OCI layout, pull from a real
//! registry (Debian's docker-registry, pushed to with skopeo), list with sizes shared and
//! unique and who runs from an image, remove refused while in use, prune freeing what no
//! image names. Needs root (the store is root's); skipped with a message without it.

#[path = "../../supervisor/tests/common/oci.rs"]
mod oci;
#[path = "../../supervisor/tests/common/registry.rs"]
mod registry;

use serde_json::{json, Value};
use std::path::Path;
use std::process::{Command, Stdio};

const CTL: &str = env!("CARGO_BIN_EXE_gpuboxctl");

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(std::env::var_os("GPUBOX_REQUIRE_PRIVILEGED").is_none(), "privileged tests need root");
    eprintln!("skipping: the image store is root's");
    false
}

fn image(store: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(CTL).arg("image").args(args).env("GPUBOX_STORE", store).output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn listed(store: &Path) -> Vec<Value> {
    let (code, out, err) = image(store, &["list", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().clone()
}

#[test]
fn import_pull_list_remove_prune() {
    if !root() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let layers = oci::two_layers(dir.path());
    let config = json!({"Cmd": ["/bin/sh", "-c", "sleep 30"]});
    let layout = oci::layout(&dir.path().join("layout"), "v1", &layers, config.clone(), true);
    // A second image sharing the first one's base layer.
    let other = oci::layout(&dir.path().join("other"), "v2", &layers[..1], config, true);

    let (code, out, err) = image(&store, &["import", layout.to_str().unwrap(), "--tag", "v1"]);
    assert_eq!(code, 0, "{err}");
    let name = format!("oci:{}:v1", layout.display());
    assert!(out.starts_with(&name), "{out}");
    assert!(err.contains("layer 2/2: fetching ") && err.contains("layer 2/2: unpacked"), "progress: {err}");
    let (code, _, err) = image(&store, &["pull", &format!("oci:{}:v2", other.display())]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("layer 1/1: in the store already"), "the shared layer is not fetched again: {err}");

    let Some(registry) = registry::Registry::start() else { return };
    let reference = registry.push(&layout, "v1", "team/job");
    let (code, _, err) = image(&store, &["pull", &reference]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(err.matches("in the store already").count(), 2, "{err}");

    let list = listed(&store);
    assert_eq!(list.len(), 3, "{list:?}");
    let entry = |n: &str| list.iter().find(|i| i["name"] == n).unwrap().clone();
    let (mine, theirs) = (entry(&name), entry(&format!("oci:{}:v2", other.display())));
    assert_eq!(mine["layers"].as_array().unwrap().len(), 2);
    // Every layer of the layout image is shared (the registry's copy has the same ones).
    assert_eq!(mine["unique"], 0, "{mine}");
    assert!(mine["size"].as_u64().unwrap() > theirs["size"].as_u64().unwrap());

    // In use while a container runs from it: listed, and not removable.
    let def = dir.path().join("user.gpubox");
    std::fs::write(&def, format!("[Container]\nImage={reference}\n")).unwrap();
    let supervisor = Path::new(CTL).with_file_name("gpubox-supervisor");
    let mut running = Command::new(&supervisor)
        .args(["run", "--definition"])
        .arg(&def)
        .env("GPUBOX_STORE", &store)
        .env("GPUBOX_STOP_TIMEOUT", "0.5")
        .env_remove("INVOCATION_ID")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while !Path::new("/run/gpubox/user/control").exists() {
        assert!(t.elapsed().as_secs() < 30, "the container did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let users = listed(&store).into_iter().find(|i| i["name"] == reference.as_str()).unwrap()["in_use_by"].clone();
    assert_eq!(users, json!(["user"]));
    let (code, _, err) = image(&store, &["rm", &reference]);
    assert_eq!(code, 1);
    assert!(err.contains("in use by running container(s) user"), "{err}");
    let _ = Command::new("kill").arg(running.id().to_string()).status();
    running.wait().unwrap();

    // Removed by the name Image= takes; the layers go at the prune, the shared one stays.
    for n in [reference.as_str(), name.as_str()] {
        let (code, out, err) = image(&store, &["rm", n]);
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("removed"), "{out}");
    }
    let (code, out, err) = image(&store, &["prune", "--json"]);
    assert_eq!(code, 0, "{err}");
    let freed: Value = serde_json::from_str(&out).unwrap();
    assert!(freed["freed"].as_u64().unwrap() > 0, "{out}");
    let left = std::fs::read_dir(store.join("layers")).unwrap().filter(|e| e.as_ref().unwrap().path().is_dir()).count();
    assert_eq!(left, 1, "only the layer the remaining image names stays");
    let (code, _, err) = image(&store, &["rm", "nothing:here"]);
    assert_eq!(code, 1);
    assert!(err.contains("no such image"), "{err}");
}

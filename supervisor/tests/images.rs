//! Issue #14, images as users have them: `Image=` from an OCI layout, a `docker save` archive
//! and a real registry (the CNCF distribution registry, pushed to with skopeo); the image's
//! config as defaults; layers stacked by overlayfs under a writable layer that an ephemeral
//! container loses and a kept one keeps; ownership as seen from inside under the default user
//! namespace; whiteouts; the image never modified; a hostile layer refused with nothing left
//! half-written; `Pull=never` and an unreachable registry failing clearly. Privileged.

mod common;

use common::oci;
use common::*;
use serde_json::json;
use std::fs;
use std::path::{Path, PathBuf};

/// A store of the test's own: `GPUBOX_STORE`.
struct Store(tempfile::TempDir);

impl Store {
    fn new() -> Store {
        Store(tempfile::tempdir().unwrap())
    }
    fn env(&self) -> Vec<(&'static str, &std::ffi::OsStr)> {
        vec![("GPUBOX_STORE", self.0.path().as_os_str())]
    }
    fn layers(&self) -> Vec<String> {
        let dir = self.0.path().join("layers");
        let mut names: Vec<String> = fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        names.sort();
        names
    }
    fn images(&self) -> usize {
        fs::read_dir(self.0.path().join("images")).map(|d| d.count()).unwrap_or(0)
    }
}

const REPORT: &str = "echo id=$(id -u); echo pwd=$(pwd); echo greeting=$GREETING; echo from_image=$FROM_IMAGE; \
    echo motd=$(cat /etc/motd); echo gone=$(test -e /etc/gone && echo there || echo absent); \
    echo old=$(test -e /var/cache/old && echo there || echo absent); echo new=$(cat /var/cache/new); \
    echo root=$(stat -c %u:%g /root); echo notes=$(stat -c %u:%g /home/u/notes); \
    echo stale=$(test -e /stale && echo there || echo absent); \
    echo volatile=$(grep ' / / ' /proc/self/mountinfo | grep -c volatile); \
    mkdir /root/.cache && echo made=yes; echo kept=$(cat /root/kept 2>/dev/null || echo none); echo was-here > /root/kept";

fn image_config() -> serde_json::Value {
    json!({
        "Env": ["PATH=/bin:/usr/bin", "GREETING=from the image", "FROM_IMAGE=1"],
        "Cmd": ["/bin/sh", "-c", REPORT],
        "WorkingDir": "/home/u"
    })
}

fn run_image(store: &Store, dir: &Path, name: &str, body: &str) -> Run {
    run_file(&definition(dir, name, &format!("[Container]\n{body}")), &store.env())
}

#[test]
fn an_oci_layout_runs_with_its_config_its_layers_and_its_ownership() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    let layers = oci::two_layers(dir.path());
    let layout = oci::layout(&dir.path().join("layout"), "v1", &layers, image_config(), true);
    let name = format!("img{}", std::process::id());
    let body = format!("Image=oci:{}:v1\nEnvironment=GREETING=override\n", layout.display());
    let r = run_image(&store, dir.path(), &name, &body);
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    // The image's command, working directory and environment, Environment= over it.
    assert_eq!(value(&r, "pwd"), "/home/u");
    assert_eq!(value(&r, "greeting"), "override");
    assert_eq!(value(&r, "from_image"), "1");
    // Its layers stacked, whiteouts and opaque directories honoured.
    assert_eq!(value(&r, "motd"), "from the top layer");
    assert_eq!(value(&r, "gone"), "absent");
    assert_eq!(value(&r, "old"), "absent");
    assert_eq!(value(&r, "new"), "fresh");
    // Under the default user namespace, ownership as seen from inside; root can write.
    assert_eq!(value(&r, "id"), "0");
    assert_eq!(value(&r, "root"), "0:0");
    assert_eq!(value(&r, "notes"), "1000:1000");
    assert_eq!(value(&r, "made"), "yes");
    assert_eq!(value(&r, "kept"), "none");
    assert!(r.err.contains("2 layers"), "the fetch is logged: {}", r.err);
    // Ephemeral: mounted volatile (no sync of what is thrown away), emptied at the end.
    assert_eq!(value(&r, "volatile"), "1");
    let container = store.0.path().join("containers").join(&name);
    let left = fs::read_dir(container.join("upper")).map_or(0, |d| d.count());
    assert_eq!(left, 0, "the writable layer was not emptied");
    assert!(!container.join("work").exists(), "the volatile work directory stayed");
    // Each layer unpacked once into the store; the image itself never written to.
    assert_eq!(store.layers().iter().filter(|l| !l.ends_with(".json")).count(), 2);
    for layer in store.layers().iter().filter(|l| !l.ends_with(".json")) {
        assert!(!store.0.path().join("layers").join(layer).join("root/kept").exists(), "a layer was written to");
    }
    // Ephemeral (the default): the next start begins from the image again, fetching nothing,
    // even after a container that was killed left its writes and its volatile work directory.
    fs::create_dir_all(container.join("upper")).unwrap();
    fs::write(container.join("upper/stale"), "left by a killed container").unwrap();
    fs::create_dir_all(container.join("work/work/incompat/volatile")).unwrap();
    let again = run_image(&store, dir.path(), &name, &body);
    assert_eq!(value(&again, "kept"), "none", "{}", again.err);
    assert_eq!(value(&again, "stale"), "absent");
    assert!(!again.err.contains("fetching"), "Pull=missing fetched an image the store has: {}", again.err);
    assert!(!store.0.path().join("containers").join(&name).join("upper/root").exists(), "the writable layer stayed");

    // Ephemeral=no: what the container wrote is there at its next start.
    let kept = format!("{body}Ephemeral=no\n");
    let first = run_image(&store, dir.path(), &name, &kept);
    assert_eq!(value(&first, "kept"), "none", "{}", first.err);
    assert_eq!(value(&first, "volatile"), "0", "a kept writable layer is synced as any file system");
    let second = run_image(&store, dir.path(), &name, &kept);
    assert_eq!(value(&second, "kept"), "was-here", "{}", second.err);
    // Host-root-owned as the container's root wrote it (idmapped writable layer).
    let written = fs::metadata(store.0.path().join("containers").join(&name).join("upper/root/kept")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&written), 0);
}

#[test]
fn exec_replaces_the_images_cmd_and_user_namespace_host_works_too() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    let layers = oci::two_layers(dir.path());
    let config = json!({"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo cmd=image"], "User": "1000"});
    let layout = oci::layout(&dir.path().join("layout"), "v1", &layers, config, false);
    let body = format!("Image=oci:{}:v1\nExec='echo cmd=exec uid=$(id -u)'\nUserNamespace=host\n", layout.display());
    let r = run_image(&store, dir.path(), &format!("exe{}", std::process::id()), &body);
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    assert_eq!(value(&r, "cmd"), "exec uid=1000", "Exec= replaces Cmd after the Entrypoint; User from the image");
}

/// Overlayfs's options are one page: an image with many layers (Docker builds at most 127;
/// the layers' names leave room for about 400) must not run out of it, with or without the
/// user namespace.
#[test]
fn an_image_of_many_layers_runs() {
    if !privileged() {
        return;
    }
    const LAYERS: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    let mut layers = vec![oci::tar_of(&busybox_root(&dir.path().join("base")))];
    for i in 1..LAYERS {
        layers.push(oci::layer_of(&[(&format!("layers/{i}"), b"")]));
    }
    let config = json!({"Cmd": ["/bin/sh", "-c", "echo files=$(ls /layers | wc -l)"]});
    let layout = oci::layout(&dir.path().join("layout"), "v1", &layers, config, false);
    for userns in ["", "UserNamespace=host\n"] {
        let body = format!("Image=oci:{}:v1\n{userns}", layout.display());
        let r = run_image(&store, dir.path(), &format!("many{}", std::process::id()), &body);
        assert_eq!(r.code, 0, "{userns}{}\n{}", r.out, r.err);
        assert_eq!(value(&r, "files"), (LAYERS - 1).to_string(), "{userns}");
    }
}

/// `Pull=missing` with a local image: the store's copy while the layout or archive is as it
/// was, the new image once it changed (as a user rebuilding `oci:DIR:TAG` expects), and the
/// store's copy again when the source is gone.
#[test]
fn a_changed_local_image_is_imported_again() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    let layers = oci::two_layers(dir.path());
    let say = |what: &str| json!({"Cmd": ["/bin/sh", "-c", format!("echo build={what}")]});
    let layout_dir = dir.path().join("layout");
    let archive = dir.path().join("saved.tar");
    for (kind, source) in [("oci", layout_dir.display().to_string()), ("docker-archive", archive.display().to_string())]
    {
        let build = |what: &str| match kind {
            "oci" => drop(oci::layout(&layout_dir, "v1", &layers, say(what), false)),
            _ => oci::docker_archive(&archive, "job:1", &layers, say(what)),
        };
        let image = if kind == "oci" { format!("oci:{source}:v1") } else { format!("docker-archive:{source}") };
        let run = || run_image(&store, dir.path(), &format!("chg{}", std::process::id()), &format!("Image={image}\n"));
        build("one");
        let first = run();
        assert_eq!(value(&first, "build"), "one", "{kind}: {}", first.err);
        let same = run();
        assert_eq!(value(&same, "build"), "one");
        assert!(!same.err.contains("fetching"), "{kind}: an unchanged source was read again: {}", same.err);
        build("two");
        let changed = run();
        assert_eq!(value(&changed, "build"), "two", "{kind}: {}", changed.err);
        assert!(changed.err.contains("changed since it was stored"), "{kind}: {}", changed.err);
        assert!(
            changed.err.contains("layer 1: in the store already"),
            "{kind}: layers were read again: {}",
            changed.err
        );
        if kind == "oci" {
            fs::remove_dir_all(&layout_dir).unwrap();
        } else {
            fs::remove_file(&archive).unwrap();
        }
        let gone = run();
        assert_eq!(value(&gone, "build"), "two", "{kind}: the source gone, the store's copy runs: {}", gone.err);
    }
}

/// overlayfs's `index` default set to Y (as `overlay.index=Y` or a kernel built with it sets
/// it) while this lives, then back. With the index, overlayfs ties an upper layer to the lower
/// layers it was first mounted on, and refuses it over others ("failed to verify upper root
/// origin"), unless the mount says `index=off`.
struct OverlayIndexOn(String);

impl OverlayIndexOn {
    const PARAMETER: &'static str = "/sys/module/overlay/parameters/index";

    fn set() -> Option<OverlayIndexOn> {
        let before = fs::read_to_string(Self::PARAMETER).ok()?;
        fs::write(Self::PARAMETER, "Y").ok()?;
        Some(OverlayIndexOn(before))
    }
}

impl Drop for OverlayIndexOn {
    fn drop(&mut self) {
        let _ = fs::write(Self::PARAMETER, self.0.trim());
    }
}

/// `Ephemeral=no` keeps the writable layer by the container's name: when the image under it
/// changes layers, the start says so (what it holds hides the new image's files of its paths),
/// and it mounts over the new layers even on a host whose overlayfs indexes by default (the
/// other tests of this file mount their overlays with `index=off` too, so the setting, global,
/// does not change them).
#[test]
fn a_kept_writable_layer_over_other_layers_is_warned_of() {
    if !privileged() {
        return;
    }
    let _index = OverlayIndexOn::set();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    let mut layers = oci::two_layers(dir.path());
    let layout = dir.path().join("layout");
    let config = || json!({"Cmd": ["/bin/sh", "-c", "echo x > /kept"]});
    oci::layout(&layout, "v1", &layers, config(), false);
    let body = format!("Image=oci:{}:v1\nEphemeral=no\n", layout.display());
    let keep = || run_image(&store, dir.path(), &format!("kep{}", std::process::id()), &body);
    for _ in 0..2 {
        let r = keep();
        assert_eq!(r.code, 0, "{}", r.err);
        assert!(!r.err.contains("made over other layers"), "{}", r.err);
    }
    layers.push(big_layer());
    oci::layout(&layout, "v1", &layers, config(), false);
    let r = keep();
    assert_eq!(r.code, 0, "{}", r.err);
    assert!(r.err.contains("was made over other layers"), "no warning: {}", r.err);
    assert!(!keep().err.contains("made over other layers"), "warned again");
}

#[test]
fn a_docker_save_archive_runs() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    let layers = oci::two_layers(dir.path());
    let archive = dir.path().join("saved.tar");
    oci::docker_archive(&archive, "job:1", &layers, image_config());
    let r = run_image(
        &store,
        dir.path(),
        &format!("dar{}", std::process::id()),
        &format!("Image=docker-archive:{}\n", archive.display()),
    );
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    assert_eq!(value(&r, "motd"), "from the top layer");
    assert_eq!(value(&r, "made"), "yes");
}

#[test]
fn a_hostile_layer_is_refused_and_leaves_nothing_behind() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let base = oci::tar_of(&busybox_root(&dir.path().join("base")));
    // A link to a host directory, then a file written through it.
    let mut evil = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_path("escape").unwrap();
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_link_name(&outside).unwrap();
    h.set_size(0);
    h.set_cksum();
    evil.append(&h, &[][..]).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_path("escape/planted").unwrap();
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    evil.append(&h, &b"x"[..]).unwrap();
    let layers = vec![base, evil.into_inner().unwrap()];
    let layout = oci::layout(&dir.path().join("layout"), "v1", &layers, json!({"Cmd": ["/bin/true"]}), false);
    let r = run_image(
        &store,
        dir.path(),
        &format!("evl{}", std::process::id()),
        &format!("Image=oci:{}:v1\n", layout.display()),
    );
    assert_eq!(r.code, 125, "{}\n{}", r.out, r.err);
    assert!(r.err.contains("layer 2"), "names the layer: {}", r.err);
    assert!(!outside.join("planted").exists(), "the layer wrote outside itself");
    // The good layer may stay (it is whole); no image was named, no half layer kept.
    assert_eq!(store.images(), 0);
    assert!(store.layers().iter().filter(|l| !l.ends_with(".json")).count() <= 1);
    assert_eq!(fs::read_dir(store.0.path().join("tmp")).unwrap().count(), 0, "work left in tmp/");

    // A blob that does not match its digest: refused as damaged.
    let layout2 = oci::layout(&dir.path().join("layout2"), "v1", &layers[..1], json!({"Cmd": ["/bin/true"]}), true);
    let blobs: Vec<PathBuf> = fs::read_dir(layout2.join("blobs/sha256")).unwrap().flatten().map(|e| e.path()).collect();
    let biggest = blobs.iter().max_by_key(|p| fs::metadata(p).unwrap().len()).unwrap();
    let mut bytes = fs::read(biggest).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(biggest, bytes).unwrap();
    let store2 = Store::new();
    let r = run_image(
        &store2,
        dir.path(),
        &format!("dmg{}", std::process::id()),
        &format!("Image=oci:{}:v1\n", layout2.display()),
    );
    assert_eq!(r.code, 125, "{}\n{}", r.out, r.err);
    assert!(r.err.contains("digest mismatch") || r.err.contains("layer 1"), "{}", r.err);
    assert_eq!(store2.images(), 0);
    assert_eq!(store2.layers().iter().filter(|l| !l.ends_with(".json")).count(), 0);
}

#[test]
fn pull_never_and_an_unreachable_registry_fail_clearly() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    let r = run_image(
        &store,
        dir.path(),
        &format!("nev{}", std::process::id()),
        "Image=busybox:1.36\nPull=never\nExec=/bin/true\n",
    );
    assert_eq!(r.code, 125);
    assert!(r.err.contains("docker.io/library/busybox:1.36: not in the store, and Pull=never"), "{}", r.err);
    // Nothing listens on port 1 of the loopback address: offline, as far as the pull can tell.
    let r = run_image(
        &store,
        dir.path(),
        &format!("off{}", std::process::id()),
        "Image=127.0.0.1:1/job:1\nExec=/bin/true\n",
    );
    assert_eq!(r.code, 125);
    assert!(r.err.contains("127.0.0.1:1/job:1") && r.err.contains("getting the manifest"), "{}", r.err);
    assert_eq!(store.images(), 0);
}

/// A stop (SIGTERM, as `systemctl stop` sends) while the image is being fetched, from a
/// registry that never answers and from an archive that stalls three quarters in (a FIFO, as a slow
/// network file system would): the fetch ends with its supervisor, which exits as stopped
/// (128+15 standalone), and the store keeps nothing of it, not even the half-unpacked layer.
#[test]
fn a_stop_during_a_fetch_ends_it_and_keeps_nothing() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (asked, registry_asked) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            held.push(c);
            let _ = asked.send(());
        }
    });
    stop_while_fetching(&store, dir.path(), &format!("127.0.0.1:{port}/job:1"), registry_asked);

    let fifo = dir.path().join("stalled.tar");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let layers = vec![oci::tar_of(&busybox_root(&dir.path().join("base"))), big_layer()];
    let whole = dir.path().join("whole.tar");
    oci::docker_archive(&whole, "job:1", &layers, json!({"Cmd": ["/bin/true"]}));
    let bytes = fs::read(&whole).unwrap();
    let (written, archive_half_read) = std::sync::mpsc::channel();
    let writer_fifo = fifo.clone();
    std::thread::spawn(move || {
        let mut f = fs::OpenOptions::new().write(true).open(writer_fifo).unwrap();
        std::io::Write::write_all(&mut f, &bytes[..bytes.len() * 3 / 4]).unwrap();
        let _ = written.send(());
        // Held open, never finished: the reader waits.
        std::thread::sleep(std::time::Duration::from_secs(30));
    });
    stop_while_fetching(&store, dir.path(), &format!("docker-archive:{}", fifo.display()), archive_half_read);
}

/// A layer of one 4 MiB file: much more than a pipe holds, so its reader is inside it when
/// the writer stalls.
fn big_layer() -> Vec<u8> {
    let data: Vec<u8> = (0u32..(1 << 20)).flat_map(u32::to_le_bytes).collect();
    oci::layer_of(&[("data/big", &data)])
}

/// Starts a container of `image`, waits until `fetching` says the fetch is under way, stops
/// it, and checks how it ended.
fn stop_while_fetching(store: &Store, dir: &Path, image: &str, fetching: std::sync::mpsc::Receiver<()>) {
    let name = format!("stp{}", std::process::id());
    let path = definition(dir, &name, &format!("[Container]\nImage={image}\nExec=/bin/true\n"));
    let mut supervisor = std::process::Command::new(SUPERVISOR)
        .args(["run", "--definition"])
        .arg(&path)
        .env_remove("INVOCATION_ID")
        .env_remove("NOTIFY_SOCKET")
        .envs(store.env())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    fetching.recv_timeout(std::time::Duration::from_secs(10)).expect("the fetch never started");
    let tmp = store.0.path().join("tmp");
    let pid = nix::unistd::Pid::from_raw(supervisor.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let status = loop {
        if let Some(status) = supervisor.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "{image}: the supervisor did not stop within 10 s of SIGTERM");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut supervisor.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(128 + 15), "{image}: {err}");
    assert!(err.contains("fetching the image"), "{image}: {err}");
    assert_eq!(store.images(), 0, "{image}");
    let left: Vec<_> = fs::read_dir(&tmp).unwrap().flatten().map(|e| e.path()).collect();
    assert!(left.is_empty(), "{image}: work of the fetch was left: {left:?}");
}

/// A real registry on the loopback address (the distribution registry Docker Hub runs),
/// the image pushed there by skopeo from an OCI layout, and pulled by `Image=`.
#[test]
fn an_image_is_pulled_from_a_real_registry() {
    if !privileged() {
        return;
    }
    let Some(registry) = common::registry::Registry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    let layers = oci::two_layers(dir.path());
    let layout = oci::layout(&dir.path().join("layout"), "v1", &layers, image_config(), true);
    let reference = registry.push(&layout, "v1", "team/job");
    let name = format!("reg{}", std::process::id());
    let r = run_image(&store, dir.path(), &name, &format!("Image={reference}\n"));
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    assert_eq!(value(&r, "motd"), "from the top layer");
    assert_eq!(value(&r, "notes"), "1000:1000");
    // Pull=always fetches the manifest again but no layer the store has.
    let r = run_image(&store, dir.path(), &name, &format!("Image=docker://{reference}\nPull=always\n"));
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    assert_eq!(r.err.matches("in the store already").count(), 2, "{}", r.err);
}

/// `Pull=newer`: each start takes a newer image pushed under the tag, and starts with the
/// store's copy where the registry cannot be reached (where `Pull=always` fails).
#[test]
fn pull_newer_takes_a_newer_image_and_starts_without_the_registry() {
    if !privileged() {
        return;
    }
    let Some(registry) = common::registry::Registry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    let mut layers = oci::two_layers(dir.path());
    let layout = oci::layout(&dir.path().join("layout"), "v1", &layers, image_config(), true);
    let reference = registry.push(&layout, "v1", "team/newer");
    let name = format!("newer{}", std::process::id());
    let body = format!("Image={reference}\nPull=newer\n");
    let r = run_image(&store, dir.path(), &name, &body);
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    assert_eq!(value(&r, "motd"), "from the top layer");
    // A newer image under the same tag: one more layer, and only it is fetched.
    layers.push(oci::layer_of(&[("etc/motd", b"newer")]));
    let newer = oci::layout(&dir.path().join("newer"), "v1", &layers, image_config(), true);
    registry.push(&newer, "v1", "team/newer");
    let r = run_image(&store, dir.path(), &name, &body);
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    assert_eq!(value(&r, "motd"), "newer");
    assert_eq!(r.err.matches("in the store already").count(), 2, "{}", r.err);
    // The registry gone: the store's copy, said so; Pull=always fails.
    drop(registry);
    let r = run_image(&store, dir.path(), &name, &body);
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    assert_eq!(value(&r, "motd"), "newer");
    assert!(r.err.contains("Pull=newer: starting with the image the store has"), "{}", r.err);
    let r = run_image(&store, dir.path(), &name, &format!("Image={reference}\nPull=always\n"));
    assert_eq!(r.code, 125, "{}\n{}", r.out, r.err);
    assert!(r.err.contains("getting the manifest"), "{}", r.err);
}

/// A pull shows its download as it comes (every 8 MiB), then the unpacking, then the end: what
/// `gpuboxctl image pull` shows on a terminal, for layers that take minutes.
#[test]
fn a_pull_reports_its_download_as_it_comes() {
    if !privileged() {
        return;
    }
    let Some(registry) = common::registry::Registry::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    let mut x: u32 = 1;
    let noise: Vec<u8> = (0..20 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let layers = vec![oci::tar_of(&busybox_root(&dir.path().join("base"))), oci::layer_of(&[("data/noise", &noise)])];
    let layout = oci::layout(&dir.path().join("layout"), "v1", &layers, json!({"Cmd": ["/bin/true"]}), false);
    let reference: gpubox_images::ImageRef = registry.push(&layout, "v1", "team/big").parse().unwrap();
    let mut seen = Vec::new();
    let stored = gpubox_images::Store::open(store.0.path()).unwrap();
    gpubox_images::fetch(&stored, &reference, &mut |p| seen.push(p)).unwrap();
    use gpubox_images::Progress::{Fetching, Unpacked, Unpacking};
    let of_layer_2: Vec<_> = seen
        .iter()
        .filter(|p| matches!(p, Fetching { index: 2, .. } | Unpacking { index: 2 } | Unpacked { index: 2, .. }))
        .collect();
    // As the registry has the blob (skopeo compresses it on the push).
    let Some(Fetching { total: Some(total), .. }) = of_layer_2.first() else { panic!("{of_layer_2:?}") };
    let total = *total;
    let dones: Vec<u64> =
        of_layer_2.iter().filter_map(|p| if let Fetching { done, .. } = p { Some(*done) } else { None }).collect();
    assert_eq!(dones.first(), Some(&0), "{of_layer_2:?}");
    assert_eq!(dones.last(), Some(&total), "{of_layer_2:?}");
    assert!(dones.iter().any(|&d| d > 0 && d < total), "no progress while downloading: {of_layer_2:?}");
    assert!(dones.windows(2).all(|w| w[0] < w[1]), "{dones:?}");
    assert!(
        matches!(of_layer_2[of_layer_2.len() - 2..], [Unpacking { index: 2 }, Unpacked { index: 2, .. }]),
        "{of_layer_2:?}"
    );
}

/// Two containers of one image at once: each writes in its own writable layer and sees only
/// its own writes; the layers' bytes, modes and owners are the same after as before.
#[test]
fn two_containers_of_one_image_do_not_see_each_other_and_the_layers_stay_unchanged() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let store = Store::new();
    let layers = oci::two_layers(dir.path());
    let config = json!({"Cmd": ["/bin/sh", "-c",
        "echo $NAME > /etc/motd; echo mine > /root/$NAME; sleep 0.5; echo motd=$(cat /etc/motd); ls /root > /tmp/l; echo seen=$(cat /tmp/l | tr '\\n' ,)"]});
    let layout = oci::layout(&dir.path().join("layout"), "v1", &layers, config, true);
    // Fetched once first, so that the tree can be taken before the containers write.
    let first = run_image(
        &store,
        dir.path(),
        &format!("pre{}", std::process::id()),
        &format!("Image=oci:{}:v1\nEnvironment=NAME=pre\n", layout.display()),
    );
    assert_eq!(first.code, 0, "{}", first.err);
    let before = tree_of(&store.0.path().join("layers"));
    let runs: Vec<Run> = ["a", "b"]
        .map(|n| {
            let (store_dir, dir, layout) = (store.0.path().to_owned(), dir.path().to_owned(), layout.clone());
            std::thread::spawn(move || {
                let name = format!("two{n}{}", std::process::id());
                let text = format!("[Container]\nImage=oci:{}:v1\nEnvironment=NAME={n}\n", layout.display());
                run_file(&definition(&dir, &name, &text), &[("GPUBOX_STORE", store_dir.as_os_str())])
            })
        })
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect();
    for (r, n) in runs.iter().zip(["a", "b"]) {
        assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
        assert_eq!(value(r, "motd"), n, "each sees its own /etc/motd");
        assert_eq!(value(r, "seen"), format!("{n},"), "each sees only its own files in /root");
    }
    assert_eq!(tree_of(&store.0.path().join("layers")), before, "a layer changed");
}

/// Every entry under `dir`: path, type, mode, owner and content, sorted.
fn tree_of(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap().flatten() {
            let m = fs::symlink_metadata(e.path()).unwrap();
            let content = if m.is_file() { oci::sha256(&fs::read(e.path()).unwrap()) } else { String::new() };
            out.push(format!("{} {:o} {}:{} {content}", e.path().display(), m.mode(), m.uid(), m.gid()));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    out.sort();
    out
}

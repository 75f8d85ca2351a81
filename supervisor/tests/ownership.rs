//! Issue #14, roots as users have them: a tree made by host root (as every unpacked image is)
//! keeps its ownership under the default user namespace, by idmapped mounts: a file of host
//! root is root's inside, a file of uid 1000 stays 1000's, container root can write where
//! host root could, and what it writes lands on the host as host root. `Bind=…:idmap` the
//! same; a file system that cannot be idmapped is a clear error. `/dev/shm` is larger than
//! Docker's 64 MiB by default, and `ShmSize=` sets it. Privileged.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

/// A root as an image has it: root's, /root 0700, a user's home owned by that user.
fn image_like_root(parent: &std::path::Path) -> std::path::PathBuf {
    let root = busybox_root(parent);
    for d in ["root", "home/u", "srv"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::set_permissions(root.join("root"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(root.join("home/u/notes"), "mine").unwrap();
    nix::unistd::chown(&root.join("home/u"), Some(1000.into()), Some(1000.into())).unwrap();
    nix::unistd::chown(&root.join("home/u/notes"), Some(1000.into()), Some(1000.into())).unwrap();
    root
}

#[test]
fn a_root_made_by_host_root_is_roots_inside_and_writes_land_as_host_root() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = image_like_root(dir.path());
    let before = fs::metadata(root.join("home/u/notes")).unwrap();
    let r = run(&format!(
        "[Container]\nRootDirectory={}\nExec=/bin/sh -c 'echo id=$(id -u); echo root=$(stat -c %%u:%%g /root); \
         echo notes=$(stat -c %%u:%%g /home/u/notes); mkdir /root/.cache && echo made=yes; echo x > /srv/new; \
         echo bin=$(stat -c %%u /bin/busybox)'\n",
        root.display()
    ));
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    assert_eq!(value(&r, "id"), "0");
    assert_eq!(value(&r, "root"), "0:0", "host root's /root is root's inside");
    assert_eq!(value(&r, "notes"), "1000:1000", "uid 1000's file stays 1000's");
    assert_eq!(value(&r, "bin"), "0");
    assert_eq!(value(&r, "made"), "yes", "container root can write where host root could");
    // What it wrote is host root's on the host, and nothing else changed hands.
    let cache = fs::metadata(root.join("root/.cache")).unwrap();
    assert_eq!((cache.uid(), cache.gid()), (0, 0));
    assert_eq!(fs::metadata(root.join("srv/new")).unwrap().uid(), 0);
    let after = fs::metadata(root.join("home/u/notes")).unwrap();
    assert_eq!((after.uid(), after.gid(), after.mode()), (before.uid(), before.gid(), before.mode()));
}

/// `Bind=SRC:DST:idmap` keeps the source's ownership; without `idmap`, host root's directory
/// is not the container root's (it is nobody's inside, and not writable).
#[test]
fn an_idmap_bind_keeps_its_ownership_and_a_plain_one_does_not() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    fs::create_dir(&data).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
    let r = inside(
        // Mount points that the host's / (read-only here) has.
        &format!("Bind={0}:/mnt:idmap {0}:/srv\n", data.display()),
        "echo mapped=$(stat -c %u /mnt); echo plain=$(stat -c %u /srv)\n\
         touch /mnt/a && echo wrote=yes\n\
         touch /srv/b 2>/dev/null && echo plain_wrote=yes || echo plain_wrote=no\n",
    );
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    assert_eq!(value(&r, "mapped"), "0");
    assert_eq!(value(&r, "plain"), "65534");
    assert_eq!(value(&r, "wrote"), "yes");
    assert_eq!(value(&r, "plain_wrote"), "no");
    assert_eq!(fs::metadata(data.join("a")).unwrap().uid(), 0);
}

/// A file system that cannot be idmapped (procfs) is a clear error naming the key, the path
/// and the file system: nothing is chowned to make it fit.
#[test]
fn a_root_that_cannot_be_idmapped_is_a_clear_error() {
    if !privileged() {
        return;
    }
    let r = run("[Container]\nRootDirectory=/proc/sys\nExec=/bin/true\n");
    assert_eq!(r.code, 125, "{}", r.err);
    assert!(r.err.contains("RootDirectory=/proc/sys: its file system (proc) cannot be idmapped"), "{}", r.err);
}

/// `/dev/shm`: half the memory by default (tmpfs's own default, the host's /dev/shm), not
/// Docker's 64 MiB; `ShmSize=` sets it.
#[test]
fn dev_shm_is_large_by_default_and_sized_by_shm_size() {
    if !privileged() {
        return;
    }
    let shm = "echo shm=$(( $(stat -f -c '%b * %S' /dev/shm) / 1024 ))\n";
    let r = inside("", shm);
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    let kib: u64 = value(&r, "shm").parse().unwrap();
    let mem_kib: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(kib > 64 * 1024 && kib.abs_diff(mem_kib / 2) < mem_kib / 50, "{kib} KiB of {mem_kib} KiB");
    let r = inside("ShmSize=8M\n", shm);
    assert_eq!(value(&r, "shm"), "8192");
}

//! An OCI image built by hand, as `skopeo copy … oci:DIR` leaves one: layers (tars, each
//! gzip-compressed when `gzip`), a config, a manifest and an index naming it by `tag`.
#![allow(dead_code)]

use serde_json::json;
use sha2::{Digest, Sha256};
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// A tree as a layer's tar, owners and modes kept, links not followed.
pub fn tar_of(tree: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", tree).unwrap();
    b.into_inner().unwrap()
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, bytes).unwrap();
    gz.finish().unwrap()
}

fn blob(layout: &Path, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    fs::write(layout.join("blobs/sha256").join(&digest[7..]), bytes).unwrap();
    digest
}

/// The config's `config` part (Env, Cmd, …) as given; the rest made to fit the layers.
pub fn config(layers: &[Vec<u8>], config: serde_json::Value) -> Vec<u8> {
    let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
    serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": diff_ids}
    }))
    .unwrap()
}

/// Writes the layout at `layout` and returns it.
pub fn layout(layout: &Path, tag: &str, layers: &[Vec<u8>], config: serde_json::Value, gzip_layers: bool) -> PathBuf {
    fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let config = self::config(layers, config);
    let config_digest = blob(layout, &config);
    let descriptors: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            let stored = if gzip_layers { gzip(l) } else { l.clone() };
            let media = if gzip_layers {
                "application/vnd.oci.image.layer.v1.tar+gzip"
            } else {
                "application/vnd.oci.image.layer.v1.tar"
            };
            json!({"mediaType": media, "digest": blob(layout, &stored), "size": stored.len()})
        })
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descriptors
    }))
    .unwrap();
    let manifest_digest = blob(layout, &manifest);
    let index = json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
                       "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": tag}}]
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    layout.to_owned()
}

/// A layer of regular files (root's, 0644), each at its path with its content.
pub fn layer_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut t = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        t.append(&h, *data).unwrap();
    }
    t.into_inner().unwrap()
}

/// What `docker save` writes (the classic layout): manifest.json, the config, a tar per layer.
pub fn docker_archive(file: &Path, repo_tag: &str, layers: &[Vec<u8>], config: serde_json::Value) {
    let config = self::config(layers, config);
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    let config_name = format!("{}.json", &sha256(&config)[7..]);
    add(&config_name, &config);
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        add(&name, l);
        names.push(name);
    }
    let manifest = json!([{"Config": config_name, "RepoTags": [repo_tag], "Layers": names}]);
    add("manifest.json", &serde_json::to_vec(&manifest).unwrap());
    fs::write(file, b.into_inner().unwrap()).unwrap();
}

/// A busybox tree, as the base layer of an image has it.
pub fn busybox_tree(root: &Path) -> PathBuf {
    for d in ["bin", "proc", "sys", "dev", "tmp", "etc"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox (tests/install-deps installs busybox-static)");
    std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
    fs::set_permissions(root.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    root.to_owned()
}

/// Two layers as an image builder makes them: a base owned by host root (with /root 0700, a
/// user's home of uid 1000, /etc/gone, /var/cache/old) and a layer over it that adds /etc/motd,
/// deletes /etc/gone (a whiteout) and replaces /var/cache (an opaque directory).
pub fn two_layers(dir: &Path) -> Vec<Vec<u8>> {
    let base = busybox_tree(&dir.join("base"));
    for d in ["root", "home/u", "var/cache", "usr/bin"] {
        fs::create_dir_all(base.join(d)).unwrap();
    }
    fs::set_permissions(base.join("root"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(base.join("home/u/notes"), "mine").unwrap();
    for p in ["home/u", "home/u/notes"] {
        std::os::unix::fs::lchown(base.join(p), Some(1000), Some(1000)).unwrap();
    }
    fs::write(base.join("etc/gone"), "deleted above").unwrap();
    fs::write(base.join("var/cache/old"), "hidden above").unwrap();
    fs::write(base.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nu:x:1000:1000::/home/u:/bin/sh\n").unwrap();
    let mut top = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8], kind: tar::EntryType| {
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
        h.set_cksum();
        top.append(&h, data).unwrap();
    };
    add("etc/", b"", tar::EntryType::Directory);
    add("etc/motd", b"from the top layer\n", tar::EntryType::Regular);
    add("etc/.wh.gone", b"", tar::EntryType::Regular);
    add("var/cache/", b"", tar::EntryType::Directory);
    add("var/cache/.wh..wh..opq", b"", tar::EntryType::Regular);
    add("var/cache/new", b"fresh\n", tar::EntryType::Regular);
    vec![tar_of(&base), top.into_inner().unwrap()]
}

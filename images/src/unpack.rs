//! A layer's tar, unpacked once into a directory of the store that overlayfs then stacks.
//!
//! The tar may be gzip or zstd compressed (found by its magic number) or plain, as the OCI
//! image spec allows. Its uncompressed digest, the layer's `diff_id` that the image's config
//! lists, is computed as it is read and checked by the caller before the layer is kept.
//!
//! Nothing in a layer may reach outside it: an entry with `..` or an absolute path, a hard
//! link out of the layer, or a path that goes through a link is refused (the `tar` crate's
//! `unpack_in` checks the last two; the first is checked here, because the crate skips such
//! entries silently). OCI whiteouts become overlayfs's own: `.wh.NAME` a 0/0 character device
//! at NAME, `.wh..wh..opq` the `trusted.overlay.opaque` attribute on its directory; `trusted.*`
//! attributes in the tar itself are refused, since they would be overlayfs's to read.

use crate::digest::{Digest, Digesting};
use crate::error::chain;
use crate::Error;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// What unpacking a layer gave: its uncompressed digest and the bytes of its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    pub diff_id: Digest,
    pub size: u64,
}

/// Unpacks the (possibly compressed) tar `layer` into `dest`, an empty directory.
pub fn unpack_layer(layer: impl Read, dest: &Path) -> Result<Unpacked, Error> {
    let dest = dest.canonicalize().map_err(|e| Error::io(dest, e))?;
    let mut compressed = BufReader::with_capacity(1 << 20, layer);
    let magic = compressed.fill_buf().map_err(|e| Error::io(&dest, e))?;
    let tar: Box<dyn Read> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::GzDecoder::new(compressed))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(compressed).map_err(|e| Error::io(&dest, e))?)
    } else {
        Box::new(compressed)
    };
    let mut digesting = Digesting::new(tar);
    let mut size = 0;
    {
        let mut archive = tar::Archive::new(&mut digesting);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_preserve_mtime(true);
        archive.set_unpack_xattrs(true);
        archive.set_overwrite(true);
        let entries = archive.entries().map_err(|e| Error::Layer(format!("not a tar: {e}")))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| Error::Layer(format!("reading the tar: {e}")))?;
            let path = entry.path().map_err(|e| Error::Layer(format!("an entry's name: {e}")))?.into_owned();
            let relative = inside(&path)?;
            if entry.header().entry_type().is_hard_link() {
                if let Some(target) = entry.link_name().map_err(|e| Error::Layer(e.to_string()))? {
                    inside(&target).map_err(|_| unsafe_entry(&path, "a hard link out of the layer"))?;
                }
            }
            if let Some(pax) = entry.pax_extensions().map_err(|e| Error::Layer(e.to_string()))? {
                for ext in pax.flatten() {
                    if ext.key_bytes().starts_with(b"SCHILY.xattr.trusted.") {
                        return Err(unsafe_entry(&path, "a trusted.* attribute (overlayfs's own)"));
                    }
                }
            }
            if let Some(name) = relative.file_name().and_then(|n| n.as_bytes().strip_prefix(b".wh.")) {
                let parent = make_dirs(&dest, relative.parent().unwrap_or(Path::new("")), &path)?;
                whiteout(&parent, name, &path)?;
                continue;
            }
            // The tar crate would make special files regular ones: a FIFO is made as such, a
            // 0/0 character device is a whiteout already (overlayfs's own form), and other
            // device nodes are left out: a container's devices are gpubox's to give.
            let kind = entry.header().entry_type();
            if kind.is_fifo() || kind.is_character_special() || kind.is_block_special() {
                let header = entry.header();
                let numbers = (header.device_major().ok().flatten(), header.device_minor().ok().flatten());
                let name = relative.file_name().map(OsStr::as_bytes).unwrap_or_default();
                let parent = make_dirs(&dest, relative.parent().unwrap_or(Path::new("")), &path)?;
                if kind.is_fifo() {
                    let target = parent.join(OsStr::from_bytes(name));
                    let mode = nix::sys::stat::Mode::from_bits_truncate(header.mode().unwrap_or(0o644) & 0o7777);
                    nix::unistd::mkfifo(&target, mode).map_err(|e| Error::io(&target, e.into()))?;
                    let (uid, gid) = (header.uid().unwrap_or(0) as u32, header.gid().unwrap_or(0) as u32);
                    std::os::unix::fs::lchown(&target, Some(uid), Some(gid)).map_err(|e| Error::io(&target, e))?;
                } else if kind.is_character_special() && numbers == (Some(0), Some(0)) {
                    whiteout(&parent, name, &path)?;
                }
                continue;
            }
            size += entry.header().size().unwrap_or(0);
            match entry.unpack_in(&dest) {
                Ok(true) => {}
                Ok(false) => return Err(unsafe_entry(&path, "a path out of the layer")),
                Err(e) => return Err(Error::Layer(format!("{}: {}", path.display(), chain(&e)))),
            }
        }
    }
    let (diff_id, _) = digesting.finish().map_err(|e| Error::Layer(format!("reading the tar: {e}")))?;
    Ok(Unpacked { diff_id, size })
}

/// The entry's path relative to the layer; `..` and absolute paths refused (`./` is fine:
/// `docker save` writes it).
fn inside(path: &Path) -> Result<PathBuf, Error> {
    let mut relative = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(part) => relative.push(part),
            Component::ParentDir => return Err(unsafe_entry(path, "'..' in its path")),
            Component::RootDir | Component::Prefix(_) => return Err(unsafe_entry(path, "an absolute path")),
        }
    }
    Ok(relative)
}

fn unsafe_entry(path: &Path, why: &str) -> Error {
    Error::UnsafeEntry { entry: path.display().to_string(), why: why.to_owned() }
}

/// Makes the directories of `relative` under `dest` that are missing; one that exists must be
/// a directory, not a link (a whiteout's directory may come before its own entry).
fn make_dirs(dest: &Path, relative: &Path, entry: &Path) -> Result<PathBuf, Error> {
    let mut dir = dest.to_owned();
    for part in relative.components() {
        dir.push(part);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(unsafe_entry(entry, "a path through a link or a file")),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir(&dir).map_err(|e| Error::io(&dir, e))?;
            }
            Err(e) => return Err(Error::io(&dir, e)),
        }
    }
    Ok(dir)
}

/// An OCI whiteout as overlayfs has it.
fn whiteout(parent: &Path, name: &[u8], entry: &Path) -> Result<(), Error> {
    if name == b".wh..opq" {
        return xattr::set(parent, "trusted.overlay.opaque", b"y").map_err(|e| Error::io(parent, e));
    }
    if name.is_empty() || name == b"." || name == b".." {
        return Err(unsafe_entry(entry, "a whiteout with no name"));
    }
    let target = parent.join(OsStr::from_bytes(name));
    match std::fs::symlink_metadata(&target) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&target),
        Ok(_) => std::fs::remove_file(&target),
        Err(_) => Ok(()),
    }
    .map_err(|e| Error::io(&target, e))?;
    nix::sys::stat::mknod(&target, nix::sys::stat::SFlag::S_IFCHR, nix::sys::stat::Mode::empty(), 0)
        .map_err(|e| Error::io(&target, e.into()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tar built by hand, entry by entry, as an image builder would write it.
    pub(crate) fn tar_of(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, kind, data, link) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(if *kind == tar::EntryType::Directory { 0o755 } else { 0o644 });
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(data.len() as u64);
            // Set raw, as a hostile tar would have it (the builder refuses '..' itself).
            let name = &mut h.as_old_mut().name;
            name[..path.len()].copy_from_slice(path.as_bytes());
            if let Some(link) = link {
                h.set_link_name(link).unwrap();
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    use tar::EntryType::{Directory as D, Link as L, Regular as F, Symlink as S};

    #[test]
    fn a_layer_unpacks_with_its_digest_compressed_or_not() {
        let tar =
            tar_of(&[("etc/", D, b"", None), ("etc/hostname", F, b"box\n", None), ("bin", S, b"", Some("usr/bin"))]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&tar[..], 1).unwrap();
        for blob in [&tar, &gz, &zst] {
            let dir = tempfile::tempdir().unwrap();
            let u = unpack_layer(&blob[..], dir.path()).unwrap();
            assert_eq!(u.diff_id, Digest::of(&tar));
            assert_eq!(u.size, 4);
            assert_eq!(std::fs::read(dir.path().join("etc/hostname")).unwrap(), b"box\n");
            assert_eq!(std::fs::read_link(dir.path().join("bin")).unwrap(), Path::new("usr/bin"));
        }
    }

    #[test]
    fn entries_out_of_the_layer_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("victim");
        let target = target.to_str().unwrap();
        for (tar, says) in [
            (tar_of(&[("../escape", F, b"x", None)]), "'..'"),
            (tar_of(&[("/etc/escape", F, b"x", None)]), "absolute"),
            (tar_of(&[("link", L, b"", Some("../../etc/passwd"))]), "hard link"),
            (tar_of(&[("dir", S, b"", Some(outside.path().to_str().unwrap())), ("dir/victim", F, b"x", None)]), ""),
            (tar_of(&[("up", S, b"", Some("/")), ("up/.wh.x", F, b"", None)]), "link"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let e = unpack_layer(&tar[..], dir.path()).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
            assert!(!Path::new(target).exists(), "{e}: wrote outside");
        }
    }

    #[test]
    fn whiteouts_become_overlayfs_whiteouts() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: whiteouts need root (mknod, trusted.* attributes)");
            return;
        }
        let tar =
            tar_of(&[("etc/", D, b"", None), ("etc/.wh.motd", F, b"", None), ("var/cache/.wh..wh..opq", F, b"", None)]);
        let dir = tempfile::tempdir().unwrap();
        unpack_layer(&tar[..], dir.path()).unwrap();
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = std::fs::symlink_metadata(dir.path().join("etc/motd")).unwrap();
        assert!(m.file_type().is_char_device() && m.rdev() == 0);
        let opaque = xattr::get(dir.path().join("var/cache"), "trusted.overlay.opaque").unwrap();
        assert_eq!(opaque.as_deref(), Some(&b"y"[..]));
        // Special files: a FIFO kept, a device node left out, a 0/0 device a whiteout as is.
        let special = |path: &str, kind: tar::EntryType, major: u32| {
            let mut h = tar::Header::new_gnu();
            h.set_path(path).unwrap();
            h.set_entry_type(kind);
            h.set_device_major(major).unwrap();
            h.set_device_minor(if major == 0 { 0 } else { 3 }).unwrap();
            h.set_mode(0o600);
            h.set_size(0);
            h.set_uid(0);
            h.set_gid(0);
            h.set_cksum();
            h
        };
        let mut b = tar::Builder::new(Vec::new());
        for h in [
            special("fifo", tar::EntryType::Fifo, 0),
            special("null", tar::EntryType::Char, 1),
            special("gone", tar::EntryType::Char, 0),
        ] {
            b.append(&h, &[][..]).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        unpack_layer(&b.into_inner().unwrap()[..], dir.path()).unwrap();
        assert!(std::fs::symlink_metadata(dir.path().join("fifo")).unwrap().file_type().is_fifo());
        assert!(!dir.path().join("null").exists(), "a device node was made");
        assert_eq!(std::fs::symlink_metadata(dir.path().join("gone")).unwrap().rdev(), 0);
        let trusted = tar_with_xattr("f", "trusted.overlay.redirect", b"/etc");
        assert!(unpack_layer(&trusted[..], tempfile::tempdir().unwrap().path())
            .unwrap_err()
            .to_string()
            .contains("trusted"));
    }

    fn tar_with_xattr(path: &str, key: &str, value: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([(format!("SCHILY.xattr.{key}").as_str(), value)]).unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_path(path).unwrap();
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, &[][..]).unwrap();
        b.into_inner().unwrap()
    }
}

//! Images from files: an OCI image layout (`oci:DIR[:TAG]`, what `skopeo copy … oci:DIR` and
//! `umoci` write), a tar of one (`oci-archive:`), and what `docker save` and `podman save`
//! write (`docker-archive:`, a `manifest.json` listing each image's config and layer tars).
//! Every blob read is checked against its digest as it is read.

use crate::digest::Digest;
use crate::store::{ImageRecord, Store};
use crate::{Error, ImageDefaults, ImageRef, Progress};
use oci_spec::image::{Descriptor, ImageIndex, ImageManifest, MediaType};
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// The annotation an OCI layout names a manifest's tag with.
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// More than any manifest, index or config: a bound on what is read into memory.
const MAX_JSON: u64 = 16 << 20;

pub fn import(store: &Store, image: &ImageRef, progress: &mut dyn FnMut(Progress)) -> Result<ImageRecord, Error> {
    let _lock = store.shared()?;
    // Taken before the source is read: if it changes meanwhile, the next start sees a change.
    let source = source_stamp(image);
    let parts = match image {
        ImageRef::OciLayout { dir, tag } => from_layout(store, image, dir, tag.as_deref(), progress)?,
        ImageRef::OciArchive { file, tag } => {
            let scratch = store.scratch("archive")?;
            extract(file, &scratch.0).map_err(|e| Error::image(image, e.to_string()))?;
            from_layout(store, image, &scratch.0, tag.as_deref(), progress)?
        }
        ImageRef::DockerArchive { file, reference } => {
            let scratch = store.scratch("archive")?;
            extract(file, &scratch.0).map_err(|e| Error::image(image, e.to_string()))?;
            from_docker_archive(store, image, &scratch.0, reference.as_ref().map(|r| r.to_string()), progress)?
        }
        ImageRef::Registry(_) => unreachable!("registries are pulled, not imported"),
    };
    store.name_image(image.name(), parts.manifest, parts.config, parts.layers, source)
}

/// What an image read from a local source is made of, all of it in the store now.
struct Parts {
    manifest: Option<Digest>,
    config: Digest,
    layers: Vec<Digest>,
}

/// What a local image's source is now, cheaply, for `Pull=missing` to see a change since it
/// was stored: an OCI layout's manifest (or index) for the tag, by digest, from `index.json`
/// alone; an archive's size, modification time and inode. None for a registry, or a source
/// that cannot be read (the store's copy is used then).
pub fn source_stamp(image: &ImageRef) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    match image {
        ImageRef::OciLayout { dir, tag } => {
            let index = ImageIndex::from_reader(&read_bounded(&dir.join("index.json")).ok()?[..]).ok()?;
            Some(tagged(&index, tag.as_deref())?.digest().to_string())
        }
        ImageRef::OciArchive { file, .. } | ImageRef::DockerArchive { file, .. } => {
            let m = std::fs::metadata(file).ok()?;
            Some(format!("{} bytes, modified {}.{:09}, inode {}", m.len(), m.mtime(), m.mtime_nsec(), m.ino()))
        }
        ImageRef::Registry(_) => None,
    }
}

/// Whether a local image's source changed since `record` was stored from it.
pub fn changed(record: &ImageRecord, image: &ImageRef) -> bool {
    source_stamp(image).is_some_and(|now| record.source.as_deref() != Some(now.as_str()))
}

/// The manifest (or index) a layout's `index.json` names by `tag`, or its only one untagged.
fn tagged<'a>(index: &'a ImageIndex, tag: Option<&str>) -> Option<&'a Descriptor> {
    let named = |d: &&Descriptor| d.annotations().as_ref().and_then(|a| a.get(REF_NAME)).map(String::as_str) == tag;
    match tag {
        Some(_) => index.manifests().iter().find(named),
        None if index.manifests().len() == 1 => index.manifests().first(),
        None => None,
    }
}

/// The manifest an index offers for this machine (`linux` and its architecture), as
/// `podman pull` picks one; attestation manifests (`unknown/unknown`) are never chosen.
pub fn for_this_machine(manifests: &[Descriptor]) -> Option<&Descriptor> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    };
    manifests.iter().find(|d| {
        d.platform().as_ref().is_some_and(|p| p.os().to_string() == "linux" && p.architecture().to_string() == arch)
    })
}

pub fn is_index(media_type: &MediaType) -> bool {
    matches!(media_type, MediaType::ImageIndex)
        || media_type.to_string() == "application/vnd.docker.distribution.manifest.list.v2+json"
}

fn from_layout(
    store: &Store,
    image: &ImageRef,
    dir: &Path,
    tag: Option<&str>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Parts, Error> {
    let bad = |m: String| Error::image(image, m);
    let index = ImageIndex::from_reader(&read_bounded(&dir.join("index.json"))?[..])
        .map_err(|e| bad(format!("index.json: {e} (is {} an OCI image layout?)", dir.display())))?;
    let mut desc = tagged(&index, tag).cloned().ok_or_else(|| {
        let tags: Vec<&str> = index
            .manifests()
            .iter()
            .filter_map(|d| d.annotations().as_ref()?.get(REF_NAME).map(String::as_str))
            .collect();
        bad(format!(
            "no image {} in the layout (its tags: {})",
            tag.map_or("without a tag".into(), |t| format!("tagged '{t}'")),
            if tags.is_empty() { "none".into() } else { tags.join(", ") }
        ))
    })?;
    let blob = |d: &Descriptor| -> Result<(Digest, Vec<u8>), Error> {
        let digest = Digest::parse(d.digest().as_ref())?;
        let bytes = read_bounded(&dir.join("blobs/sha256").join(digest.hex()))?;
        digest.verify(&format!("{image}: blob {digest}"), &bytes)?;
        Ok((digest, bytes))
    };
    let (manifest_digest, manifest_bytes) = loop {
        let (digest, bytes) = blob(&desc)?;
        if !is_index(desc.media_type()) {
            break (digest, bytes);
        }
        let nested = ImageIndex::from_reader(&bytes[..]).map_err(|e| bad(format!("index {digest}: {e}")))?;
        desc = for_this_machine(nested.manifests())
            .cloned()
            .ok_or_else(|| bad(format!("no manifest for linux/{} in its index", std::env::consts::ARCH)))?;
    };
    let manifest = ImageManifest::from_reader(&manifest_bytes[..]).map_err(|e| bad(format!("manifest: {e}")))?;
    let (config_digest, config_bytes) = blob(manifest.config())?;
    let defaults = ImageDefaults::parse(&config_bytes).map_err(|e| bad(e.to_string()))?;
    if defaults.diff_ids.len() != manifest.layers().len() {
        return Err(bad("its manifest and config list different numbers of layers".into()));
    }
    store.put_blob(&manifest_digest, &manifest_bytes)?;
    store.put_blob(&config_digest, &config_bytes)?;
    progress(Progress::Resolved { layers: defaults.diff_ids.len() });
    for (i, (layer, diff_id)) in manifest.layers().iter().zip(&defaults.diff_ids).enumerate() {
        if store.has_layer(diff_id) {
            progress(Progress::Have { index: i + 1, diff_id: diff_id.clone() });
            continue;
        }
        let digest = Digest::parse(layer.digest().as_ref())?;
        let path = dir.join("blobs/sha256").join(digest.hex());
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let reader = Counting::new(file, i + 1, Some(layer.size()), progress);
        let size = store.add_layer(diff_id, Some(&digest), reader).map_err(|e| in_layer(image, i, e))?;
        progress(Progress::Unpacked { index: i + 1, size });
    }
    Ok(Parts { manifest: Some(manifest_digest), config: config_digest, layers: defaults.diff_ids })
}

fn in_layer(image: &ImageRef, i: usize, e: Error) -> Error {
    Error::image(image, format!("layer {}: {e}", i + 1))
}

/// `manifest.json` of a `docker save` archive: one entry per image.
#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SavedImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn from_docker_archive(
    store: &Store,
    image: &ImageRef,
    dir: &Path,
    reference: Option<String>,
    progress: &mut dyn FnMut(Progress),
) -> Result<Parts, Error> {
    let bad = |m: String| Error::image(image, m);
    let saved: Vec<SavedImage> = serde_json::from_slice(&read_bounded(&dir.join("manifest.json"))?)
        .map_err(|e| bad(format!("manifest.json: {e} (is it a docker save archive?)")))?;
    let tags = |s: &SavedImage| -> Vec<String> {
        s.repo_tags.iter().flatten().filter_map(|t| t.parse::<ImageRef>().ok()).map(|r| r.name()).collect()
    };
    let entry = match &reference {
        Some(r) => saved.iter().find(|s| tags(s).contains(r)),
        None if saved.len() == 1 => saved.first(),
        None => None,
    }
    .ok_or_else(|| {
        let all: Vec<String> = saved.iter().flat_map(tags).collect();
        bad(format!(
            "{} (it has: {}); name one as docker-archive:FILE:NAME:TAG",
            reference.as_ref().map_or("it holds several images".into(), |r| format!("no image {r}")),
            all.join(", ")
        ))
    })?;
    let config_bytes = read_bounded(&inside(dir, &entry.config)?)?;
    let config_digest = Digest::of(&config_bytes);
    let defaults = ImageDefaults::parse(&config_bytes).map_err(|e| bad(e.to_string()))?;
    if defaults.diff_ids.len() != entry.layers.len() {
        return Err(bad("its manifest.json and config list different numbers of layers".into()));
    }
    store.put_blob(&config_digest, &config_bytes)?;
    progress(Progress::Resolved { layers: entry.layers.len() });
    for (i, (layer, diff_id)) in entry.layers.iter().zip(&defaults.diff_ids).enumerate() {
        if store.has_layer(diff_id) {
            progress(Progress::Have { index: i + 1, diff_id: diff_id.clone() });
            continue;
        }
        let path = inside(dir, layer)?;
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let total = file.metadata().ok().map(|m| m.len());
        // The layer's tar is its own digest here: its diff_id checks it.
        let size = store
            .add_layer(diff_id, None, Counting::new(file, i + 1, total, progress))
            .map_err(|e| in_layer(image, i, e))?;
        progress(Progress::Unpacked { index: i + 1, size });
    }
    Ok(Parts { manifest: None, config: config_digest, layers: defaults.diff_ids })
}

/// A path an archive's manifest names, inside the archive.
fn inside(dir: &Path, relative: &str) -> Result<std::path::PathBuf, Error> {
    let p = Path::new(relative);
    if p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(Error::Format(format!("'{relative}' in manifest.json is not a path inside the archive")));
    }
    Ok(dir.join(p))
}

/// An archive unpacked for reading (into the store's scratch space; no ownership kept).
fn extract(file: &Path, dest: &Path) -> Result<(), Error> {
    let f = File::open(file).map_err(|e| Error::io(file, e))?;
    let mut archive = tar::Archive::new(std::io::BufReader::new(f));
    archive.set_preserve_ownerships(false);
    archive.unpack(dest).map_err(|e| Error::Format(format!("{}: {e}", file.display())))
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, Error> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::new();
    f.take(MAX_JSON + 1).read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > MAX_JSON {
        return Err(Error::Format(format!("{}: larger than {MAX_JSON} bytes", path.display())));
    }
    Ok(bytes)
}

/// Reports what was read through it, every 8 MiB.
pub struct Counting<'a, R> {
    inner: R,
    index: usize,
    done: u64,
    total: Option<u64>,
    reported: u64,
    progress: &'a mut dyn FnMut(Progress),
}

impl<'a, R> Counting<'a, R> {
    pub fn new(inner: R, index: usize, total: Option<u64>, progress: &'a mut dyn FnMut(Progress)) -> Self {
        progress(Progress::Fetching { index, done: 0, total });
        Counting { inner, index, done: 0, total, reported: 0, progress }
    }
}

impl<R: Read> Read for Counting<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        if self.done - self.reported >= 8 << 20 || (n == 0 && self.done != self.reported) {
            self.reported = self.done;
            (self.progress)(Progress::Fetching { index: self.index, done: self.done, total: self.total });
        }
        Ok(n)
    }
}

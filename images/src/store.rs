//! The image store, `/var/lib/gpubox` (root's alone, 0700):
//!
//! ```text
//! store.lock                  shared while images are added or containers start, exclusive to remove or prune
//! blobs/sha256/HEX            manifests and configs, as fetched (verified)
//! layers/HEX/                 a layer unpacked, named by its diff_id (its tar's digest)
//! layers/HEX.json             its size
//! images/HEX.json             an image record, named by the digest of the image's name
//! containers/NAME/            a container's writable layer (upper/, work/), its in-use lock and
//!                             image.json (the image and layers it runs from)
//! tmp/                        work in progress; nothing here is ever read as done
//! ```
//!
//! Everything is made in `tmp/` and renamed into place, so a kill at any moment leaves either
//! the old state or the new one, never half a layer or a record pointing at nothing. A layer
//! that two fetches unpack at once is kept once. A running container holds a lock on its
//! `containers/NAME/lock`; remove and prune leave its layers alone.

use crate::digest::{Digest, Digesting};
use crate::unpack::{self, Unpacked};
use crate::Error;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the store is unless `GPUBOX_STORE` says otherwise (tests).
pub const DEFAULT_ROOT: &str = "/var/lib/gpubox";
pub const ROOT_VARIABLE: &str = "GPUBOX_STORE";

/// An image in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Its reference's canonical spelling ([`crate::ImageRef::name`]).
    pub name: String,
    /// The manifest it came from (none for a `docker save` archive, which has none).
    pub manifest: Option<Digest>,
    /// Its config: the image's id, as `podman images` shows it.
    pub config: Digest,
    /// Its layers' diff_ids, bottom first.
    pub layers: Vec<Digest>,
    /// When it was stored (seconds since the epoch).
    pub stored: u64,
    /// A local image's source as it was when stored ([`crate::local::source_stamp`]): with
    /// `Pull=missing`, a changed layout or archive is imported again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// What `gpuboxctl image list` shows of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listed {
    #[serde(flatten)]
    pub record: ImageRecord,
    /// The bytes of all its layers' files.
    pub size: u64,
    /// Of those, the bytes in layers no other image has: what removing it frees.
    pub unique: u64,
    /// Containers running from it now.
    pub in_use_by: Vec<String>,
}

/// The store, at its root.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// A lock on the whole store, held while it is in use.
pub struct StoreLock(#[allow(dead_code)] Flock<File>);

/// A container's writable layer, in use while this lives (its lock is held).
pub struct WritableLayer {
    pub dir: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub ephemeral: bool,
    /// A kept layer that holds files and was made over other layers than the image's now (a
    /// new pull of its tag, another `Image=`): the image it was made over, for a warning.
    pub made_over: Option<String>,
    _lock: Flock<File>,
}

impl WritableLayer {
    /// At the container's end: an ephemeral layer is thrown away (its directory, lock and
    /// record stay for the next start).
    pub fn finish(mut self) -> Result<(), Error> {
        let ephemeral = std::mem::take(&mut self.ephemeral);
        if ephemeral {
            empty(&self.upper, &self.work)?;
        }
        Ok(())
    }
}

/// Empties an ephemeral writable layer: `upper/` goes whole, even when it holds no file (the
/// overlay's `/` is that directory itself: its mode, owner, times and extended attributes are
/// what the container made them), and the volatile mount's `work/`.
fn empty(upper: &Path, work: &Path) -> Result<(), Error> {
    remove_tree(upper)?;
    remove_tree(work)
}

impl Drop for WritableLayer {
    /// However the start ended (no GPU, a stop while waiting): an ephemeral layer goes.
    fn drop(&mut self) {
        if self.ephemeral {
            let _ = empty(&self.upper, &self.work);
        }
    }
}

impl Store {
    /// The store at `GPUBOX_STORE` or `/var/lib/gpubox`, made if missing.
    pub fn open_default() -> Result<Store, Error> {
        let root = std::env::var_os(ROOT_VARIABLE).map(PathBuf::from).unwrap_or_else(|| DEFAULT_ROOT.into());
        Store::open(&root)
    }

    pub fn open(root: &Path) -> Result<Store, Error> {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let store = Store { root: root.to_owned() };
        fs::DirBuilder::new().recursive(true).mode(0o700).create(root).map_err(|e| Error::io(root, e))?;
        // Layers hold setuid files of their images: the store is root's alone, whoever made it.
        let meta = fs::symlink_metadata(root).map_err(|e| Error::io(root, e))?;
        if !meta.is_dir() || meta.uid() != 0 {
            return Err(Error::Format(format!("{}: the image store must be a directory of root's", root.display())));
        }
        if meta.mode() & 0o7777 != 0o700 {
            fs::set_permissions(root, fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(root, e))?;
        }
        for dir in [
            store.root.join("blobs"),
            store.blobs(),
            store.root.join("layers"),
            store.images(),
            store.containers(),
            store.tmp(),
        ] {
            make_dir(&dir, 0o700)?;
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blobs(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }
    fn images(&self) -> PathBuf {
        self.root.join("images")
    }
    fn containers(&self) -> PathBuf {
        self.root.join("containers")
    }
    fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn lock(&self, arg: FlockArg) -> Result<StoreLock, Error> {
        let path = self.root.join("store.lock");
        let file = open_lock_file(&path)?;
        Flock::lock(file, arg).map(StoreLock).map_err(|(_, e)| Error::io(&path, e.into()))
    }

    /// Held while adding images or starting containers: remove and prune wait for it.
    pub fn shared(&self) -> Result<StoreLock, Error> {
        self.lock(FlockArg::LockShared)
    }

    fn exclusive(&self) -> Result<StoreLock, Error> {
        self.lock(FlockArg::LockExclusive)
    }

    /// A new, empty directory under `tmp/`, removed when the returned guard goes.
    pub fn scratch(&self, what: &str) -> Result<Scratch, Error> {
        let path = self.tmp().join(format!("{what}-{}-{}", std::process::id(), unique()));
        fs::DirBuilder::new().mode(0o700).create(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Scratch(path))
    }

    /// Removes what process `pid`, killed, was making in `tmp/` (its scratch directories and
    /// files are named with its pid).
    pub fn discard_work_of(&self, pid: u32) -> Result<(), Error> {
        let mark = format!("-{pid}-");
        let mut first_error = None;
        for entry in fs::read_dir(self.tmp()).map_err(|e| Error::io(&self.tmp(), e))?.flatten() {
            if entry.file_name().to_string_lossy().contains(&mark) {
                let removed = match entry.file_type() {
                    Ok(t) if t.is_dir() => remove_tree(&entry.path()),
                    _ => fs::remove_file(entry.path()).map_err(|e| Error::io(&entry.path(), e)),
                };
                first_error = first_error.or(removed.err());
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// The directory of a layer, whether or not the store has it.
    pub fn layer_dir(&self, diff_id: &Digest) -> PathBuf {
        self.root.join("layers").join(diff_id.hex())
    }

    pub fn has_layer(&self, diff_id: &Digest) -> bool {
        self.layer_dir(diff_id).is_dir()
    }

    /// Unpacks a layer's blob into the store unless it has it, checking the blob's own digest
    /// (when known) and the tar's against `diff_id`; returns the layer's size.
    pub fn add_layer(&self, diff_id: &Digest, blob: Option<&Digest>, reader: impl Read) -> Result<u64, Error> {
        if let Some(size) = self.layer_size(diff_id).filter(|_| self.has_layer(diff_id)) {
            return Ok(size);
        }
        let scratch = self.scratch("layer")?;
        let mut compressed = Digesting::new(reader);
        let Unpacked { diff_id: actual, size } = unpack::unpack_layer(&mut compressed, &scratch.0)?;
        let (blob_actual, _) = compressed.finish().map_err(|e| Error::Layer(format!("reading the blob: {e}")))?;
        if let Some(blob) = blob.filter(|b| **b != blob_actual) {
            return Err(Error::DigestMismatch {
                what: "layer blob".into(),
                expected: blob.clone(),
                actual: blob_actual,
            });
        }
        if &actual != diff_id {
            return Err(Error::DigestMismatch {
                what: "layer (uncompressed)".into(),
                expected: diff_id.clone(),
                actual,
            });
        }
        let meta = self.root.join("layers").join(format!("{}.json", diff_id.hex()));
        write_atomically(self, &meta, serde_json::json!({ "size": size }).to_string().as_bytes())?;
        match fs::rename(&scratch.0, self.layer_dir(diff_id)) {
            Ok(()) => {}
            // Another fetch kept the same layer first: ours goes with the scratch.
            Err(e) if self.has_layer(diff_id) => drop(e),
            Err(e) => return Err(Error::io(&self.layer_dir(diff_id), e)),
        }
        Ok(size)
    }

    /// The hex names of every layer directory in the store.
    fn all_layers(&self) -> Result<Vec<String>, Error> {
        let layers = self.root.join("layers");
        let dir = fs::read_dir(&layers).map_err(|e| Error::io(&layers, e))?;
        Ok(dir
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".json"))
            .collect())
    }

    fn layer_size(&self, diff_id: &Digest) -> Option<u64> {
        let meta = fs::read(self.root.join("layers").join(format!("{}.json", diff_id.hex()))).ok()?;
        serde_json::from_slice::<serde_json::Value>(&meta).ok()?.get("size")?.as_u64()
    }

    /// Keeps a manifest or config, checked against its digest.
    pub fn put_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<(), Error> {
        digest.verify("blob", bytes)?;
        let path = self.blobs().join(digest.hex());
        if !path.exists() {
            write_atomically(self, &path, bytes)?;
        }
        Ok(())
    }

    pub fn blob(&self, digest: &Digest) -> Result<Vec<u8>, Error> {
        let path = self.blobs().join(digest.hex());
        let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        digest.verify(&path.display().to_string(), &bytes)?;
        Ok(bytes)
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.images().join(format!("{}.json", Digest::of(name.as_bytes()).hex()))
    }

    /// Names an image `name` whose layers and blobs were just stored: its record, stored now.
    pub fn name_image(
        &self,
        name: String,
        manifest: Option<Digest>,
        config: Digest,
        layers: Vec<Digest>,
        source: Option<String>,
    ) -> Result<ImageRecord, Error> {
        let record = ImageRecord { name, manifest, config, layers, stored: now(), source };
        self.commit(&record)?;
        Ok(record)
    }

    /// Names an image: its record, written last, once all it points at is in the store.
    fn commit(&self, record: &ImageRecord) -> Result<(), Error> {
        for layer in &record.layers {
            if !self.has_layer(layer) {
                return Err(Error::image(&record.name, format!("layer {layer} is missing")));
            }
        }
        self.blob(&record.config)?;
        let json = serde_json::to_vec_pretty(record).map_err(|e| Error::Format(e.to_string()))?;
        write_atomically(self, &self.record_path(&record.name), &json)
    }

    /// The image of that name, if the store has it.
    pub fn lookup(&self, name: &str) -> Result<Option<ImageRecord>, Error> {
        let path = self.record_path(name);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|e| Error::Format(format!("{}: {e}", path.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    /// Every image the store has, by name.
    pub fn records(&self) -> Result<Vec<ImageRecord>, Error> {
        let mut records = Vec::new();
        for entry in fs::read_dir(self.images()).map_err(|e| Error::io(&self.images(), e))? {
            let path = entry.map_err(|e| Error::io(&self.images(), e))?.path();
            if path.extension().is_some_and(|e| e == "json") {
                let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
                records.push(
                    serde_json::from_slice(&bytes).map_err(|e| Error::Format(format!("{}: {e}", path.display())))?,
                );
            }
        }
        records.sort_by(|a: &ImageRecord, b| a.name.cmp(&b.name));
        Ok(records)
    }

    /// The running containers, each with the image it runs from and that image's layers (None
    /// where its record cannot be read: prune then keeps every layer).
    fn in_use(&self) -> Result<BTreeMap<String, Running>, Error> {
        let mut used = BTreeMap::new();
        let Ok(dir) = fs::read_dir(self.containers()) else { return Ok(used) };
        for entry in dir.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let lock = entry.path().join("lock");
            let Ok(file) = File::open(&lock) else { continue };
            if Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err() {
                let record = ContainerRecord::read(&entry.path());
                let running = record.map_or(Running { image: String::new(), layers: None }, |r| Running {
                    image: r.image,
                    layers: Some(r.layers),
                });
                used.insert(name, running);
            }
        }
        Ok(used)
    }

    /// The images with their sizes, shared and unique, and who runs from them.
    pub fn list(&self) -> Result<Vec<Listed>, Error> {
        let records = self.records()?;
        let in_use = self.in_use()?;
        let mut users: BTreeMap<&Digest, usize> = BTreeMap::new();
        for r in &records {
            for l in r.layers.iter().collect::<BTreeSet<_>>() {
                *users.entry(l).or_default() += 1;
            }
        }
        Ok(records
            .iter()
            .map(|r| {
                let layers: BTreeSet<&Digest> = r.layers.iter().collect();
                let size = layers.iter().map(|l| self.layer_size(l).unwrap_or(0)).sum();
                let unique = layers.iter().filter(|l| users[*l] == 1).map(|l| self.layer_size(l).unwrap_or(0)).sum();
                let in_use_by = in_use.iter().filter(|(_, c)| c.image == r.name).map(|(n, _)| n.clone()).collect();
                Listed { record: r.clone(), size, unique, in_use_by }
            })
            .collect())
    }

    /// Removes an image's name; its layers go at the next prune. Refused while a container
    /// runs from it.
    pub fn remove(&self, name: &str) -> Result<ImageRecord, Error> {
        let _lock = self.exclusive()?;
        let record = self.lookup(name)?.ok_or_else(|| Error::image(name, "no such image in the store"))?;
        let users: Vec<String> = self.in_use()?.into_iter().filter(|(_, c)| c.image == name).map(|(n, _)| n).collect();
        if !users.is_empty() {
            return Err(Error::InUse(format!("{name}: in use by running container(s) {}", users.join(", "))));
        }
        let path = self.record_path(name);
        fs::remove_file(&path).map_err(|e| Error::io(&path, e))?;
        Ok(record)
    }

    /// Removes what no image names and no running container uses: layers, blobs, writable
    /// layers of ephemeral containers that were killed, work left in `tmp/`. Returns the
    /// bytes freed (of layers).
    pub fn prune(&self) -> Result<u64, Error> {
        let _lock = self.exclusive()?;
        let records = self.records()?;
        let in_use = self.in_use()?;
        let mut keep_layers: BTreeSet<String> = BTreeSet::new();
        let mut keep_blobs: BTreeSet<String> = BTreeSet::new();
        for r in &records {
            keep_layers.extend(r.layers.iter().map(|l| l.hex().to_owned()));
            keep_blobs.insert(r.config.hex().to_owned());
            keep_blobs.extend(r.manifest.iter().map(|m| m.hex().to_owned()));
        }
        for running in in_use.values() {
            match &running.layers {
                Some(layers) => keep_layers.extend(layers.iter().map(|l| l.hex().to_owned())),
                // A running container whose layers are not known: none may go.
                None => keep_layers.extend(self.all_layers()?),
            }
        }
        let mut freed = 0;
        let layers = self.root.join("layers");
        for entry in fs::read_dir(&layers).map_err(|e| Error::io(&layers, e))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let hex = name.strip_suffix(".json").unwrap_or(&name).to_owned();
            if keep_layers.contains(&hex) {
                continue;
            }
            if name.ends_with(".json") {
                if !layers.join(&hex).exists() {
                    let _ = fs::remove_file(entry.path());
                }
                continue;
            }
            if let Ok(d) = Digest::parse(&format!("sha256:{hex}")) {
                freed += self.layer_size(&d).unwrap_or(0);
            }
            // Renamed away first, so that a kill halfway leaves no half layer under its name.
            let doomed = self.tmp().join(format!("removed-{hex}"));
            fs::rename(entry.path(), &doomed).map_err(|e| Error::io(&entry.path(), e))?;
            remove_tree(&doomed)?;
            let _ = fs::remove_file(layers.join(format!("{hex}.json")));
        }
        for entry in fs::read_dir(self.blobs()).map_err(|e| Error::io(&self.blobs(), e))?.flatten() {
            if !keep_blobs.contains(&*entry.file_name().to_string_lossy()) {
                let _ = fs::remove_file(entry.path());
            }
        }
        for entry in fs::read_dir(self.containers()).map_err(|e| Error::io(&self.containers(), e))?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !in_use.contains_key(&name) && entry.path().join("ephemeral").exists() {
                remove_tree(&entry.path())?;
            }
        }
        // Work in progress of fetches that are not running any more (they hold the store shared,
        // so none is running now).
        for entry in fs::read_dir(self.tmp()).map_err(|e| Error::io(&self.tmp(), e))?.flatten() {
            remove_tree(&entry.path())?;
        }
        Ok(freed)
    }

    /// The writable layer of container `name`, made if missing (an ephemeral one always
    /// empty), and locked as in use for as long as the returned value lives.
    ///
    /// `containers/NAME/` and its small files stay from one start to the next and are written
    /// only when they change: a start from an image costs as few writes as it can (the
    /// benchmark's goal is 2 ms over `RootDirectory=`).
    pub fn writable_layer(
        &self,
        name: &str,
        image: &str,
        layers: &[Digest],
        ephemeral: bool,
    ) -> Result<WritableLayer, Error> {
        let dir = self.containers().join(name);
        make_dir(&dir, 0o700)?;
        let file = open_lock_file(&dir.join("lock"))?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|_| Error::InUse(format!("{}: in use by another container named {name}", dir.display())))?;
        let (upper, work) = (dir.join("upper"), dir.join("work"));
        let marker = dir.join("ephemeral");
        if ephemeral {
            // What a container that was killed left is thrown away now (the work directory of
            // a volatile mount cannot be mounted again: overlayfs's `work/incompat/volatile`).
            empty(&upper, &work)?;
            if !marker.exists() {
                File::create(&marker).map_err(|e| Error::io(&marker, e))?;
            }
        } else if marker.exists() {
            // Once ephemeral, now kept: it starts empty, as an ephemeral layer would have.
            for d in [&upper, &work] {
                remove_tree(d)?;
            }
            fs::remove_file(&marker).map_err(|e| Error::io(&marker, e))?;
        }
        for d in [&upper, &work] {
            make_dir(d, 0o755)?;
        }
        // What `image list` and prune read of a running container; its layers are kept for it
        // even when its image's name is given to another.
        let record = serde_json::to_vec(&ContainerRecord { image: image.to_owned(), layers: layers.to_vec() })
            .map_err(|e| Error::Format(e.to_string()))?;
        let record_path = dir.join("image.json");
        let before = fs::read(&record_path).ok();
        let mut made_over = None;
        if before.as_deref() != Some(&record[..]) {
            if let Some(before) = before.and_then(|b| serde_json::from_slice::<ContainerRecord>(&b).ok()) {
                if !ephemeral && before.layers != layers && !is_empty_dir(&upper) {
                    made_over = Some(before.image);
                }
            }
            write_atomically(self, &record_path, &record)?;
        }
        Ok(WritableLayer { dir, upper, work, ephemeral, made_over, _lock: lock })
    }
}

/// A running container, as prune and remove see it.
struct Running {
    image: String,
    /// None where its record cannot be read.
    layers: Option<Vec<Digest>>,
}

/// `containers/NAME/image.json`: the image a container runs from, and that image's layers.
#[derive(Debug, Serialize, Deserialize)]
struct ContainerRecord {
    image: String,
    layers: Vec<Digest>,
}

impl ContainerRecord {
    /// The record of the container directory `dir`: `image.json`, or the `image` and `layers`
    /// files that a supervisor of gpubox 0.1 before it wrote (one may still run after an
    /// upgrade, and its layers must not be pruned from under it).
    fn read(dir: &Path) -> Option<ContainerRecord> {
        if let Ok(bytes) = fs::read(dir.join("image.json")) {
            return serde_json::from_slice(&bytes).ok();
        }
        let layers = serde_json::from_slice(&fs::read(dir.join("layers")).ok()?).ok()?;
        Some(ContainerRecord { image: fs::read_to_string(dir.join("image")).ok()?, layers })
    }
}

/// Makes a directory unless it is there.
fn make_dir(path: &Path, mode: u32) -> Result<(), Error> {
    match fs::DirBuilder::new().mode(mode).create(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(Error::io(path, e)),
        _ => Ok(()),
    }
}

/// Whether `path` is a directory with nothing in it (false when it is missing).
fn is_empty_dir(path: &Path) -> bool {
    fs::read_dir(path).is_ok_and(|mut d| d.next().is_none())
}

/// Opens (making it, 0600) a lock file, never through a link (as gpubox_control's locks).
fn open_lock_file(path: &Path) -> Result<File, Error> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| Error::io(path, e))
}

/// A directory under the store's `tmp/`, removed when dropped unless kept.
pub struct Scratch(pub PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = remove_tree(&self.0);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    (u64::from(nanos) << 16) ^ NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Writes `bytes` to `path` through a file in the store's `tmp/` and a rename: whoever reads
/// `path` sees the old content or the new, whole.
fn write_atomically(store: &Store, path: &Path, bytes: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    let tmp = store.tmp().join(format!("file-{}-{}", std::process::id(), unique()));
    let result = (|| {
        let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| Error::io(path, e))
}

/// Removes a tree that may hold directories without write permission (overlayfs's `work/work`
/// is 0000) and never follows a link out of it.
fn remove_tree(path: &Path) -> Result<(), Error> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// The seconds since the epoch, for records.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(store: &Store, file: &str) -> Digest {
        let tar = crate::unpack::tests::tar_of(&[(file, tar::EntryType::Regular, b"", None)]);
        let diff_id = Digest::of(&tar);
        store.add_layer(&diff_id, None, &tar[..]).unwrap();
        diff_id
    }

    /// A running container's lock, as its supervisor holds it.
    fn running(store: &Store, name: &str) -> Flock<File> {
        let dir = store.containers().join(name);
        fs::create_dir_all(&dir).unwrap();
        Flock::lock(open_lock_file(&dir.join("lock")).unwrap(), FlockArg::LockExclusive).unwrap()
    }

    /// After an upgrade, a container that an earlier supervisor started still runs, with its
    /// record in `image` and `layers`; one whose record cannot be read keeps every layer.
    #[test]
    fn prune_keeps_the_layers_of_every_running_container() {
        // The store must be root's.
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let (old, unknown) = (layer(&store, "old"), layer(&store, "unknown"));
        let old_lock = running(&store, "old");
        let old_dir = store.containers().join("old");
        fs::write(old_dir.join("layers"), serde_json::to_vec(&[&old]).unwrap()).unwrap();
        fs::write(old_dir.join("image"), "docker.io/library/gone:1").unwrap();
        let unknown_lock = running(&store, "unreadable");
        store.prune().unwrap();
        assert!(store.has_layer(&old) && store.has_layer(&unknown), "a running container's layer was pruned");
        drop(unknown_lock);
        store.prune().unwrap();
        assert!(store.has_layer(&old), "the earlier supervisor's container lost its layer");
        assert!(!store.has_layer(&unknown), "a layer no one uses was kept");
        drop(old_lock);
        store.prune().unwrap();
        assert!(!store.has_layer(&old));
    }
}

//! Registries, over the OCI distribution API through `oci-client`: anonymous or with the
//! credentials of a containers-auth.json file (`/etc/gpubox/auth.json`, or `REGISTRY_AUTH_FILE`
//! as Podman reads it), token authentication as the registry asks for it. A registry on the
//! loopback address is spoken to over plain HTTP, as Docker allows; every other over HTTPS.
//!
//! Each layer is downloaded into the store's scratch space (three at once, a broken-off one
//! resumed where it stopped), its digest checked, then unpacked; only when every layer is in
//! does the image get its name, so an interrupted or offline pull leaves nothing half-written
//! (and the layers it finished are not fetched again).

use crate::digest::Digest;
use crate::error::chain;
use crate::local::{for_this_machine, is_index};
use crate::store::{ImageRecord, Store};
use crate::{Error, ImageDefaults, ImageRef, Progress};
use base64::Engine as _;
use futures_util::TryStreamExt;
use gpubox_definition::image_ref::Registry;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest;
use oci_client::secrets::RegistryAuth;
use oci_client::RegistryOperation;
use oci_client::{Client, Reference};
use oci_spec::image::{ImageIndex, ImageManifest, MediaType};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where credentials are read from unless `REGISTRY_AUTH_FILE` says otherwise.
pub const AUTH_FILE: &str = "/etc/gpubox/auth.json";

const ACCEPTED: &[&str] = &[
    manifest::OCI_IMAGE_MEDIA_TYPE,
    manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_MEDIA_TYPE,
    manifest::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
];

pub fn pull(
    store: &Store,
    image: &ImageRef,
    r: &Registry,
    progress: &mut dyn FnMut(Progress),
) -> Result<ImageRecord, Error> {
    let _lock = store.shared()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Registry { image: image.name(), message: format!("starting the client: {e}") })?;
    runtime.block_on(pull_async(store, image, r, progress))
}

async fn pull_async(
    store: &Store,
    image: &ImageRef,
    r: &Registry,
    progress: &mut dyn FnMut(Progress),
) -> Result<ImageRecord, Error> {
    // rustls wants one crypto provider for the process; ring is ours (a second call is a no-op).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let failed = |what: &str, e: &dyn std::fmt::Display| Error::Registry {
        image: image.name(),
        message: format!("{what}: {e}"),
    };
    let client = Client::new(ClientConfig {
        protocol: if is_loopback(&r.registry) { ClientProtocol::Http } else { ClientProtocol::Https },
        connect_timeout: Some(Duration::from_secs(15)),
        read_timeout: Some(Duration::from_secs(60)),
        platform_resolver: None,
        ..Default::default()
    });
    let mut reference = match (&r.tag, &r.digest) {
        (_, Some(d)) => Reference::with_digest(r.registry.clone(), r.repository.clone(), d.clone()),
        (Some(t), None) => Reference::with_tag(r.registry.clone(), r.repository.clone(), t.clone()),
        (None, None) => unreachable!("a normalised reference has a tag or a digest"),
    };
    let token_failed = |e: String| failed(&format!("exchanging the identitytoken of {}", auth_file().display()), &e);
    let mut renewing = None;
    let auth = match credentials(r)? {
        Credentials::Anonymous => RegistryAuth::Anonymous,
        Credentials::Basic(user, password) => RegistryAuth::Basic(user, password),
        Credentials::IdentityToken(identity) => {
            let mut token = IdentityToken::new(reference.resolve_registry(), &r.repository, identity);
            let auth = token.exchange().await.map_err(token_failed)?;
            renewing = Some(token);
            auth
        }
    };
    let (manifest_digest, manifest_bytes) = loop {
        let (bytes, _) = client
            .pull_manifest_raw(&reference, &auth, ACCEPTED)
            .await
            .map_err(|e| failed(&format!("getting the manifest from {}", r.registry), &e))?;
        let digest = Digest::of(&bytes);
        if let Some(wanted) = reference.digest() {
            digest
                .verify(&format!("{image}: manifest"), &bytes)
                .map_err(|_| failed("manifest", &format!("digest {digest}, asked for {wanted}")))?;
        }
        let media_type: Option<MediaType> = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v.get("mediaType").and_then(|m| m.as_str()).map(MediaType::from));
        let looks_like_index = media_type.as_ref().is_some_and(is_index)
            || serde_json::from_slice::<serde_json::Value>(&bytes).ok().is_some_and(|v| v.get("manifests").is_some());
        if !looks_like_index {
            break (digest, bytes);
        }
        let index = ImageIndex::from_reader(&bytes[..]).map_err(|e| failed("index", &e))?;
        let chosen = for_this_machine(index.manifests())
            .ok_or_else(|| failed("index", &format!("no manifest for linux/{}", std::env::consts::ARCH)))?;
        reference = Reference::with_digest(r.registry.clone(), r.repository.clone(), chosen.digest().to_string());
    };
    let manifest = ImageManifest::from_reader(&manifest_bytes[..]).map_err(|e| failed("manifest", &e))?;
    let config_digest = Digest::parse(manifest.config().digest().as_ref())?;
    let mut config_bytes = Vec::new();
    client
        .pull_blob(&reference, config_digest.as_str(), &mut config_bytes)
        .await
        .map_err(|e| failed("getting the config", &e))?;
    let defaults = ImageDefaults::parse(&config_bytes).map_err(|e| failed("config", &e))?;
    if defaults.diff_ids.len() != manifest.layers().len() {
        return Err(failed("manifest", &"its manifest and config list different numbers of layers"));
    }
    store.put_blob(&manifest_digest, &manifest_bytes)?;
    store.put_blob(&config_digest, &config_bytes)?;
    progress(Progress::Resolved { layers: defaults.diff_ids.len() });
    let (mut missing, mut repeated) = (Vec::new(), Vec::new());
    for (i, (layer, diff_id)) in manifest.layers().iter().zip(&defaults.diff_ids).enumerate() {
        if store.has_layer(diff_id) {
            progress(Progress::Have { index: i + 1, diff_id: diff_id.clone() });
        } else if missing.iter().any(|m: &Layer| m.diff_id == diff_id) {
            // The same layer twice in one image (an empty one, often): fetched once.
            repeated.push((i + 1, diff_id));
        } else {
            missing.push(Layer {
                index: i + 1,
                blob: Digest::parse(layer.digest().as_ref())?,
                size: layer.size(),
                diff_id,
            });
        }
    }
    let fetch = Fetch {
        store,
        image,
        client: &client,
        reference: &reference,
        renewing: tokio::sync::Mutex::new(renewing),
        downloads: tokio::sync::Semaphore::new(CONCURRENT_DOWNLOADS),
        unpacks: tokio::sync::Semaphore::new(CONCURRENT_UNPACKS),
        progress: std::cell::RefCell::new(progress),
    };
    futures_util::stream::iter(missing.into_iter().map(Ok))
        .try_for_each_concurrent(None, |layer| fetch.layer(layer))
        .await?;
    for (index, diff_id) in repeated {
        fetch.report(Progress::Have { index, diff_id: diff_id.clone() });
    }
    store.name_image(image.name(), Some(manifest_digest), config_digest, defaults.diff_ids, None)
}

/// Layers downloaded at once, as Docker does by default (`max-concurrent-downloads`). Each is
/// unpacked as soon as it is in, on a thread of its own, while the others download.
const CONCURRENT_DOWNLOADS: usize = 3;

/// Layers unpacked at once: more would only contend for the disk.
const CONCURRENT_UNPACKS: usize = 3;

/// A layer's download is tried this many times in all; each try after the first resumes where
/// the last one broke off (an HTTP range request), as Docker's does.
const DOWNLOAD_TRIES: u32 = 5;

/// A layer the store does not have yet.
struct Layer<'a> {
    /// Its place in the image, from 1.
    index: usize,
    blob: Digest,
    size: u64,
    diff_id: &'a Digest,
}

/// What every layer's download shares.
struct Fetch<'a, 'p> {
    store: &'a Store,
    image: &'a ImageRef,
    client: &'a Client,
    reference: &'a Reference,
    /// The identity token, renewed by the first download that finds it due.
    renewing: tokio::sync::Mutex<Option<IdentityToken>>,
    /// Permits to download ([`CONCURRENT_DOWNLOADS`]), and apart from them to unpack: a layer
    /// being unpacked leaves its place to the next download.
    downloads: tokio::sync::Semaphore,
    unpacks: tokio::sync::Semaphore,
    /// Called by one download at a time: they take turns on the runtime's one thread.
    progress: std::cell::RefCell<&'p mut dyn FnMut(Progress)>,
}

impl Fetch<'_, '_> {
    fn report(&self, p: Progress) {
        (self.progress.borrow_mut())(p)
    }

    /// Downloads layer `l` into the store's scratch space, then unpacks it into the store off
    /// the runtime's thread, so that other downloads go on meanwhile.
    async fn layer(&self, l: Layer<'_>) -> Result<(), Error> {
        let failed = |what: String, e: &dyn std::fmt::Display| Error::Registry {
            image: self.image.name(),
            message: format!("{what}: {e}"),
        };
        let download = self.downloads.acquire().await.map_err(|e| failed("downloading".into(), &e))?;
        let scratch = self.store.scratch("download")?;
        let path = scratch.0.join("blob");
        let file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let report = |p| self.report(p);
        let mut out = CountingWriter::new(file, l.index, Some(l.size), &report);
        let mut tries = 1;
        loop {
            match self.download(&l, &mut out).await {
                Ok(()) => break,
                // What broke was past the last byte (a chunked answer's end): the digest says
                // whether the blob is whole.
                Err(Attempt::BrokeOff(_)) if out.done == l.size => break,
                Err(Attempt::BrokeOff(error)) if tries < DOWNLOAD_TRIES => {
                    self.report(Progress::Resuming { index: l.index, done: out.done, error });
                    tokio::time::sleep(Duration::from_secs(tries.into())).await;
                    tries += 1;
                }
                Err(Attempt::BrokeOff(e) | Attempt::Failed(e)) => {
                    return Err(failed(format!("getting layer {}", l.index), &e))
                }
            }
        }
        drop(download);
        let _unpack = self.unpacks.acquire().await.map_err(|e| failed("unpacking".into(), &e))?;
        self.report(Progress::Unpacking { index: l.index });
        let (store, diff_id, blob) = (self.store.clone(), l.diff_id.clone(), l.blob.clone());
        // The scratch goes with the closure, once the unpacking is over, whatever became of
        // this future.
        let unpacked = tokio::task::spawn_blocking(move || {
            let downloaded = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            let size = store.add_layer(&diff_id, Some(&blob), downloaded);
            drop(scratch);
            size
        })
        .await
        .map_err(|e| failed(format!("unpacking layer {}", l.index), &e))?;
        let size = unpacked.map_err(|e| Error::image(self.image, format!("layer {}: {e}", l.index)))?;
        self.report(Progress::Unpacked { index: l.index, size });
        Ok(())
    }

    /// One try at layer `l`'s blob: from its start into an empty `out`, else from where `out`
    /// stopped. A registry that ignores the range, or answers another one than was asked,
    /// sends the whole blob, and `out` starts over.
    async fn download(&self, l: &Layer<'_>, out: &mut CountingWriter<'_>) -> Result<(), Attempt> {
        use futures_util::StreamExt;
        use oci_client::client::BlobResponse;
        // Before every try: a resume after long pauses may outlive the access token.
        if let Some(token) = self.renewing.lock().await.as_mut().filter(|t| t.due()) {
            let auth = token.exchange().await.map_err(|e| {
                Attempt::Failed(format!("exchanging the identitytoken of {}: {e}", auth_file().display()))
            })?;
            self.client
                .auth(self.reference, &auth, RegistryOperation::Pull)
                .await
                .map_err(|e| Attempt::Failed(format!("renewing the token: {}", chain(&e))))?;
        }
        let blob = l.blob.as_str();
        let whole = || self.client.pull_blob_stream(self.reference, blob);
        let mut stream = if out.done == 0 {
            whole().await.map_err(Attempt::of_request)?
        } else {
            match self.client.pull_blob_stream_partial(self.reference, blob, out.done, None).await {
                // Only the rest, as asked (oci-client does not look at Content-Range).
                Ok(BlobResponse::Partial(stream)) if stream.content_length == Some(l.size - out.done) => stream,
                Ok(BlobResponse::Partial(_)) => {
                    out.start_over().map_err(|e| Attempt::Failed(e.to_string()))?;
                    whole().await.map_err(Attempt::of_request)?
                }
                Ok(BlobResponse::Full(stream)) => {
                    out.start_over().map_err(|e| Attempt::Failed(e.to_string()))?;
                    stream
                }
                Err(e) => return Err(Attempt::of_request(e)),
            }
        };
        while let Some(bytes) = stream.next().await {
            // The stream's errors are the connection's, or a whole blob whose digest is wrong.
            let bytes = bytes.map_err(|e| {
                let digest = e.get_ref().is_some_and(|e| e.is::<oci_client::errors::DigestError>());
                if digest {
                    Attempt::Failed(chain(&e))
                } else {
                    Attempt::BrokeOff(chain(&e))
                }
            })?;
            out.write(&bytes).map_err(|e| Attempt::Failed(e.to_string()))?;
        }
        if out.done < l.size {
            return Err(Attempt::BrokeOff(format!("the answer ended after {} bytes", out.done)));
        }
        Ok(())
    }
}

/// How one try at a download ended, if not with the whole blob.
enum Attempt {
    /// The connection or the registry failed on the way: worth another try.
    BrokeOff(String),
    /// The registry refused, or the bytes are wrong, or they cannot be written: final.
    Failed(String),
}

impl Attempt {
    /// A client error: a request that never got an answer, or a server's 5xx, is worth
    /// another try; a refusal (401, 404) is not.
    fn of_request(e: oci_client::errors::OciDistributionError) -> Attempt {
        use oci_client::errors::OciDistributionError as E;
        match e {
            E::RequestError(_) | E::IoError(_) => Attempt::BrokeOff(chain(&e)),
            E::ServerError { code, .. } if code >= 500 => Attempt::BrokeOff(chain(&e)),
            _ => Attempt::Failed(chain(&e)),
        }
    }
}

/// A layer's download file, which reports what was written to it as `Fetching`, at its start
/// and every 8 MiB. It refuses to write past the size the layer's descriptor gives: a blob that
/// never ends cannot fill the disk, only as much as the manifest declares. It writes synchronously: a write
/// to the page cache takes microseconds, and tokio's file would hand each chunk of the
/// response (a few KiB) to a thread of its blocking pool, which made a pull twice as slow.
struct CountingWriter<'a> {
    file: std::fs::File,
    index: usize,
    done: u64,
    total: Option<u64>,
    reported: u64,
    report: &'a dyn Fn(Progress),
}

impl<'a> CountingWriter<'a> {
    fn new(file: std::fs::File, index: usize, total: Option<u64>, report: &'a dyn Fn(Progress)) -> Self {
        report(Progress::Fetching { index, done: 0, total });
        CountingWriter { file, index, done: 0, total, reported: 0, report }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(total) = self.total.filter(|t| self.done + bytes.len() as u64 > *t) {
            return Err(std::io::Error::other(format!(
                "the registry sent more than the {total} bytes the manifest gives"
            )));
        }
        self.file.write_all(bytes)?;
        self.done += bytes.len() as u64;
        if self.done - self.reported >= 8 << 20 || Some(self.done) == self.total {
            self.reported = self.done;
            (self.report)(Progress::Fetching { index: self.index, done: self.done, total: self.total });
        }
        Ok(())
    }

    /// Empties the file, for a download that starts again from the beginning.
    fn start_over(&mut self) -> std::io::Result<()> {
        use std::io::Seek;
        self.file.set_len(0)?;
        self.file.rewind()?;
        (self.done, self.reported) = (0, 0);
        (self.report)(Progress::Fetching { index: self.index, done: 0, total: self.total });
        Ok(())
    }
}

/// Whether a token service may be sent the identity token: over HTTPS, or over plain HTTP for a
/// registry on the loopback address (spoken to over HTTP itself).
fn may_receive_token(realm: &str, loopback: bool) -> bool {
    realm.starts_with("https://") || (loopback && realm.starts_with("http://"))
}

fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(h, p)| !h.ends_with(':') && p.parse::<u16>().is_ok())
        .map_or(registry, |(h, _)| h);
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

/// The credentials for the registry (and repository) of `r` in the auth file, as
/// containers-auth.json(5) looks them up: the most specific `registry/namespace` key first,
/// then the registry; `docker.io` also under Docker's own spellings.
fn credentials(r: &Registry) -> Result<Credentials, Error> {
    let path = auth_file();
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::Anonymous),
        Err(e) => return Err(Error::io(&path, e)),
    };
    lookup(&bytes, r).map_err(|m| Error::Format(format!("{}: {m}", path.display())))
}

/// `REGISTRY_AUTH_FILE`, as Podman reads it, or [`AUTH_FILE`].
fn auth_file() -> PathBuf {
    std::env::var_os("REGISTRY_AUTH_FILE").map(PathBuf::from).unwrap_or_else(|| AUTH_FILE.into())
}

/// What the auth file holds for a registry.
#[derive(PartialEq, Eq)]
enum Credentials {
    Anonymous,
    Basic(String, String),
    /// An OAuth2 refresh token, which `docker login` keeps where the registry logs in through an
    /// identity provider (Azure's among them, beside an `auth` of a placeholder user).
    IdentityToken(String),
}

/// Without the secrets, as oci-client's `RegistryAuth` prints itself.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Anonymous => f.write_str("Anonymous"),
            Credentials::Basic(user, _) => f.debug_tuple("Basic").field(user).field(&"<redacted>").finish(),
            Credentials::IdentityToken(_) => f.debug_tuple("IdentityToken").field(&"<redacted>").finish(),
        }
    }
}

fn lookup(bytes: &[u8], r: &Registry) -> Result<Credentials, String> {
    let file: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    let auths = file.get("auths").and_then(|a| a.as_object()).ok_or("no \"auths\" object")?;
    let mut keys = Vec::new();
    let path = format!("{}/{}", r.registry, r.repository);
    let mut scope = path.as_str();
    loop {
        keys.push(scope.to_owned());
        match scope.rsplit_once('/') {
            Some((parent, _)) => scope = parent,
            None => break,
        }
    }
    keys.push(format!("https://{}", r.registry));
    if r.registry == "docker.io" {
        keys.extend(["index.docker.io".into(), "https://index.docker.io/v1/".into(), "registry-1.docker.io".into()]);
    }
    let Some(entry) = keys.iter().find_map(|k| auths.get(k)) else { return Ok(Credentials::Anonymous) };
    // Docker takes the identity token over `auth` when both are there.
    if let Some(token) = entry.get("identitytoken").and_then(|t| t.as_str()).filter(|t| !t.is_empty()) {
        return Ok(Credentials::IdentityToken(token.to_owned()));
    }
    if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth)
            .map_err(|e| format!("the \"auth\" of {} is not base64: {e}", r.registry))?;
        let decoded = String::from_utf8(decoded).map_err(|_| format!("the \"auth\" of {} is not text", r.registry))?;
        let (user, password) =
            decoded.split_once(':').ok_or_else(|| format!("the \"auth\" of {} is not USER:PASSWORD", r.registry))?;
        return Ok(Credentials::Basic(user.to_owned(), password.to_owned()));
    }
    Ok(Credentials::Anonymous)
}

/// An identity token and the access token it was last exchanged for, renewed when it is about
/// to expire: a pull of large layers can outlive the few minutes a registry gives one (the
/// spec's default is 60 s).
struct IdentityToken {
    /// The registry's host as requests go to it (`index.docker.io` for `docker.io`).
    host: String,
    repository: String,
    identity: String,
    /// When the access token has a fifth of its life left.
    renew_at: Option<Instant>,
}

impl IdentityToken {
    fn new(host: &str, repository: &str, identity: String) -> IdentityToken {
        IdentityToken { host: host.to_owned(), repository: repository.to_owned(), identity, renew_at: None }
    }

    /// Whether the access token has less than a fifth of its life left.
    fn due(&self) -> bool {
        self.renew_at.is_some_and(|at| at <= Instant::now())
    }

    /// Exchanges the identity token for an access token to pull the repository, as Docker and
    /// Podman do (the distribution spec's OAuth2 token authentication): the registry's `/v2/`
    /// answers with a `Bearer` challenge naming its token service (`realm`) and `service`; a
    /// POST there with `grant_type=refresh_token` answers with the `access_token` (or `token`)
    /// and its `expires_in`. A registry that asks for no token is pulled from anonymously.
    async fn exchange(&mut self) -> Result<RegistryAuth, String> {
        let loopback = is_loopback(&self.host);
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            .timeout(Duration::from_secs(60))
            // The identity token goes to the realm the registry named, and nowhere else.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        let scheme = if loopback { "http" } else { "https" };
        let ping = client.get(format!("{scheme}://{}/v2/", self.host)).send().await.map_err(|e| e.to_string())?;
        let Some(header) = ping.headers().get(reqwest::header::WWW_AUTHENTICATE) else {
            return Ok(RegistryAuth::Anonymous);
        };
        let header = header.to_str().map_err(|e| format!("its WWW-Authenticate: {e}"))?.to_owned();
        let challenges =
            http_auth::parse_challenges(&header).map_err(|e| format!("its WWW-Authenticate '{header}': {e}"))?;
        let bearer = challenges
            .iter()
            .find(|c| c.scheme.eq_ignore_ascii_case("bearer"))
            .ok_or_else(|| format!("its WWW-Authenticate '{header}' offers no Bearer token service"))?;
        let param = |name: &str| {
            bearer.params.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.to_unescaped())
        };
        let realm = param("realm").ok_or_else(|| format!("its Bearer challenge '{header}' names no realm"))?;
        if !may_receive_token(&realm, loopback) {
            return Err(format!("its token service {realm} is not HTTPS: the identity token is not sent there"));
        }
        let mut form = vec![
            ("grant_type", "refresh_token".to_owned()),
            ("refresh_token", self.identity.clone()),
            ("client_id", "gpubox".to_owned()),
            ("scope", format!("repository:{}:pull", self.repository)),
        ];
        if let Some(service) = param("service") {
            form.push(("service", service));
        }
        let asked = Instant::now();
        let answer = client.post(&realm).form(&form).send().await.map_err(|e| format!("{realm}: {e}"))?;
        let status = answer.status();
        let body = answer.text().await.map_err(|e| format!("{realm}: {e}"))?;
        if !status.is_success() {
            return Err(format!(
                "{realm} refused the token ({status}): {}",
                body.chars().take(200).collect::<String>()
            ));
        }
        let json: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| format!("{realm}: its answer is not JSON: {e}"))?;
        let access = ["access_token", "token"]
            .iter()
            .find_map(|k| json.get(k).and_then(|t| t.as_str()).filter(|t| !t.is_empty()))
            .ok_or_else(|| format!("{realm}: its answer has no access_token"))?;
        let lifetime = json.get("expires_in").and_then(|e| e.as_u64()).unwrap_or(60);
        self.renew_at = Some(asked + Duration::from_secs(lifetime) * 4 / 5);
        Ok(RegistryAuth::Bearer(access.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(s: &str) -> Registry {
        match s.parse::<ImageRef>().unwrap() {
            ImageRef::Registry(r) => r,
            _ => unreachable!(),
        }
    }

    #[test]
    fn credentials_as_containers_auth_json_has_them() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let file = serde_json::json!({"auths": {
            "ghcr.io": {"auth": b64("me:general")},
            "ghcr.io/team/private": {"auth": b64("me:specific")},
            "https://index.docker.io/v1/": {"auth": b64("hub:secret")},
            // As `docker login` writes it for Azure: a placeholder user and the refresh token.
            "team.azurecr.io": {"auth": b64("00000000-0000-0000-0000-000000000000:"), "identitytoken": "refresh"},
        }})
        .to_string();
        let basic = |u: &str, p: &str| Credentials::Basic(u.into(), p.into());
        let got = |s: &str| lookup(file.as_bytes(), &registry(s)).unwrap();
        assert_eq!(got("ghcr.io/team/private/job:1"), basic("me", "specific"));
        assert_eq!(got("ghcr.io/other/job"), basic("me", "general"));
        assert_eq!(got("pytorch/pytorch"), basic("hub", "secret"));
        assert_eq!(got("team.azurecr.io/job:1"), Credentials::IdentityToken("refresh".into()));
        assert_eq!(got("quay.io/x/y"), Credentials::Anonymous);
        assert!(lookup(b"{}", &registry("busybox")).is_err());
        // Secrets are not printed.
        for printed in [format!("{:?}", got("ghcr.io/other/job")), format!("{:?}", got("team.azurecr.io/job:1"))] {
            assert!(!printed.contains("general") && !printed.contains("refresh"), "{printed}");
        }
    }

    /// A token service as the distribution spec describes it, on the loopback address: `/v2/`
    /// challenges (unless `challenge` is false: a registry open to all), the POST must carry the
    /// refresh token, the grant and the scope.
    fn token_service(answer: &'static str, challenge: bool) -> (String, std::thread::JoinHandle<String>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
        let realm = format!("http://{host}/token");
        let served = std::thread::spawn(move || {
            let mut posted = String::new();
            for _ in 0..if challenge { 2 } else { 1 } {
                let (stream, _) = listener.accept().unwrap();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    request.push_str(&line);
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let mut stream = stream;
                if request.starts_with("GET /v2/ ") && !challenge {
                    write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}").unwrap();
                } else if request.starts_with("GET /v2/ ") {
                    let challenge = format!("Bearer realm=\"{realm}\",service=\"test-registry\"");
                    write!(stream, "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: {challenge}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").unwrap();
                } else {
                    posted = String::from_utf8(body).unwrap();
                    write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}", answer.len()).unwrap();
                }
            }
            posted
        });
        (host, served)
    }

    /// The blobs asked of the fake registry, in order (`DIGEST` or `DIGEST@OFFSET` for a range
    /// from OFFSET), and a signal of each new one.
    type Asked = std::sync::Arc<(std::sync::Mutex<Vec<String>>, std::sync::Condvar)>;

    /// How the fake registry serves layers' blobs, beyond plainly.
    #[derive(Clone, Copy, PartialEq)]
    enum Mischief {
        /// The first layer's blob is held back until every other layer's is asked for, or
        /// 10 s have passed.
        HoldFirstLayer,
        /// Each layer's first answer breaks off half-way (its length promises the whole); a
        /// range request is answered from its offset (206).
        BreakEachLayerOnce,
        /// As `BreakEachLayerOnce`, but a range request is answered with the whole blob (200),
        /// as a server that does not do ranges answers.
        IgnoreRange,
        /// As `BreakEachLayerOnce`, but a range request is answered with a 206 of the whole
        /// blob, from its first byte: not the range asked for.
        WrongRange,
        /// Each layer comes with a mebibyte more than its descriptor's size.
        TooLong,
    }

    /// A registry on the loopback address with one image, `job:v1`, of `layers` (plain tars):
    /// every request on a connection of its own, answered and closed.
    fn fake_registry(layers: &[Vec<u8>], mischief: Mischief) -> (String, Asked) {
        use std::io::{BufRead, BufReader, Write};
        let diff_ids: Vec<String> = layers.iter().map(|l| Digest::of(l).as_str().to_owned()).collect();
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": {},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        })
        .to_string();
        let descriptor = |media: &str, bytes: &[u8]| serde_json::json!({"mediaType": media, "digest": Digest::of(bytes).as_str(), "size": bytes.len()});
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": manifest::OCI_IMAGE_MEDIA_TYPE,
            "config": descriptor("application/vnd.oci.image.config.v1+json", config.as_bytes()),
            "layers": layers.iter().map(|l| descriptor("application/vnd.oci.image.layer.v1.tar", l)).collect::<Vec<_>>(),
        })
        .to_string();
        let mut blobs: std::collections::HashMap<String, Vec<u8>> =
            layers.iter().map(|l| (Digest::of(l).as_str().to_owned(), l.clone())).collect();
        blobs.insert(Digest::of(config.as_bytes()).as_str().to_owned(), config.into_bytes());
        let first = Digest::of(&layers[0]).as_str().to_owned();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = format!("127.0.0.1:{}", listener.local_addr().unwrap().port());
        let asked: Asked = Default::default();
        let (blobs, asked_too) = (std::sync::Arc::new(blobs), asked.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (blobs, asked, manifest, first) =
                    (blobs.clone(), asked_too.clone(), manifest.clone(), first.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut request = String::new();
                    while reader.read_line(&mut request).unwrap_or(0) > 2 && !request.ends_with("\r\n\r\n") {}
                    let path = request.split_whitespace().nth(1).unwrap_or_default().to_owned();
                    let range: Option<usize> = request.lines().find_map(|l| {
                        let l = l.to_ascii_lowercase();
                        l.strip_prefix("range: bytes=")?.trim().strip_suffix('-')?.parse().ok()
                    });
                    let mut stream = stream;
                    let (kind, body) = if path == "/v2/job/manifests/v1" {
                        (manifest::OCI_IMAGE_MEDIA_TYPE, manifest.into_bytes())
                    } else if let Some(digest) = path.strip_prefix("/v2/job/blobs/") {
                        let (paths, changed) = &*asked;
                        let mut paths = paths.lock().unwrap();
                        let layer = layers_blob(digest, &blobs);
                        let again = paths.iter().any(|p| p.split('@').next() == Some(digest));
                        paths.push(range.map_or(digest.to_owned(), |r| format!("{digest}@{r}")));
                        changed.notify_all();
                        let mut blob = blobs.get(digest).cloned().unwrap_or_default();
                        if digest == first && mischief == Mischief::HoldFirstLayer {
                            let others = |p: &mut Vec<String>| {
                                let others: std::collections::HashSet<&String> =
                                    p.iter().filter(|d| **d != first && layers_blob(d, &blobs)).collect();
                                others.len() + 2 == blobs.len()
                            };
                            let _ = changed.wait_timeout_while(paths, Duration::from_secs(10), |p| !others(p));
                        } else if layer && mischief == Mischief::TooLong {
                            blob.extend(std::iter::repeat_n(0, 1 << 20));
                        } else if layer && mischief != Mischief::HoldFirstLayer && !again {
                            let _ = write!(
                                stream,
                                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
                                blob.len()
                            );
                            let _ = stream.write_all(&blob[..blob.len() / 2]);
                            return;
                        } else if let Some(asked_from) = range.filter(|_| layer && mischief != Mischief::IgnoreRange) {
                            let offset = if mischief == Mischief::WrongRange { 0 } else { asked_from };
                            let _ = write!(
                                stream,
                                "HTTP/1.1 206 Partial Content\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {offset}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                blob.len() - 1,
                                blob.len(),
                                blob.len() - offset
                            );
                            let _ = stream.write_all(&blob[offset..]);
                            return;
                        }
                        ("application/octet-stream", blob)
                    } else {
                        ("application/json", b"{}".to_vec())
                    };
                    let _ = write!(
                        stream,
                        "HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(&body);
                });
            }
        });
        (host, asked)
    }

    /// Whether `digest` is one of the layers (not the config) the fake registry serves.
    fn layers_blob(digest: &str, blobs: &std::collections::HashMap<String, Vec<u8>>) -> bool {
        blobs.get(digest.split('@').next().unwrap_or(digest)).is_some_and(|b| !b.starts_with(b"{"))
    }

    /// A pull of `job:v1` from a fake registry into a new store, and what came of it.
    struct Pulled {
        result: Result<ImageRecord, Error>,
        events: Vec<Progress>,
        /// What was asked of the registry (see [`Asked`]).
        asked: Vec<String>,
        layers: Vec<Vec<u8>>,
        store: Store,
        dir: tempfile::TempDir,
    }

    impl Pulled {
        /// Pulls an image of three layers (100 kB of files each) from a fake registry.
        fn from_fake(mischief: Mischief) -> Pulled {
            use crate::unpack::tests::tar_of;
            let layers: Vec<Vec<u8>> = (0..3)
                .map(|i| tar_of(&[(&format!("file{i}"), tar::EntryType::Regular, &vec![b'x'; 100_000], None)]))
                .collect();
            let (host, asked) = fake_registry(&layers, mischief);
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("store")).unwrap();
            let image: ImageRef = format!("{host}/job:v1").parse().unwrap();
            let ImageRef::Registry(r) = &image else { unreachable!() };
            let mut events = Vec::new();
            let result = pull(&store, &image, r, &mut |p| events.push(p));
            let asked = asked.0.lock().unwrap().clone();
            Pulled { result, events, asked, layers, store, dir }
        }

        /// How often the blob of `layer` was asked for.
        fn asks_for(&self, layer: &[u8]) -> Vec<&String> {
            let digest = Digest::of(layer);
            self.asked.iter().filter(|a| a.starts_with(digest.as_str())).collect()
        }

        fn scratch_left(&self) -> bool {
            self.dir.path().join("store/tmp").read_dir().unwrap().next().is_some()
        }
    }

    #[test]
    fn layers_download_three_at_once() {
        // The store must be root's.
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let t = Instant::now();
        let p = Pulled::from_fake(Mischief::HoldFirstLayer);
        let (record, events) = (p.result.as_ref().unwrap(), &p.events);
        assert!(t.elapsed() < Duration::from_secs(8), "the first layer was let go only after 10 s: {events:?}");
        assert_eq!(p.asks_for(&p.layers[0]).len(), 1, "{:?}", p.asked);
        assert_eq!(record.layers, p.layers.iter().map(|l| Digest::of(l)).collect::<Vec<_>>());
        assert!(record.layers.iter().all(|l| p.store.has_layer(l)));
        // All three downloads began before any layer was in.
        let position = |f: &dyn Fn(&Progress) -> bool| events.iter().position(f).unwrap();
        let last_start =
            (1..=3).map(|i| position(&|e| matches!(e, Progress::Fetching { index, done: 0, .. } if *index == i))).max();
        assert!(last_start < Some(position(&|e| matches!(e, Progress::Unpacked { .. }))), "{events:?}");
        assert_eq!(events.iter().filter(|e| matches!(e, Progress::Unpacked { .. })).count(), 3, "{events:?}");
        assert!(!p.scratch_left());
    }

    #[test]
    fn a_download_that_breaks_off_resumes_where_it_stopped() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let p = Pulled::from_fake(Mischief::BreakEachLayerOnce);
        let record = p.result.as_ref().unwrap();
        assert!(record.layers.iter().all(|l| p.store.has_layer(l)), "{:?}", p.events);
        for (i, layer) in p.layers.iter().enumerate() {
            // Asked twice: whole, then from where the first answer broke off, which was half.
            let (digest, half, size) = (Digest::of(layer), layer.len() / 2, layer.len() as u64);
            assert_eq!(
                p.asks_for(layer),
                [&digest.as_str().to_owned(), &format!("{digest}@{half}")],
                "layer {}",
                i + 1
            );
            let resumed = |e: &Progress| matches!(e, Progress::Resuming { index, done, .. } if *index == i + 1 && *done == half as u64);
            assert!(p.events.iter().any(resumed), "{:?}", p.events);
            let whole = Progress::Fetching { index: i + 1, done: size, total: Some(size) };
            assert!(p.events.contains(&whole), "{:?}", p.events);
        }
        assert!(!p.scratch_left());
    }

    #[test]
    fn a_resume_answered_with_the_whole_blob_or_the_wrong_range_starts_over() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        for (mischief, asks_after) in [(Mischief::IgnoreRange, 2), (Mischief::WrongRange, 3)] {
            let p = Pulled::from_fake(mischief);
            let record = p.result.as_ref().unwrap_or_else(|e| panic!("{e}"));
            assert!(record.layers.iter().all(|l| p.store.has_layer(l)), "{:?}", p.events);
            for (i, layer) in p.layers.iter().enumerate() {
                // Whole, broken off; the rest asked for; (the whole again, for a wrong range).
                let digest = Digest::of(layer);
                let asks = p.asks_for(layer);
                assert_eq!(asks.len(), asks_after, "layer {}: {:?}", i + 1, p.asked);
                assert_eq!(asks[1], &format!("{digest}@{}", layer.len() / 2), "{:?}", p.asked);
                // The count went back to nothing after the resume, as the file did.
                let from_nothing =
                    |e: &Progress| matches!(e, Progress::Fetching { index, done: 0, .. } if *index == i + 1);
                assert_eq!(p.events.iter().filter(|e| from_nothing(e)).count(), 2, "{:?}", p.events);
            }
            assert!(!p.scratch_left());
        }
    }

    #[test]
    fn a_blob_longer_than_its_descriptor_is_refused_and_leaves_nothing() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let p = Pulled::from_fake(Mischief::TooLong);
        let e = p.result.as_ref().unwrap_err().to_string();
        assert!(e.contains("more than the") && e.contains("bytes the manifest gives"), "{e}");
        assert!(p.layers.iter().all(|l| !p.store.has_layer(&Digest::of(l))));
        assert!(p.store.list().unwrap().is_empty(), "an image was recorded");
        // Not tried again: the registry's bytes are wrong, not its connection.
        assert!(p.layers.iter().all(|l| p.asks_for(l).len() <= 1), "{:?}", p.asked);
        assert!(!p.scratch_left());
    }

    #[test]
    fn an_identity_token_is_exchanged_for_an_access_token() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (host, served) = token_service(r#"{"access_token":"access","expires_in":300}"#, true);
        let mut token = IdentityToken::new(&host, "team/job", "refresh".into());
        let access = runtime.block_on(token.exchange()).unwrap();
        assert_eq!(format!("{access:?}"), format!("{:?}", RegistryAuth::Bearer("access".into())));
        assert!(!token.due(), "a token of 300 s is due at once");
        let posted = served.join().unwrap();
        for field in [
            "grant_type=refresh_token",
            "refresh_token=refresh",
            "service=test-registry",
            "scope=repository%3Ateam%2Fjob%3Apull",
        ] {
            assert!(posted.contains(field), "{field} not in {posted}");
        }
        let (host, _) = token_service(r#"{"error":"nope"}"#, true);
        let err = runtime.block_on(IdentityToken::new(&host, "job", "refresh".into()).exchange()).unwrap_err();
        assert!(err.contains("no access_token"), "{err}");
        // A token that lives no time is renewed before the next layer.
        let (host, _) = token_service(r#"{"access_token":"brief","expires_in":0}"#, true);
        let mut brief = IdentityToken::new(&host, "job", "refresh".into());
        runtime.block_on(brief.exchange()).unwrap();
        assert!(brief.due());
        // A registry that asks for no token is pulled from anonymously, the token not sent.
        let (host, served) = token_service(r#"{"access_token":"unasked"}"#, false);
        let open = runtime.block_on(IdentityToken::new(&host, "job", "refresh".into()).exchange()).unwrap();
        assert_eq!(format!("{open:?}"), format!("{:?}", RegistryAuth::Anonymous));
        assert_eq!(served.join().unwrap(), "", "the identity token was posted");
    }

    #[test]
    fn the_identity_token_goes_only_over_https() {
        assert!(may_receive_token("https://auth.example.com/token", false));
        assert!(!may_receive_token("http://auth.example.com/token", false));
        assert!(may_receive_token("http://127.0.0.1:5000/token", true));
        assert!(!may_receive_token("ftp://auth.example.com/token", true));
    }

    #[test]
    fn loopback_registries_are_plain_http() {
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost"));
        assert!(!is_loopback("registry.example.com:5000"));
        assert!(!is_loopback("docker.io"));
    }
}

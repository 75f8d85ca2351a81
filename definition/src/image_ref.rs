//! `Image=`: an image named the way skopeo and Podman users write it, one grammar for the
//! definition, `gpuboxctl image` and the store.
//!
//! - `oci:DIR[:TAG]`: an OCI image layout directory;
//! - `oci-archive:FILE[:TAG]`: a tar of one;
//! - `docker-archive:FILE[:NAME:TAG]`: what `docker save` and `podman save` write;
//! - `docker://REFERENCE` or a bare `REFERENCE`: a registry, with Docker's normalisation
//!   (`busybox` is `docker.io/library/busybox:latest`; a first component with a `.` or `:`,
//!   or `localhost`, is a registry host).
//!
//! [`ImageRef::name`] is the canonical spelling, the name an image has in the store.

use std::fmt;
use std::path::PathBuf;

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageRef {
    OciLayout { dir: PathBuf, tag: Option<String> },
    OciArchive { file: PathBuf, tag: Option<String> },
    DockerArchive { file: PathBuf, reference: Option<Box<Registry>> },
    Registry(Registry),
}

/// A registry reference, normalised: `registry/repository` with a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Registry {
    /// `docker.io`, `ghcr.io`, `localhost:5000`.
    pub registry: String,
    /// `library/busybox`, `pytorch/pytorch`.
    pub repository: String,
    /// A tag (`latest` when neither is given) or, with [`Registry::digest`], none.
    pub tag: Option<String>,
    /// `sha256:…` for a reference by digest.
    pub digest: Option<String>,
}

/// The registry a bare name goes to, as Docker and Podman's default.
pub const DEFAULT_REGISTRY: &str = "docker.io";

impl ImageRef {
    /// The canonical spelling: the store's name for the image.
    pub fn name(&self) -> String {
        self.to_string()
    }

    /// Whether getting it may need the network.
    pub fn is_remote(&self) -> bool {
        matches!(self, ImageRef::Registry(_))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let with_tag = |f: &mut fmt::Formatter<'_>, t: &str, p: &PathBuf, tag: &Option<String>| {
            write!(f, "{t}:{}", p.display())?;
            tag.as_ref().map_or(Ok(()), |tag| write!(f, ":{tag}"))
        };
        match self {
            ImageRef::OciLayout { dir, tag } => with_tag(f, "oci", dir, tag),
            ImageRef::OciArchive { file, tag } => with_tag(f, "oci-archive", file, tag),
            ImageRef::DockerArchive { file, reference } => {
                write!(f, "docker-archive:{}", file.display())?;
                reference.as_ref().map_or(Ok(()), |r| write!(f, ":{r}"))
            }
            ImageRef::Registry(r) => r.fmt(f),
        }
    }
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("an image reference is empty".into());
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = path_and_tag(rest, "oci:DIR[:TAG]")?;
            return Ok(ImageRef::OciLayout { dir, tag });
        }
        if let Some(rest) = s.strip_prefix("oci-archive:") {
            let (file, tag) = path_and_tag(rest, "oci-archive:FILE[:TAG]")?;
            return Ok(ImageRef::OciArchive { file, tag });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            let (file, reference) = match rest.split_once(':') {
                Some((file, r)) => (file, Some(Box::new(parse_registry(r)?))),
                None => (rest, None),
            };
            return Ok(ImageRef::DockerArchive { file: absolute(file, "docker-archive:FILE[:NAME:TAG]")?, reference });
        }
        // skopeo's other transports, and any `X:/path`: never a tag (a tag has no '/').
        if let Some((transport, rest)) = s.split_once(':') {
            let other = ["containers-storage", "dir", "docker-daemon", "ostree", "sif"].contains(&transport);
            let docker = transport == "docker" && rest.starts_with("//");
            if !docker && (other || (rest.starts_with('/') && !transport.contains(['/', '.']))) {
                return Err(format!(
                    "'{transport}:' is not a transport gpubox reads (oci:, oci-archive:, docker-archive:, docker://)"
                ));
            }
        }
        let reference = s.strip_prefix("docker://").unwrap_or(s);
        parse_registry(reference).map(ImageRef::Registry)
    }
}

fn path_and_tag(rest: &str, form: &str) -> Result<(PathBuf, Option<String>), String> {
    let (path, tag) = match rest.split_once(':') {
        Some((path, tag)) => (path, Some(tag)),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        if tag.is_empty() || tag.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("'{tag}' is not a tag ({form})"));
        }
    }
    Ok((absolute(path, form)?, tag.map(str::to_owned)))
}

fn absolute(path: &str, form: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(path);
    if !p.is_absolute() {
        return Err(format!("'{path}' is not an absolute path ({form})"));
    }
    if p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(format!("'{path}' contains '..'"));
    }
    Ok(p)
}

/// Docker's reference grammar, normalised (distribution/reference's `ParseNormalizedNamed`).
fn parse_registry(s: &str) -> Result<Registry, String> {
    let bad = |why: &str| format!("'{s}' is not an image reference: {why}");
    let (rest, digest) = match s.split_once('@') {
        Some((rest, digest)) => {
            let hex = digest.strip_prefix("sha256:").ok_or_else(|| bad("a digest is sha256:HEX"))?;
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
                return Err(bad("a sha256 digest has 64 lowercase hexadecimal digits"));
            }
            (rest, Some(digest.to_owned()))
        }
        None => (s, None),
    };
    // A tag follows the last ':' after the last '/' (a registry's port comes before a '/').
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let ok = !tag.is_empty()
            && tag.len() <= 128
            && tag.chars().next().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && tag.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
        if !ok {
            return Err(bad("a tag is letters, digits, '_', '.' and '-', at most 128"));
        }
    }
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
            (first.to_owned(), rest.to_owned())
        }
        _ => (DEFAULT_REGISTRY.to_owned(), name.to_owned()),
    };
    let repository = if registry == DEFAULT_REGISTRY && !repository.contains('/') {
        format!("library/{repository}")
    } else {
        repository
    };
    if repository.is_empty() {
        return Err(bad("the name is empty"));
    }
    for component in repository.split('/') {
        let ok = !component.is_empty()
            && component.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && component.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && component.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
        if !ok {
            return Err(bad("a name is lowercase letters, digits and separators ('.', '_', '-') between '/'"));
        }
    }
    if registry.chars().any(|c| !(c.is_ascii_alphanumeric() || ".-:[]".contains(c))) {
        return Err(bad("the registry is a host name with an optional port"));
    }
    let tag = match (tag, &digest) {
        (Some(t), _) => Some(t.to_owned()),
        (None, Some(_)) => None,
        (None, None) => Some("latest".to_owned()),
    };
    Ok(Registry { registry, repository, tag, digest })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> String {
        s.parse::<ImageRef>().unwrap().name()
    }

    #[test]
    fn docker_normalisation() {
        assert_eq!(name("busybox"), "docker.io/library/busybox:latest");
        assert_eq!(name("busybox:1.36"), "docker.io/library/busybox:1.36");
        assert_eq!(
            name("docker://pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"),
            "docker.io/pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
        );
        assert_eq!(name("localhost:5000/job"), "localhost:5000/job:latest");
        assert_eq!(name("localhost/job:v1"), "localhost/job:v1");
        assert_eq!(name("nvcr.io/nvidia/pytorch:24.10-py3"), "nvcr.io/nvidia/pytorch:24.10-py3");
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(name(&format!("ghcr.io/x/y@{digest}")), format!("ghcr.io/x/y@{digest}"));
        assert!(ImageRef::Registry(parse_registry("busybox").unwrap()).is_remote());
    }

    #[test]
    fn local_transports() {
        assert_eq!(
            "oci:/srv/images/torch:2.5".parse::<ImageRef>().unwrap(),
            ImageRef::OciLayout { dir: "/srv/images/torch".into(), tag: Some("2.5".into()) }
        );
        assert_eq!(name("oci:/srv/layout"), "oci:/srv/layout");
        assert_eq!(name("oci-archive:/tmp/a.tar:v1"), "oci-archive:/tmp/a.tar:v1");
        assert_eq!(name("docker-archive:/tmp/s.tar"), "docker-archive:/tmp/s.tar");
        assert_eq!(
            name("docker-archive:/tmp/s.tar:busybox:1"),
            "docker-archive:/tmp/s.tar:docker.io/library/busybox:1"
        );
        assert!(!"oci:/x".parse::<ImageRef>().unwrap().is_remote());
    }

    #[test]
    fn mistakes_are_named() {
        for (bad, says) in [
            ("", "empty"),
            ("oci:relative/dir", "absolute"),
            ("oci:/a/../b", "'..'"),
            ("Busybox", "lowercase"),
            ("busybox:bad tag", "tag"),
            ("x@sha256:12", "64"),
            ("containers-storage:foo", "transport"),
            ("dir:/srv/x", "transport"),
        ] {
            let e = bad.parse::<ImageRef>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}

//! What an image's config supplies to a container, as `podman run IMAGE [CMD]` takes it: the
//! command is the image's `Entrypoint` followed by `Cmd` (or by the definition's `Exec=`, which
//! replaces `Cmd` only), its `Env` comes before `Environment=`, and `WorkingDir` and `User`
//! apply where the definition says nothing.

use crate::{Digest, Error};
use oci_spec::image::ImageConfiguration;

/// The parts of an image config a container takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageDefaults {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// The layers' diff_ids, bottom first, as the config lists them.
    pub diff_ids: Vec<Digest>,
}

impl ImageDefaults {
    pub fn parse(config: &[u8]) -> Result<ImageDefaults, Error> {
        let c = ImageConfiguration::from_reader(config)
            .map_err(|e| Error::Format(format!("the image's config is not an OCI image config: {e}")))?;
        let diff_ids = c.rootfs().diff_ids().iter().map(|d| Digest::parse(d)).collect::<Result<_, _>>()?;
        let Some(cfg) = c.config() else { return Ok(ImageDefaults { diff_ids, ..Default::default() }) };
        let env = cfg
            .env()
            .iter()
            .flatten()
            .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        Ok(ImageDefaults {
            entrypoint: cfg.entrypoint().clone().unwrap_or_default(),
            cmd: cfg.cmd().clone().unwrap_or_default(),
            env,
            working_dir: cfg.working_dir().clone().filter(|w| !w.is_empty()),
            user: cfg.user().clone().filter(|u| !u.is_empty()),
            diff_ids,
        })
    }

    /// The container's command: the entrypoint, then `exec` (the definition's `Exec=`) or the
    /// image's `Cmd`.
    pub fn command(&self, exec: &[String]) -> Vec<String> {
        let tail = if exec.is_empty() { &self.cmd } else { exec };
        self.entrypoint.iter().chain(tail).cloned().collect()
    }

    /// The environment: the image's, with the definition's `environment` over it.
    pub fn environment(&self, environment: &[(String, String)]) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> =
            self.env.iter().filter(|(k, _)| !environment.iter().any(|(n, _)| n == k)).cloned().collect();
        env.extend(environment.iter().cloned());
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"{"architecture":"amd64","os":"linux",
        "config":{"Env":["PATH=/usr/local/bin:/usr/bin","LANG=C.UTF-8"],"Entrypoint":["/init"],
                  "Cmd":["python3"],"WorkingDir":"/work","User":"1000:1000"},
        "rootfs":{"type":"layers","diff_ids":["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]}}"#;

    #[test]
    fn defaults_as_podman_run_takes_them() {
        let d = ImageDefaults::parse(CONFIG.as_bytes()).unwrap();
        assert_eq!(d.command(&[]), ["/init", "python3"]);
        assert_eq!(d.command(&["bash".into()]), ["/init", "bash"]);
        let env = d.environment(&[("LANG".into(), "en_US.UTF-8".into())]);
        assert_eq!(env, [("PATH".into(), "/usr/local/bin:/usr/bin".into()), ("LANG".into(), "en_US.UTF-8".into())]);
        assert_eq!(d.working_dir.as_deref(), Some("/work"));
        assert_eq!(d.user.as_deref(), Some("1000:1000"));
        assert_eq!(d.diff_ids.len(), 1);
        assert!(ImageDefaults::parse(b"{}").is_err());
    }
}

//! What the supervisor's processes say to each other, typed, with one encoding each and
//! round-trip tests: the child's reports on its error pipe, and the mount helper's requests and
//! answers. Nothing here does I/O beyond the reader it is given.

use crate::devices::Access;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::path::PathBuf;

/// The child's reports on the error pipe, which closes on exec: `created` once the file
/// system is ready for the CDI hooks (only when there are hooks), or a failure with the exit
/// status to report and why, after which the child exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildReport {
    Created,
    Failed { code: i32, message: String },
}

impl ChildReport {
    /// `created\n`, or `failed CODE\n` and the message to the end (it may span lines).
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ChildReport::Created => b"created\n".to_vec(),
            ChildReport::Failed { code, message } => format!("failed {code}\n{message}").into_bytes(),
        }
    }

    /// The next report; `None` when the pipe closed without one (the payload exec'd).
    pub fn read(from: &mut impl BufRead) -> Result<Option<ChildReport>> {
        let mut line = String::new();
        if from.read_line(&mut line).context("reading the child's report")? == 0 {
            return Ok(None);
        }
        match line.trim_end_matches('\n') {
            "created" => Ok(Some(ChildReport::Created)),
            head => {
                let Some(code) = head.strip_prefix("failed ").and_then(|c| c.parse().ok()) else {
                    bail!("the child said {head:?}");
                };
                let mut message = String::new();
                from.read_to_string(&mut message).context("reading the child's report")?;
                Ok(Some(ChildReport::Failed { code, message }))
            }
        }
    }
}

/// A request to the mount helper (mount_helper.rs), one JSON document per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum HelperRequest {
    /// Make a node of these numbers and this access at `path` inside.
    Attach { major: u32, minor: u32, uid: u32, gid: u32, mode: u32, path: PathBuf },
    /// Unmount what is at `path` inside and remove the mount point.
    Detach { path: PathBuf },
    /// Bind the host's `source` at `target` inside.
    Bind { source: PathBuf, target: PathBuf, read_only: bool },
    /// Unmount a bind (its mount point goes only if the helper made it).
    Unbind { target: PathBuf },
}

impl HelperRequest {
    pub fn attach(major: u32, minor: u32, access: Access, path: PathBuf) -> HelperRequest {
        let Access { uid, gid, mode } = access;
        HelperRequest::Attach { major, minor, uid, gid, mode, path }
    }
}

/// The helper's answer to one request, one JSON document per line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum HelperAnswer {
    Ok,
    Error { message: String },
}

/// One line of JSON: what it encodes cannot hold a newline (JSON escapes them), so a path
/// with one is passed as it is.
pub fn encode_line<T: Serialize>(message: &T) -> Result<String> {
    let mut line = serde_json::to_string(message)?;
    line.push('\n');
    Ok(line)
}

pub fn decode_line<T: for<'a> Deserialize<'a>>(line: &str) -> Result<T> {
    serde_json::from_str(line.trim_end_matches('\n')).with_context(|| format!("malformed message {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_reports_round_trip() {
        let failed = ChildReport::Failed { code: 127, message: "cannot execute x:\nnot found".into() };
        let mut bytes = ChildReport::Created.encode();
        bytes.extend(failed.encode());
        let mut reader = std::io::BufReader::new(&bytes[..]);
        assert_eq!(ChildReport::read(&mut reader).unwrap(), Some(ChildReport::Created));
        assert_eq!(ChildReport::read(&mut reader).unwrap(), Some(failed));
        assert_eq!(ChildReport::read(&mut reader).unwrap(), None);
        // The pipe closed on exec: no report at all.
        assert_eq!(ChildReport::read(&mut std::io::BufReader::new(&b""[..])).unwrap(), None);
        assert!(ChildReport::read(&mut std::io::BufReader::new(&b"1\n"[..])).is_err());
    }

    #[test]
    fn helper_messages_round_trip_whatever_the_paths_hold() {
        let requests = [
            HelperRequest::attach(226, 1, Access { uid: 100000, gid: 100044, mode: 0o660 }, "/dev/dri/card1".into()),
            HelperRequest::Detach { path: "/dev/a b\nc".into() },
            HelperRequest::Bind { source: "/usr/lib/x 1".into(), target: "/run/y".into(), read_only: true },
            HelperRequest::Unbind { target: "/run/y".into() },
        ];
        for request in requests {
            let line = encode_line(&request).unwrap();
            assert_eq!(line.matches('\n').count(), 1, "{line}");
            assert_eq!(decode_line::<HelperRequest>(&line).unwrap(), request);
        }
        for answer in [HelperAnswer::Ok, HelperAnswer::Error { message: "no\nway".into() }] {
            assert_eq!(decode_line::<HelperAnswer>(&encode_line(&answer).unwrap()).unwrap(), answer);
        }
        assert!(decode_line::<HelperRequest>("attach 1 2\n").is_err());
    }
}

//! Content digests (`sha256:HEX`, the only algorithm OCI images use in practice) and a reader
//! that digests what passes through it, so that a blob is verified as it is read, never after
//! it was trusted.

use crate::Error;
use sha2::{Digest as _, Sha256};
use std::io::{self, Read};

/// A `sha256:` digest, checked: 64 lowercase hexadecimal digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    pub fn parse(s: &str) -> Result<Digest, Error> {
        let hex = s.strip_prefix("sha256:").ok_or_else(|| Error::Format(format!("'{s}' is not a sha256 digest")))?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(Error::Format(format!("'{s}' is not a sha256 digest")));
        }
        Ok(Digest(s.to_owned()))
    }

    /// The hexadecimal part: a file name in the store.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex(&Sha256::digest(bytes))))
    }

    /// A short form for people (`sha256:` dropped, 12 digits), as `podman images` shows ids.
    pub fn short(&self) -> &str {
        &self.hex()[..12]
    }

    /// Checks `bytes` against this digest.
    pub fn verify(&self, what: &str, bytes: &[u8]) -> Result<(), Error> {
        let actual = Digest::of(bytes);
        if &actual != self {
            return Err(Error::DigestMismatch { what: what.to_owned(), expected: self.clone(), actual });
        }
        Ok(())
    }
}

impl TryFrom<String> for Digest {
    type Error = Error;
    fn try_from(s: String) -> Result<Digest, Error> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Digests and counts what is read through it.
pub struct Digesting<R> {
    inner: R,
    hasher: Sha256,
    pub bytes: u64,
}

impl<R: Read> Digesting<R> {
    pub fn new(inner: R) -> Self {
        Digesting { inner, hasher: Sha256::new(), bytes: 0 }
    }

    /// Reads what is left (a tar's trailing blocks, a compressor's end), then gives the digest.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((Digest(format!("sha256:{}", hex(&self.hasher.finalize()))), self.bytes))
    }
}

impl<R: Read> Read for Digesting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked_and_computed() {
        let d = Digest::of(b"");
        assert_eq!(d.as_str(), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        assert!(Digest::parse(d.as_str()).is_ok());
        assert!(Digest::parse("sha256:E3B0").is_err());
        assert!(Digest::parse("md5:00").is_err());
        assert!(d.verify("x", b"").is_ok());
        assert!(matches!(d.verify("x", b"y"), Err(Error::DigestMismatch { .. })));
        let mut r = Digesting::new(&b"abc"[..]);
        let mut first = [0u8; 1];
        r.read_exact(&mut first).unwrap();
        assert_eq!(r.finish().unwrap(), (Digest::of(b"abc"), 3));
    }
}

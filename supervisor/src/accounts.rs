//! The container's own users and groups: `/etc/passwd` and `/etc/group` of its root, the one
//! reader of them for the supervisor (the group its devices get), the child (`User=`) and
//! `gpuboxctl exec` (`--user`); and the one parser of group files, the host's too.
//! They belong to the payload, so they are read as untrusted: resolved inside the root, a
//! regular file only (never a FIFO or `/dev/zero`), at most [`LIMIT`] bytes.

use crate::in_root;
use gpubox_definition::User;
use std::os::fd::BorrowedFd;
use std::path::Path;

/// Larger than any real account database; a bound on what a payload can make us read.
pub const LIMIT: u64 = 4 << 20;

/// An account as `User=` resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

/// The text of `/etc/passwd` or `/etc/group` in the root; empty when there is none, an error
/// naming the file when it is something else than a small regular file.
pub fn read(root: BorrowedFd, file: &str) -> Result<String, String> {
    match in_root::read_small(root, Path::new(file), LIMIT) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(format!("{file} in the container: {e}")),
    }
}

/// `(name, uid, gid, home)` of the first passwd line that `matches`.
fn passwd_entry(passwd: &str, matches: impl Fn(&[&str]) -> bool) -> Option<(String, u32, u32, String)> {
    passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && matches(f))
        .and_then(|f| Some((f[0].to_owned(), f[2].parse().ok()?, f[3].parse().ok()?, f[5].to_owned())))
}

/// Resolves `User=` (root without it) in the given passwd and group texts.
pub fn resolve(user: Option<&User>, passwd: &str, group: &str) -> Result<Account, String> {
    let (name, uid, gid, home) = match user {
        None => return Ok(Account { uid: 0, gid: 0, groups: vec![], home: "/root".into() }),
        Some(User::Name(n)) => passwd_entry(passwd, |f| f[0] == n)
            .ok_or_else(|| format!("User={n}: no such user in the container's /etc/passwd"))?,
        Some(User::Id { uid, gid }) => match passwd_entry(passwd, |f| f[2] == uid.to_string()) {
            Some((name, u, g, home)) => (name, u, gid.unwrap_or(g), home),
            None => (String::new(), *uid, gid.unwrap_or(*uid), "/".into()),
        },
    };
    let groups = group
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4 && !name.is_empty() && f[3].split(',').any(|m| m == name))
                .then(|| f[2].parse().ok())
                .flatten()
        })
        .chain(std::iter::once(gid))
        .collect();
    Ok(Account { uid, gid, groups, home })
}

/// The id of group `name` in a group file's text (the one reader of group files, the host's
/// too: the control socket's `gpubox` group).
pub fn group_id(group: &str, name: &str) -> Option<u32> {
    group.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.len() >= 3 && f[0] == name)?[2].parse().ok()
}

/// The group of `User=` for the container's device nodes: its passwd group where only a name
/// or uid is given; root's without `User=`, or when it cannot be found.
pub fn primary_group(user: Option<&User>, passwd: &str) -> u32 {
    match user {
        None => 0,
        Some(User::Id { gid: Some(g), .. }) => *g,
        Some(User::Id { uid, gid: None }) => passwd_entry(passwd, |f| f[2] == uid.to_string()).map_or(*uid, |e| e.2),
        Some(User::Name(n)) => passwd_entry(passwd, |f| f[0] == n).map_or(0, |e| e.2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:100:Alice:/home/alice:/bin/sh\nbroken\n";
    const GROUP: &str = "root:x:0:\nvideo:x:44:alice,bob\nrender:x:105:alice\nusers:x:100:\n";

    #[test]
    fn users_by_name_and_id() {
        let alice = resolve(Some(&User::Name("alice".into())), PASSWD, GROUP).unwrap();
        assert_eq!(
            (alice.uid, alice.gid, alice.groups, alice.home.as_str()),
            (1000, 100, vec![44, 105, 100], "/home/alice")
        );
        let by_id = resolve(Some(&User::Id { uid: 1000, gid: Some(7) }), PASSWD, GROUP).unwrap();
        assert_eq!((by_id.uid, by_id.gid), (1000, 7));
        let unknown = resolve(Some(&User::Id { uid: 4242, gid: None }), PASSWD, GROUP).unwrap();
        assert_eq!((unknown.uid, unknown.gid, unknown.home.as_str()), (4242, 4242, "/"));
        assert!(resolve(Some(&User::Name("mallory".into())), PASSWD, GROUP).unwrap_err().contains("no such user"));
        assert_eq!(primary_group(Some(&User::Name("alice".into())), PASSWD), 100);
        assert_eq!(primary_group(None, PASSWD), 0);
        assert_eq!(group_id(GROUP, "render"), Some(105));
        assert_eq!(group_id(GROUP, "gpubox"), None);
        assert_eq!(group_id("gpubox:x:notanumber:\n", "gpubox"), None);
    }

    #[test]
    fn only_small_regular_files_are_read() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", root.path().join("etc/passwd")).unwrap();
        let fd = std::fs::File::open(root.path()).unwrap();
        let fd = std::os::fd::AsFd::as_fd(&fd);
        // The link resolves inside the root, where there is no /dev/zero.
        assert_eq!(read(fd, "/etc/passwd").unwrap(), "");
        std::fs::create_dir(root.path().join("dev")).unwrap();
        nix::unistd::mkfifo(&root.path().join("dev/zero"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        assert!(read(fd, "/etc/passwd").unwrap_err().contains("not a regular file"));
    }
}

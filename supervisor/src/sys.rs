//! System calls that neither nix nor libc wrap: clone3 (for CLONE_INTO_CGROUP) and
//! mount_setattr (recursive read-only). Each unsafe block states why it is sound.

use std::io;
use std::os::fd::RawFd;

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// Forks into new namespaces, and into `cgroup` when given, so the child never runs a moment
/// outside its cgroup. Returns 0 in the child and the child's pid in the parent, like fork.
///
/// # Safety
/// Same contract as fork(2): the caller must be single-threaded, and the child must only do
/// what is safe after fork until it execs or exits.
pub unsafe fn clone3(namespaces: libc::c_int, cgroup: Option<RawFd>) -> io::Result<libc::pid_t> {
    let mut args =
        CloneArgs { flags: namespaces as u32 as u64, exit_signal: libc::SIGCHLD as u64, ..Default::default() };
    if let Some(fd) = cgroup {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd as u64;
    }
    // SAFETY: args is a valid clone_args of the size passed; no stack is given, so the child
    // continues on a copy of this stack, exactly as with fork.
    let pid = unsafe { libc::syscall(libc::SYS_clone3, &mut args as *mut CloneArgs, std::mem::size_of::<CloneArgs>()) };
    if pid < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(pid as libc::pid_t)
    }
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

pub const MOUNT_ATTR_RDONLY: u64 = 0x1;
pub const MOUNT_ATTR_NOSUID: u64 = 0x2;
pub const MOUNT_ATTR_NODEV: u64 = 0x4;
pub const MOUNT_ATTR_NOEXEC: u64 = 0x8;

/// Sets mount attributes on `path` and, recursively, on every mount below it — which
/// mount(MS_REMOUNT) cannot do.
pub fn mount_setattr_recursive(path: &std::path::Path, set: u64) -> io::Result<()> {
    let c = cpath(path)?;
    mount_setattr(libc::AT_FDCWD, &c, libc::AT_RECURSIVE as libc::c_uint, set)
}

/// Sets mount attributes on a detached tree (from `open_tree`), recursively.
pub fn mount_setattr_fd(tree: &std::os::fd::OwnedFd, set: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    mount_setattr(tree.as_raw_fd(), c"", (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint, set)
}

/// `MOUNT_ATTR_IDMAP` (linux/mount.h): the mount's ids are those of a user namespace.
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;

/// Makes a detached tree (from `open_tree`), recursively, an idmapped mount with the ids of
/// user namespace `userns` (an open `/proc/PID/ns/user`): a file owned by host uid 0 is owned
/// by that namespace's root, and what its root writes is owned by host uid 0.
pub fn mount_setattr_idmap(tree: &std::os::fd::OwnedFd, userns: std::os::fd::BorrowedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let attr =
        MountAttr { attr_set: MOUNT_ATTR_IDMAP, attr_clr: 0, propagation: 0, userns_fd: userns.as_raw_fd() as u64 };
    mount_setattr_with(tree.as_raw_fd(), c"", (libc::AT_EMPTY_PATH | libc::AT_RECURSIVE) as libc::c_uint, &attr)
}

fn mount_setattr(dirfd: RawFd, path: &std::ffi::CStr, flags: libc::c_uint, set: u64) -> io::Result<()> {
    mount_setattr_with(dirfd, path, flags, &MountAttr { attr_set: set, attr_clr: 0, propagation: 0, userns_fd: 0 })
}

fn mount_setattr_with(dirfd: RawFd, path: &std::ffi::CStr, flags: libc::c_uint, attr: &MountAttr) -> io::Result<()> {
    // SAFETY: path is NUL-terminated (with AT_EMPTY_PATH, dirfd is an open mount fd it names);
    // attr is a valid mount_attr of the size passed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            dirfd,
            path.as_ptr(),
            flags,
            attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Installs a classic BPF seccomp filter that was compiled before the clone.
pub fn seccomp_load(program: &[u8]) -> io::Result<()> {
    let filter = libc::sock_fprog {
        len: (program.len() / std::mem::size_of::<libc::sock_filter>()) as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: filter points at program, which holds len whole sock_filter instructions and
    // outlives the call; the kernel copies the program.
    let r = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &filter as *const libc::sock_fprog)
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

const OPEN_TREE_CLONE: u32 = 1;
const OPEN_TREE_CLOEXEC: u32 = libc::O_CLOEXEC as u32;
const MOVE_MOUNT_F_EMPTY_PATH: u32 = 0x4;

fn cpath(path: &std::path::Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(io::Error::other)
}

/// A detached copy of the mount at `path` (a bind mount not yet attached anywhere), which can
/// be moved into another mount namespace.
pub fn open_tree_clone(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    let c = cpath(path)?;
    // SAFETY: c is NUL-terminated; the flags ask for a new fd and nothing else.
    let fd =
        unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) })
}

/// A detached copy of the mount tree at `path`, submounts included (what `mount --rbind`
/// would bind).
pub fn open_tree_clone_recursive(path: &std::path::Path) -> io::Result<std::os::fd::OwnedFd> {
    let c = cpath(path)?;
    let flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as u32;
    // SAFETY: c is NUL-terminated; the flags ask for a new fd and nothing else.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as RawFd) })
}

const MOVE_MOUNT_T_EMPTY_PATH: u32 = 0x40;

/// Attaches a detached mount (from [`open_tree_clone`]) on the file or directory that `target`
/// (an `O_PATH` descriptor) is: no path is resolved, so nothing can redirect it.
pub fn move_mount_onto(tree: &std::os::fd::OwnedFd, target: &std::os::fd::OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: both are open descriptors named by empty paths with the EMPTY_PATH flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

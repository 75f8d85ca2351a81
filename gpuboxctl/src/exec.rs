//! `gpuboxctl exec` and `gpuboxctl shell`: a command in a running container, confined as its
//! payload is. The supervisor answers what the payload was started with (`ExecContext`, root
//! only); `gpubox-supervisor enter` does the rest (supervisor/src/enter.rs says how), so that
//! the confinement is applied by the same code that applied it to the payload.

use anyhow::{bail, Context, Result};
use gpubox_control::{Client, Error, ExecRequest};
use std::ffi::CString;
use std::io::{IsTerminal, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// The running container.
    #[arg(value_name = "NAME", add = crate::complete::running_names())]
    pub name: String,
    /// A pseudo-terminal of the container's own (the default when stdin is a terminal).
    #[arg(short = 't', long = "tty", overrides_with = "no_tty")]
    pub tty: bool,
    /// No terminal, even when stdin is one.
    #[arg(short = 'T', long = "no-tty")]
    pub no_tty: bool,
    /// Accepted for Docker's `-it`: stdin is always passed on.
    #[arg(short = 'i', long = "interactive", hide = true)]
    pub interactive: bool,
    /// The user inside: a name, UID or UID:GID (default: the container's User=, else root).
    #[arg(short = 'u', long, value_name = "USER")]
    pub user: Option<String>,
    /// Set an environment variable (repeatable); NAME alone passes on this environment's value.
    #[arg(short = 'e', long = "env", value_name = "NAME[=VALUE]", value_parser = crate::run::env_assignment)]
    pub env: Vec<String>,
    /// The working directory inside (default: the container's WorkingDirectory=, else /).
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// The command and its arguments, passed on exactly.
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// A login shell: bash where the container has it, else sh.
pub const SHELL: &[&str] =
    &["/bin/sh", "-c", r#"for s in /bin/bash /usr/bin/bash; do [ -x "$s" ] && exec "$s" -l; done; exec /bin/sh -l"#];

/// Runs the command to its end: its exit status, 125 when it could not be started.
pub fn exec(args: ExecArgs) -> Result<ExitCode> {
    match enter(&args) {
        Ok(never) => match never {},
        Err(e) => {
            if let Some(Error::NotRunning(..)) = e.downcast_ref::<Error>() {
                eprintln!("gpuboxctl: {e}");
                return Ok(ExitCode::from(crate::NOT_RUNNING));
            }
            eprintln!("gpuboxctl exec: {e:#}");
            Ok(ExitCode::from(125))
        }
    }
}

/// Asks for the container's context and becomes `gpubox-supervisor enter` with the request.
fn enter(args: &ExecArgs) -> Result<std::convert::Infallible> {
    // SAFETY: geteuid only reads.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        bail!("entering a container needs root (you are uid {uid}); try sudo");
    }
    let supervisor = crate::run::find_supervisor()?;
    let context = Client::connect(&args.name).and_then(|c| c.exec_context())?;
    let terminal = if args.no_tty { false } else { args.tty || std::io::stdin().is_terminal() };
    let environment = args
        .env
        .iter()
        .map(|e| match e.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (e.clone(), std::env::var(e).unwrap_or_default()),
        })
        .collect();
    if let Some(user) = &args.user {
        user.parse::<gpubox_definition::User>().map_err(|e| anyhow::anyhow!("--user {e}"))?;
    }
    let request = ExecRequest {
        context,
        command: args.command.clone(),
        terminal,
        user: args.user.clone(),
        environment,
        working_directory: args.workdir.clone(),
    };
    let fd = request_fd(&serde_json::to_vec(&request)?)?;
    let argv: Vec<CString> = [supervisor.to_string_lossy().into_owned(), "enter".into(), fd.as_raw_fd().to_string()]
        .into_iter()
        .map(CString::new)
        .collect::<Result<_, _>>()?;
    let mut argp: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argp.push(std::ptr::null());
    // SAFETY: argv's strings are NUL-terminated and outlive the call; argp ends with NULL.
    unsafe { libc::execv(argp[0], argp.as_ptr()) };
    Err(std::io::Error::last_os_error()).with_context(|| format!("executing {}", supervisor.display()))
}

/// The request in an anonymous file, open across the exec (its environment may hold secrets,
/// which a command line or a file in /tmp would show to others).
fn request_fd(bytes: &[u8]) -> Result<OwnedFd> {
    // SAFETY: the name is NUL-terminated; no flags, so the descriptor survives the exec.
    let fd = unsafe { libc::memfd_create(c"gpubox-exec".as_ptr(), 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("creating the exec request");
    }
    // SAFETY: fd is the new descriptor memfd_create returned, owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(fd.try_clone()?);
    file.write_all(bytes).context("writing the exec request")?;
    // SAFETY: lseek on our own descriptor; the reader starts at the beginning.
    unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_SET) };
    Ok(fd)
}

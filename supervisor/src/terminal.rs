//! The payload's terminal. A payload must never hold the caller's terminal: with it, a
//! container could push input into the shell that started it (`TIOCSTI`), which runs it as
//! host root once the container is gone. So the payload always starts a session of its own
//! (`setsid` in the child), and when gpubox runs from a terminal the container gets a
//! pseudo-terminal of its own, which the supervisor relays to and from the caller's, as
//! `systemd-nspawn`, `podman run -t` and `runc` do. Without a terminal there is none at all.
//!
//! The caller's terminal is put in raw mode while relaying (the container's pty does the line
//! editing and signals: ^C reaches the payload as SIGINT from its own terminal) and restored
//! however the supervisor ends but SIGKILL. Its window size is followed on SIGWINCH.

use anyhow::{Context, Result};
use nix::sys::termios::{self, SetArg, Termios};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

pub struct Terminal {
    master: std::fs::File,
    /// The container's end, given to the child as its stdin, stdout, stderr and controlling
    /// terminal, and bound as its `/dev/console`; closed here once the child has it, so that
    /// the container's end of file reaches us.
    pub slave: Option<OwnedFd>,
    pub slave_path: PathBuf,
    /// Which of our stdin, stdout and stderr are the caller's terminal: the container's
    /// terminal takes their place, and only those.
    pub replaces: Vec<i32>,
    saved: Option<Termios>,
    /// The caller's input stops at its end of file; the output relay says when it is done.
    input_open: bool,
    output_done: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

nix::ioctl_read_bad!(get_winsize, libc::TIOCGWINSZ, libc::winsize);
nix::ioctl_write_ptr_bad!(set_winsize, libc::TIOCSWINSZ, libc::winsize);

impl Terminal {
    /// A pseudo-terminal for the container if any of our stdin, stdout and stderr is a
    /// terminal (`< /dev/null` from a shell leaves stdout one, which a payload could read the
    /// caller's typing from); its slave is owned by `owner` (the container's root on the
    /// host), as a login's terminal is its user's.
    pub fn for_stdio(owner: u32) -> Result<Option<Terminal>> {
        // SAFETY: 0–2 stay open for the supervisor's life; isatty only asks.
        let replaces: Vec<i32> =
            (0..3).filter(|&fd| nix::unistd::isatty(unsafe { BorrowedFd::borrow_raw(fd) }).unwrap_or(false)).collect();
        if replaces.is_empty() {
            return Ok(None);
        }
        let pty = nix::pty::openpty(None, None).context("allocating a pseudo-terminal for the container")?;
        let slave_path = nix::unistd::ttyname(pty.slave.as_fd()).context("naming the container's terminal")?;
        Terminal::relaying(pty.master, pty.slave, slave_path, replaces, owner).map(Some)
    }

    /// Relays a pseudo-terminal made elsewhere (`gpuboxctl exec`'s, in the container's own
    /// devpts) in place of those of our stdin, stdout and stderr in `replaces`.
    pub fn relaying(
        master: OwnedFd,
        slave: OwnedFd,
        slave_path: PathBuf,
        replaces: Vec<i32>,
        owner: u32,
    ) -> Result<Terminal> {
        nix::unistd::fchown(&slave, Some(owner.into()), Some((owner + 5).into()))
            .context("giving the container its terminal")?;
        for fd in [master.as_fd(), slave.as_fd()] {
            nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC))?;
        }
        nix::fcntl::fcntl(&master, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK))?;
        let terminal = Terminal {
            master: std::fs::File::from(master),
            slave: Some(slave),
            slave_path,
            input_open: replaces.contains(&libc::STDIN_FILENO),
            replaces,
            saved: None,
            output_done: Default::default(),
        };
        terminal.resize();
        Ok(terminal)
    }

    /// Raw mode on the caller's terminal, until this is dropped (where we read it: the
    /// container's terminal does the line editing then).
    pub fn make_raw(&mut self) {
        if !self.input_open {
            return;
        }
        let stdin = std::io::stdin();
        if let Ok(saved) = termios::tcgetattr(stdin.as_fd()) {
            let mut raw = saved.clone();
            termios::cfmakeraw(&mut raw);
            if termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).is_ok() {
                self.saved = Some(saved);
            }
        }
    }

    /// Gives the container's terminal the caller's window size (the kernel then sends the
    /// payload's foreground process group SIGWINCH).
    pub fn resize(&self) {
        let mut size: libc::winsize = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
        let Some(&tty) = self.replaces.first() else { return };
        // SAFETY: TIOCGWINSZ fills the winsize it is given; TIOCSWINSZ reads one.
        unsafe {
            if get_winsize(tty, &mut size).is_ok() {
                let _ = set_winsize(self.master.as_raw_fd(), &size);
            }
        }
    }

    /// Relays the container's output on a thread of its own (started after the clone): a
    /// write to the caller's terminal may block (^S, a terminal that stops reading), and must
    /// never block the supervisor's main loop, which forwards signals and stops the payload.
    pub fn start_output(&mut self) {
        let Ok(master) = self.master.try_clone() else { return };
        let to_stdout = self.replaces.contains(&libc::STDOUT_FILENO);
        let done = self.output_done.clone();
        let spawned = std::thread::Builder::new().name("terminal".into()).spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let mut poll = [nix::poll::PollFd::new(master.as_fd(), nix::poll::PollFlags::POLLIN)];
                if matches!(nix::poll::poll(&mut poll, nix::poll::PollTimeout::NONE), Err(e) if e != nix::errno::Errno::EINTR) {
                    break;
                }
                match (&master).read(&mut buf) {
                    // EOF or EIO: every holder of the container's end has closed it.
                    Ok(0) => break,
                    Ok(n) => {
                        // To the caller's terminal: our stdout if it is one, else our stderr.
                        let _ = if to_stdout {
                            let mut out = std::io::stdout().lock();
                            out.write_all(&buf[..n]).and_then(|_| out.flush())
                        } else {
                            std::io::stderr().lock().write_all(&buf[..n])
                        };
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            done.store(true, std::sync::atomic::Ordering::Release);
        });
        if spawned.is_err() {
            self.output_done.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// The caller's input while it is open: the one descriptor to wait on.
    pub fn poll_fds(&self) -> Vec<BorrowedFd<'_>> {
        if self.input_open {
            // SAFETY: stdin stays open for the supervisor's life.
            vec![unsafe { BorrowedFd::borrow_raw(libc::STDIN_FILENO) }]
        } else {
            Vec::new()
        }
    }

    /// Moves what the caller typed to the container.
    pub fn pump(&mut self, fd: i32) {
        let mut buf = [0u8; 8192];
        if fd == libc::STDIN_FILENO {
            match std::io::stdin().lock().read(&mut buf) {
                Ok(0) | Err(_) => self.input_open = false,
                Ok(n) => {
                    // The container's input queue is large; a payload that reads nothing
                    // only loses what does not fit, and the caller is never blocked.
                    let _ = self.master.write(&buf[..n]);
                }
            }
        }
    }

    /// Waits for the output relay to pass on what the container wrote before its end, a
    /// second at most: a process outside that was handed the terminal could keep writing for
    /// ever, and the caller's terminal may not be reading.
    pub fn drain(&mut self) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while !self.output_done.load(std::sync::atomic::Ordering::Acquire) && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, saved);
        }
    }
}

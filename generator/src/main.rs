//! `gpubox-generator`, a systemd.generator(7): systemd calls it with the normal, early and late
//! output directories at boot and on daemon-reload. It must never fail the boot: a bad
//! definition is logged with its file and line and skipped, and the rest are generated; the exit
//! status is non-zero only when the invocation itself is wrong. Without directories (or with
//! `--dry-run`) it prints what it would write.

use gpubox_definition::{SearchPath, Sources};
use gpubox_generator::{generate, Generated};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const USAGE: &str = "usage: gpubox-generator NORMAL_DIR [EARLY_DIR LATE_DIR]
       gpubox-generator [--dry-run]

Reads NAME.gpubox definitions from $GPUBOX_DEFINITIONS_PATH (default /etc/gpubox:/run/gpubox:/usr/lib/gpubox)
and writes gpu@NAME.service drop-ins and [Install] links into NORMAL_DIR. systemd runs it at boot and on
'systemctl daemon-reload'; run it without arguments to see what it would write.";

/// Where the installed `gpu@.service` is, for `[Install]` links; set by `make install`.
const TEMPLATE: &str = match option_env!("GPUBOX_SYSTEMUNITDIR") {
    Some(dir) => dir,
    None => "/usr/lib/systemd/system",
};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out_dir = match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] | ["--dry-run"] => None,
        ["-h" | "--help"] => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        ["--version"] => {
            println!("gpubox-generator {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        [normal] | [normal, _, _] if !normal.starts_with('-') => Some(PathBuf::from(normal)),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let log = Log::open();
    let template = Path::new(TEMPLATE).join("gpu@.service");

    let all = match SearchPath::from_env().discover() {
        Ok(all) => all,
        Err(e) => {
            log.error(&format!("cannot read definitions: {e}"));
            return ExitCode::SUCCESS;
        }
    };
    for sources in all.iter().filter(|s| !s.masked) {
        let generated = match sources.load() {
            Ok(d) => generate(&d, &template),
            Err(e) => {
                log.error(&format!("{e}; skipping {}", unit(sources)));
                continue;
            }
        };
        let result = match &out_dir {
            Some(dir) => write(dir, &generated),
            None => {
                print(&generated);
                Ok(())
            }
        };
        if let Err(e) = result {
            log.error(&format!("cannot write {}: {e}", unit(sources)));
        }
    }
    ExitCode::SUCCESS
}

fn unit(sources: &Sources) -> String {
    gpubox_generator::unit_name(&sources.name)
}

fn write(dir: &Path, g: &Generated) -> std::io::Result<()> {
    for (rel, text) in &g.files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(path, text)?;
    }
    for (rel, target) in &g.links {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        match std::os::unix::fs::symlink(target, &path) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            other => other?,
        }
    }
    Ok(())
}

fn print(g: &Generated) {
    let mut out = std::io::stdout().lock();
    for (rel, text) in &g.files {
        let _ = writeln!(out, "# ==> {} <==\n{text}", rel.display());
    }
    for (rel, target) in &g.links {
        let _ = writeln!(out, "# ==> {} -> {} <==\n", rel.display(), target.display());
    }
}

/// Where errors go: the kernel log when systemd runs us (stderr may lead nowhere that early in
/// boot), stderr otherwise.
struct Log(Option<fs::File>);

impl Log {
    fn open() -> Log {
        let under_systemd = std::env::var_os("SYSTEMD_SCOPE").is_some();
        Log(under_systemd.then(|| fs::OpenOptions::new().write(true).open("/dev/kmsg").ok()).flatten())
    }

    fn error(&self, message: &str) {
        match &self.0 {
            // <3> is LOG_ERR; one write per record, as /dev/kmsg requires.
            Some(kmsg) => {
                let mut kmsg = kmsg;
                let _ = kmsg.write_all(format!("<3>gpubox-generator[{}]: {message}\n", std::process::id()).as_bytes());
            }
            None => eprintln!("gpubox-generator: {message}"),
        }
    }
}

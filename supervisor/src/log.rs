//! Log lines on stderr, named for the container. Under systemd, stderr goes to the journal,
//! which reads the `<N>` priority prefix; standalone, lines read `gpubox[NAME]: …`.

use std::sync::OnceLock;

static PREFIX: OnceLock<(String, bool)> = OnceLock::new();

pub fn init(name: &str, journal: bool) {
    let _ = PREFIX.set((name.to_owned(), journal));
}

fn emit(priority: u8, level: &str, message: &str) {
    let (name, journal) = PREFIX.get().map(|(n, j)| (n.as_str(), *j)).unwrap_or(("?", false));
    // One write per line: stderr is unbuffered, and the journal reads it line by line.
    let mut text = String::new();
    for line in message.lines() {
        if journal {
            text += &format!("<{priority}>{line}\n");
        } else {
            text += &format!("gpubox[{name}]: {level}{line}\n");
        }
    }
    let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), text.as_bytes());
}

pub fn error(message: &str) {
    emit(3, "error: ", message)
}

pub fn warn(message: &str) {
    emit(4, "warning: ", message)
}

pub fn info(message: &str) {
    emit(6, "", message)
}

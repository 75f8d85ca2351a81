//! The control socket's connected clients, and the `Changed` signal that tells them of every
//! change: apart from the socket's serving (control.rs) so that whatever changes the container
//! (a live change, a hotplug event in watch.rs) can announce it without depending on it.

use gpubox_control::{INTERFACE, PATH};
use std::sync::{mpsc, Mutex, OnceLock};

/// Connected clients, by a number of our own, to send them `Changed` (one container per
/// process, so one list).
static PEERS: Mutex<Vec<(u64, zbus::blocking::Connection)>> = Mutex::new(Vec::new());

/// Tells every connected client that the container changed (`Changed`, with its status), off
/// the caller's thread: a slow client must not hold up a change. One sender thread, started
/// with the first announcement, so clients hear of changes in the order they happened; callers
/// announce while they hold the live state's lock.
pub fn announce(status: &gpubox_control::Status) {
    static SENDER: OnceLock<Option<mpsc::Sender<String>>> = OnceLock::new();
    if PEERS.lock().expect("peers lock").is_empty() {
        return;
    }
    let Ok(json) = serde_json::to_string(status) else { return };
    let sender = SENDER.get_or_init(|| {
        let (sender, changes) = mpsc::channel::<String>();
        let spawned = std::thread::Builder::new().name("announce".into()).spawn(move || {
            for json in changes {
                let peers = PEERS.lock().expect("peers lock").clone();
                for (_, peer) in peers {
                    let _ = peer.emit_signal(None::<&str>, PATH, INTERFACE, "Changed", &(json.as_str(),));
                }
            }
        });
        spawned.ok().map(|_| sender)
    });
    if let Some(sender) = sender {
        let _ = sender.send(json);
    }
}

/// A client from now on, under a number of the caller's.
pub fn add(id: u64, conn: zbus::blocking::Connection) {
    PEERS.lock().expect("peers lock").push((id, conn));
}

/// The client is gone.
pub fn remove(id: u64) {
    PEERS.lock().expect("peers lock").retain(|(i, _)| *i != id);
}

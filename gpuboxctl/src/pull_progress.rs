//! The one line that `gpuboxctl image pull` keeps rewritten on a terminal. Several layers come
//! at once (a registry's three downloads and their unpacking), so the line sums them up rather
//! than following one layer, as `podman pull`'s single line would jump between them.

use gpubox_images::Progress;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Layer {
    Waiting,
    Done,
    Fetching { done: u64, total: Option<u64> },
    Unpacking,
}

/// Every layer's state, from the fetch's reports.
#[derive(Debug, Default)]
pub struct PullProgress {
    layers: Vec<Layer>,
}

impl PullProgress {
    pub fn update(&mut self, p: &Progress) {
        let mut set = |index: usize, state: Layer| {
            if self.layers.len() < index {
                self.layers.resize(index, Layer::Waiting);
            }
            self.layers[index - 1] = state;
        };
        match *p {
            Progress::Resolved { layers } => self.layers = vec![Layer::Waiting; layers],
            Progress::Have { index, .. } | Progress::Unpacked { index, .. } => set(index, Layer::Done),
            Progress::Fetching { index, done, total } => set(index, Layer::Fetching { done, total }),
            Progress::Resuming { .. } => {}
            Progress::Unpacking { index } => set(index, Layer::Unpacking),
        }
    }

    /// `3/7 layers; fetching 4, 5, 6: 120.0 MiB of 1.2 GiB (10%); unpacking 2`.
    pub fn line(&self) -> String {
        let done = self.layers.iter().filter(|l| **l == Layer::Done).count();
        let mut line = format!("{done}/{} layers", self.layers.len());
        let fetching: Vec<(usize, u64, Option<u64>)> = (self.layers.iter().enumerate())
            .filter_map(|(i, l)| match *l {
                Layer::Fetching { done, total } => Some((i + 1, done, total)),
                _ => None,
            })
            .collect();
        if !fetching.is_empty() {
            let got: u64 = fetching.iter().map(|f| f.1).sum();
            let total: Option<u64> = fetching.iter().map(|f| f.2).sum();
            line += &format!("; fetching {}: {}", indexes(fetching.iter().map(|f| f.0)), human(got));
            if let Some(total) = total.filter(|t| *t > 0) {
                line += &format!(" of {} ({}%)", human(total), got.min(total) * 100 / total);
            }
        }
        let unpacking = (self.layers.iter().enumerate()).filter(|(_, l)| **l == Layer::Unpacking).map(|(i, _)| i + 1);
        if unpacking.clone().next().is_some() {
            line += &format!("; unpacking {}", indexes(unpacking));
        }
        line
    }
}

fn indexes(i: impl Iterator<Item = usize>) -> String {
    i.map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
}

/// Bytes for people, 1024-based as systemd's sizes: `512 B`, `1.5 MiB`.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_sums_up_the_layers_that_come_at_once() {
        let mut p = PullProgress::default();
        let d = gpubox_images::Digest::of(b"");
        for event in [
            Progress::Resolved { layers: 4 },
            Progress::Have { index: 1, diff_id: d },
            Progress::Fetching { index: 2, done: 0, total: Some(4 << 20) },
            Progress::Fetching { index: 3, done: 0, total: Some(4 << 20) },
            Progress::Fetching { index: 4, done: 0, total: Some(8 << 20) },
            Progress::Fetching { index: 2, done: 4 << 20, total: Some(4 << 20) },
            Progress::Unpacking { index: 2 },
            Progress::Fetching { index: 4, done: 2 << 20, total: Some(8 << 20) },
        ] {
            p.update(&event);
        }
        assert_eq!(p.line(), "1/4 layers; fetching 3, 4: 2.0 MiB of 12.0 MiB (16%); unpacking 2");
        p.update(&Progress::Unpacked { index: 2, size: 1 });
        p.update(&Progress::Fetching { index: 3, done: 1 << 20, total: None });
        assert_eq!(p.line(), "2/4 layers; fetching 3, 4: 3.0 MiB");
    }
}

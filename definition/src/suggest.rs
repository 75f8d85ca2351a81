//! "Did you mean …?" for a mistyped section, key or selector kind: the closest known name by
//! Jaro similarity (as clap suggests subcommands), compared without regard to case, when it is
//! close enough to be what the person meant.

/// As clap: below this, a suggestion is more often wrong than helpful.
const THRESHOLD: f64 = 0.8;

/// The known name closest to `typed`, if one is close.
pub fn did_you_mean<'a>(typed: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let typed = typed.to_ascii_lowercase();
    known
        .into_iter()
        .map(|k| (strsim::jaro(&typed, &k.to_ascii_lowercase()), k))
        .filter(|(score, _)| *score >= THRESHOLD)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::did_you_mean;

    #[test]
    fn suggests_close_names_only() {
        assert_eq!(did_you_mean("Enviroment", ["Exec", "Environment", "User"]), Some("Environment"));
        assert_eq!(did_you_mean("MemroyMax", ["MemoryMax", "MemoryHigh", "CPUQuota"]), Some("MemoryMax"));
        assert_eq!(did_you_mean("container", ["Container", "GPU"]), Some("Container"));
        assert_eq!(did_you_mean("nvidai", ["nvidia", "drm", "pci", "cdi", "vendor"]), Some("nvidia"));
        assert_eq!(did_you_mean("Frobnicate", ["Exec", "User"]), None);
    }
}

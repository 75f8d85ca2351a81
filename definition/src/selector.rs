//! `[GPU] Device=` selectors: which GPUs a definition asks for. Parsing lives here, with the
//! definition; matching them against the host's devices is the device-discovery crate's job.

use std::fmt;
use std::str::FromStr;

/// One way of naming a GPU (or a set of them).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// Every GPU the host has, from every backend.
    All,
    /// An NVIDIA GPU by index, as NVML and nvidia-smi number them (PCI bus order).
    NvidiaIndex(u32),
    /// An NVIDIA GPU or MIG device by UUID (`GPU-…`, `MIG-…`).
    NvidiaUuid(String),
    /// A PCI function, e.g. `0000:01:00.0`.
    Pci(PciAddress),
    /// A DRM node by kernel name: `card1` or `renderD128`.
    Drm(String),
    /// Every GPU with this PCI vendor id (`10de` NVIDIA, `1002` AMD, `8086` Intel).
    Vendor(u16),
    /// A CDI device, fully qualified: `VENDOR/CLASS=NAME` (`NAME` may be `all`).
    Cdi { kind: String, name: String },
}

/// A PCI address `DOMAIN:BUS:DEVICE.FUNCTION`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.device, self.function)
    }
}

impl FromStr for PciAddress {
    type Err = String;
    /// Accepts `DDDD:BB:DD.F` and the short `BB:DD.F` (domain 0), as `lspci` prints them.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a PCI address (expected DOMAIN:BUS:DEVICE.FUNCTION, e.g. 0000:01:00.0)");
        let (head, function) = s.rsplit_once('.').ok_or_else(bad)?;
        let parts: Vec<&str> = head.split(':').collect();
        let (domain, bus, device) = match parts[..] {
            [d, b, v] => (d, b, v),
            [b, v] => ("0", b, v),
            _ => return Err(bad()),
        };
        let hex = |t: &str, max_len: usize| {
            (!t.is_empty() && t.len() <= max_len && t.chars().all(|c| c.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(t, 16).ok())
                .flatten()
                .ok_or_else(bad)
        };
        let address = PciAddress {
            domain: hex(domain, 8)?,
            bus: hex(bus, 2)? as u8,
            device: hex(device, 2)? as u8,
            function: hex(function, 1)? as u8,
        };
        if address.device > 0x1f || address.function > 7 {
            return Err(bad());
        }
        Ok(address)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Selector::All => f.write_str("all"),
            Selector::NvidiaIndex(i) => write!(f, "nvidia:{i}"),
            Selector::NvidiaUuid(u) => write!(f, "nvidia:{u}"),
            Selector::Pci(a) => write!(f, "pci:{a}"),
            Selector::Drm(n) => write!(f, "drm:{n}"),
            Selector::Vendor(v) => write!(f, "vendor:{v:04x}"),
            Selector::Cdi { kind, name } => write!(f, "cdi:{kind}={name}"),
        }
    }
}

const FORMS: &str = "all, nvidia:INDEX, nvidia:UUID, pci:DOMAIN:BUS:DEV.FN, drm:cardN, drm:renderDN, vendor:VVVV, cdi:VENDOR/CLASS=NAME";

impl FromStr for Selector {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "all" {
            return Ok(Selector::All);
        }
        let (kind, arg) =
            s.split_once(':').ok_or_else(|| format!("unknown GPU selector '{s}' (expected one of: {FORMS})"))?;
        match kind {
            "nvidia" => {
                if let Ok(i) = arg.parse::<u32>() {
                    Ok(Selector::NvidiaIndex(i))
                } else if is_nvidia_uuid(arg) {
                    Ok(Selector::NvidiaUuid(arg.to_owned()))
                } else {
                    Err(format!("'{s}': expected an NVIDIA index (nvidia:0) or UUID (nvidia:GPU-…, nvidia:MIG-…)"))
                }
            }
            "pci" => arg.parse().map(Selector::Pci),
            "drm" => {
                let number = arg.strip_prefix("card").or_else(|| arg.strip_prefix("renderD"));
                match number {
                    Some(n) if !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()) => {
                        Ok(Selector::Drm(arg.to_owned()))
                    }
                    _ => Err(format!("'{s}': expected drm:cardN or drm:renderDN")),
                }
            }
            "vendor" => {
                let id = arg.strip_prefix("0x").unwrap_or(arg);
                match (id.len(), u16::from_str_radix(id, 16)) {
                    (4, Ok(v)) => Ok(Selector::Vendor(v)),
                    _ => Err(format!("'{s}': expected a 4-digit hexadecimal PCI vendor id, e.g. vendor:10de")),
                }
            }
            "cdi" => parse_cdi(arg).ok_or_else(|| {
                format!("'{s}': expected a fully qualified CDI name VENDOR/CLASS=NAME, e.g. cdi:nvidia.com/gpu=0")
            }),
            _ => {
                let hint = crate::suggest::did_you_mean(kind, ["nvidia", "pci", "drm", "vendor", "cdi"])
                    .map(|k| format!("did you mean {k}:{arg}? "))
                    .unwrap_or_default();
                Err(format!("unknown GPU selector '{s}' ({hint}expected one of: {FORMS})"))
            }
        }
    }
}

fn is_nvidia_uuid(s: &str) -> bool {
    let body = s.strip_prefix("GPU-").or_else(|| s.strip_prefix("MIG-"));
    body.is_some_and(|b| b.len() >= 8 && b.chars().all(|c| c.is_ascii_hexdigit() || c == '-' || c == '/'))
}

/// `cdi:VENDOR/CLASS=NAME`, by CDI's one grammar (cdi_name.rs).
fn parse_cdi(arg: &str) -> Option<Selector> {
    crate::cdi_name::parse_qualified(arg).ok().map(|(kind, name)| Selector::Cdi { kind, name })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_round_trips() {
        for s in [
            "all",
            "nvidia:0",
            "nvidia:GPU-5a6e1f3c-8d2b-4e39-9f0a-1b2c3d4e5f60",
            "nvidia:MIG-3c2d1e0f-aaaa-bbbb-cccc-0123456789ab",
            "pci:0000:01:00.0",
            "drm:card1",
            "drm:renderD128",
            "vendor:10de",
            "cdi:nvidia.com/gpu=0",
            "cdi:nvidia.com/gpu=all",
            "cdi:amd.com/gpu=GPU-0:1",
        ] {
            let parsed: Selector = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(parsed.to_string(), s);
        }
    }

    #[test]
    fn short_forms_normalise() {
        assert_eq!("pci:01:00.0".parse::<Selector>().unwrap().to_string(), "pci:0000:01:00.0");
        assert_eq!("vendor:0x1002".parse::<Selector>().unwrap(), Selector::Vendor(0x1002));
    }

    #[test]
    fn bad_selectors_say_what_was_expected() {
        for (s, want) in [
            ("gpu0", "unknown GPU selector 'gpu0'"),
            ("amd:0", "unknown GPU selector 'amd:0'"),
            ("nvidia:first", "expected an NVIDIA index"),
            ("pci:1:2", "is not a PCI address"),
            ("pci:0000:01:20.0", "is not a PCI address"),
            ("drm:card", "expected drm:cardN"),
            ("drm:fb0", "expected drm:cardN"),
            ("vendor:10d", "4-digit hexadecimal"),
            ("cdi:nvidia.com=0", "fully qualified CDI name"),
            ("cdi:nvidia.com/gpu", "fully qualified CDI name"),
        ] {
            let e = s.parse::<Selector>().unwrap_err();
            assert!(e.contains(want), "{s}: {e}");
        }
    }

    /// One CDI grammar (issue #13: the selector and the spec reader once disagreed on a vendor
    /// starting with a digit and on a `.` in a class): what a spec may name, a selector may.
    #[test]
    fn cdi_selectors_follow_cdi_s_grammar() {
        for ok in ["cdi:nvidia.com/gpu=0", "cdi:a.com/b.c=MIG-1:0", "cdi:vendor/class_1=all"] {
            assert!(ok.parse::<Selector>().is_ok(), "{ok}");
            assert!(crate::cdi_name::parse_qualified(&ok[4..]).is_ok(), "{ok}");
        }
        for bad in ["cdi:1vendor.com/gpu=0", "cdi:vendor-/gpu=0", "cdi:nvidia.com/gpu=-0", "cdi:nvidia.com=0"] {
            assert!(bad.parse::<Selector>().is_err(), "{bad}");
            assert!(crate::cdi_name::parse_qualified(&bad[4..]).is_err(), "{bad}");
        }
    }
}

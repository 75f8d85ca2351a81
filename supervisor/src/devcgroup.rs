//! The device cgroup on cgroup v2: a BPF_PROG_TYPE_CGROUP_DEVICE program on the payload's
//! cgroup that allows the char devices listed in a BPF hash map, and nothing else. Every
//! program in the hierarchy must allow an access, so this one only narrows what systemd grants
//! a unit with `DevicePolicy=closed` + `DeviceAllow=`; standalone it is the whole enforcement.
//!
//! The program is loaded once per container; attaching or detaching a device later is a map
//! update (one syscall, each atomic), not a new program to verify and swap — that was most of
//! a hotplug event's own time. About 100 lines with libc: a BPF library would be heavier than
//! the program.

use anyhow::{bail, Context, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// (major, minor or None for any) of the char devices every container may use: null, zero,
/// full, random, urandom, tty, console, ptmx, and the pts of its own devpts.
pub const STANDARD: &[(u32, Option<u32>)] = &[
    (1, Some(3)),
    (1, Some(5)),
    (1, Some(7)),
    (1, Some(8)),
    (1, Some(9)),
    (5, Some(0)),
    (5, Some(1)),
    (5, Some(2)),
    (136, None),
];

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Insn {
    code: u8,
    regs: u8, // dst in the low nibble, src in the high one
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: dst | (src << 4), off, imm }
}
const LDX_W: u8 = 0x61; // r_dst = *(u32 *)(r_src + off)
const STX_DW: u8 = 0x7b; // *(u64 *)(r_dst + off) = r_src
const AND_K: u8 = 0x57; // r_dst &= imm
const LSH_K: u8 = 0x67; // r_dst <<= imm
const OR_X: u8 = 0x4f; // r_dst |= r_src
const ADD_K: u8 = 0x07; // r_dst += imm
const MOV_X: u8 = 0xbf; // r_dst = r_src
const MOV_K: u8 = 0xb7; // r_dst = imm (sign-extended)
const MOV32_K: u8 = 0xb4; // r_dst = (u32) imm
const LD_IMM64: u8 = 0x18; // r_dst = next two imm (src 1: a map fd)
const JNE_K: u8 = 0x55; // if r_dst != imm: pc += off
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const PSEUDO_MAP_FD: u8 = 1;
const MAP_LOOKUP_ELEM: i32 = 1;
const BPF_DEVCG_DEV_CHAR: i32 = 2;

/// The map key of a char device: major in the high half, minor (all ones: any) in the low.
fn key(major: u32, minor: Option<u32>) -> u64 {
    (u64::from(major) << 32) | u64::from(minor.unwrap_or(u32::MAX))
}

/// The program: allow a char device whose (major, minor) or (major, any) is in the map.
fn program(map: i32) -> Vec<Insn> {
    let load_map = [insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, map), insn(0, 0, 0, 0, 0)];
    let mut p = vec![
        // struct bpf_cgroup_dev_ctx { u32 access_type /* type | access << 16 */; u32 major; u32 minor; }
        insn(LDX_W, 2, 1, 0, 0),
        insn(AND_K, 2, 0, 0, 0xffff),
        insn(JNE_K, 2, 0, 0, BPF_DEVCG_DEV_CHAR), // to "deny", patched below
        insn(LDX_W, 3, 1, 4, 0),
        insn(LDX_W, 4, 1, 8, 0),
        insn(LSH_K, 3, 0, 0, 32),
        insn(MOV_X, 5, 3, 0, 0),
        insn(OR_X, 5, 4, 0, 0),
        insn(STX_DW, 10, 5, -8, 0), // the exact key
        insn(MOV32_K, 4, 0, 0, -1),
        insn(OR_X, 3, 4, 0, 0),
        insn(STX_DW, 10, 3, -16, 0), // the any-minor key
    ];
    for (i, off) in [-8, -16].into_iter().enumerate() {
        p.extend(load_map);
        p.push(insn(MOV_X, 2, 10, 0, 0));
        p.push(insn(ADD_K, 2, 0, 0, off));
        p.push(insn(CALL, 0, 0, 0, MAP_LOOKUP_ELEM));
        // Found: to "allow", past the second lookup if this is the first.
        p.push(insn(JNE_K, 0, 0, if i == 0 { 8 } else { 2 }, 0));
    }
    p[2].off = (p.len() - 3) as i16;
    p.extend([
        insn(MOV_K, 0, 0, 0, 0), // deny
        insn(EXIT, 0, 0, 0, 0),
        insn(MOV_K, 0, 0, 0, 1), // allow
        insn(EXIT, 0, 0, 0, 0),
    ]);
    p
}

fn bpf(cmd: libc::c_int, attr: &mut [u64; 16]) -> std::io::Result<i64> {
    // SAFETY: attr is a zero-padded union bpf_attr of 128 bytes, larger than every command's
    // part of it; the kernel reads and writes only within the size passed.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn new_fd(fd: i64) -> OwnedFd {
    // SAFETY: fd is a new descriptor that the kernel just returned and nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// The program on one payload cgroup and its map of allowed devices. The attachment lasts as
/// long as the cgroup.
pub struct DeviceFilter {
    map: OwnedFd,
    _program: OwnedFd,
    allowed: Vec<(u32, Option<u32>)>,
}

const MAX_DEVICES: u64 = 4096;

impl DeviceFilter {
    /// Allows exactly `allowed` in `cgroup` (a directory fd) from now on.
    pub fn attach(cgroup: &impl AsRawFd, allowed: &[(u32, Option<u32>)]) -> Result<DeviceFilter> {
        const BPF_MAP_CREATE: libc::c_int = 0;
        const BPF_PROG_LOAD: libc::c_int = 5;
        const BPF_PROG_ATTACH: libc::c_int = 8;
        const BPF_MAP_TYPE_HASH: u64 = 1;
        const BPF_PROG_TYPE_CGROUP_DEVICE: u64 = 15;
        const BPF_CGROUP_DEVICE: u64 = 6;
        const BPF_F_ALLOW_MULTI: u64 = 2;
        let mut attr = [0u64; 16];
        // map_type, key_size; value_size, max_entries
        attr[0] = BPF_MAP_TYPE_HASH | (8 << 32);
        attr[1] = 1 | (MAX_DEVICES << 32);
        let map = new_fd(bpf(BPF_MAP_CREATE, &mut attr).context("creating the device-cgroup BPF map")?);
        let mut now = Vec::new();
        update(&map, &mut now, allowed)?;

        let insns = program(map.as_raw_fd());
        let license = c"GPL";
        let mut attr = [0u64; 16];
        // prog_type, insn_cnt (u32 pairs), insns, license
        attr[0] = BPF_PROG_TYPE_CGROUP_DEVICE | ((insns.len() as u64) << 32);
        attr[1] = insns.as_ptr() as u64;
        attr[2] = license.as_ptr() as u64;
        let program = new_fd(bpf(BPF_PROG_LOAD, &mut attr).context("loading the device-cgroup BPF program")?);
        let mut attr = [0u64; 16];
        // target_fd, attach_bpf_fd (u32 pair); attach_type, attach_flags (u32 pair)
        attr[0] = cgroup.as_raw_fd() as u32 as u64 | ((program.as_raw_fd() as u64) << 32);
        attr[1] = BPF_CGROUP_DEVICE | (BPF_F_ALLOW_MULTI << 32);
        if let Err(e) = bpf(BPF_PROG_ATTACH, &mut attr) {
            bail!("attaching the device-cgroup BPF program: {e}");
        }
        Ok(DeviceFilter { map, _program: program, allowed: now })
    }

    /// Allows exactly `allowed` from now on.
    pub fn set(&mut self, allowed: &[(u32, Option<u32>)]) -> Result<()> {
        update(&self.map, &mut self.allowed, allowed)
    }
}

/// Makes the map hold `allowed` instead of `now`: the new entries go in before the old ones
/// go, so nothing is allowed at any moment that neither set allows.
fn update(map: &OwnedFd, now: &mut Vec<(u32, Option<u32>)>, allowed: &[(u32, Option<u32>)]) -> Result<()> {
    const BPF_MAP_UPDATE_ELEM: libc::c_int = 2;
    const BPF_MAP_DELETE_ELEM: libc::c_int = 3;
    let value = 1u8;
    for &(major, minor) in allowed {
        if now.contains(&(major, minor)) {
            continue;
        }
        let k = key(major, minor);
        let mut attr = [0u64; 16];
        // map_fd (u32, padded), key, value, flags (BPF_ANY)
        attr[0] = map.as_raw_fd() as u64;
        attr[1] = &k as *const u64 as u64;
        attr[2] = &value as *const u8 as u64;
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr).with_context(|| format!("allowing device {major}:{minor:?}"))?;
        now.push((major, minor));
    }
    let going: Vec<_> = now.iter().filter(|d| !allowed.contains(d)).copied().collect();
    for (major, minor) in going {
        let k = key(major, minor);
        let mut attr = [0u64; 16];
        attr[0] = map.as_raw_fd() as u64;
        attr[1] = &k as *const u64 as u64;
        bpf(BPF_MAP_DELETE_ELEM, &mut attr).with_context(|| format!("revoking device {major}:{minor:?}"))?;
        now.retain(|d| *d != (major, minor));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    /// Runs the program the way the kernel would, with `map` as its map, to check the jump
    /// offsets and the keys.
    fn eval(p: &[Insn], map: &HashSet<u64>, major: u32, minor: u32, kind: u32) -> u64 {
        const FP: u64 = 1 << 40; // the frame pointer r10, an address of our own
        let ctx = [kind | (2 << 16), major, minor];
        let mut r = [0u64; 11];
        r[10] = FP;
        let mut stack: HashMap<u64, u64> = HashMap::new();
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_W => {
                    assert_eq!(src, 1);
                    r[dst] = u64::from(ctx[i.off as usize / 4])
                }
                STX_DW => {
                    stack.insert(r[dst].wrapping_add(i.off as i64 as u64), r[src]);
                }
                AND_K => r[dst] &= i.imm as i64 as u64,
                LSH_K => r[dst] <<= i.imm,
                OR_X => r[dst] |= r[src],
                ADD_K => r[dst] = r[dst].wrapping_add(i.imm as i64 as u64),
                MOV_X => r[dst] = r[src],
                MOV_K => r[dst] = i.imm as i64 as u64,
                MOV32_K => r[dst] = u64::from(i.imm as u32),
                LD_IMM64 => {
                    assert_eq!(src, PSEUDO_MAP_FD as usize);
                    r[dst] = 7; // the map
                    pc += 1;
                }
                CALL => {
                    assert_eq!((i.imm, r[1]), (MAP_LOOKUP_ELEM, 7));
                    r[0] = u64::from(map.contains(&stack[&r[2]]));
                }
                JNE_K => {
                    if r[dst] != i.imm as i64 as u64 {
                        pc = (pc as i64 + i64::from(i.off)) as usize
                    }
                }
                EXIT => return r[0],
                other => panic!("opcode {other:#x}"),
            }
        }
    }

    #[test]
    fn allows_exactly_the_listed_char_devices() {
        let mut allowed = STANDARD.to_vec();
        allowed.push((226, Some(128)));
        let map: HashSet<u64> = allowed.iter().map(|&(major, minor)| key(major, minor)).collect();
        let p = program(3);
        assert_eq!(eval(&p, &map, 1, 3, 2), 1, "null");
        assert_eq!(eval(&p, &map, 136, 42, 2), 1, "any pts");
        assert_eq!(eval(&p, &map, 226, 128, 2), 1, "the selected render node");
        assert_eq!(eval(&p, &map, 226, 129, 2), 0, "another render node");
        assert_eq!(eval(&p, &map, 226, 0, 2), 0, "the card of the same GPU, not selected");
        assert_eq!(eval(&p, &map, 1, 3, 1), 0, "a block device 1:3");
        assert_eq!(eval(&p, &map, 1, 1, 2), 0, "/dev/mem");
        assert_eq!(eval(&p, &HashSet::new(), 1, 3, 2), 0, "an empty map denies everything");
    }
}

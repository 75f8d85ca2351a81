//! The device cgroup on cgroup v2: a BPF_PROG_TYPE_CGROUP_DEVICE program on the payload's
//! cgroup that allows the standard nodes and the selected GPUs' nodes, and nothing else.
//! Every program in the hierarchy must allow an access, so this one only narrows what systemd
//! grants a unit with `DevicePolicy=closed` + `DeviceAllow=`; standalone it is the whole
//! enforcement. About 60 lines with libc: a BPF library would be heavier than the program.

use anyhow::{bail, Result};
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
#[derive(Clone, Copy)]
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
const AND_K: u8 = 0x57; // r_dst &= imm
const JNE_K: u8 = 0x55; // if r_dst != imm: pc += off
const MOV_K: u8 = 0xb7; // r_dst = imm
const EXIT: u8 = 0x95;
const BPF_DEVCG_DEV_CHAR: i32 = 2;

/// The program: allow a char device whose (major, minor) matches an entry; deny the rest.
fn program(allowed: &[(u32, Option<u32>)]) -> Vec<Insn> {
    // struct bpf_cgroup_dev_ctx { u32 access_type /* type | access << 16 */; u32 major; u32 minor; }
    let mut p =
        vec![insn(LDX_W, 2, 1, 0, 0), insn(AND_K, 2, 0, 0, 0xffff), insn(LDX_W, 3, 1, 4, 0), insn(LDX_W, 4, 1, 8, 0)];
    for &(major, minor) in allowed {
        let checks = if minor.is_some() { 3 } else { 2 };
        // Each failed check jumps past the rest of this rule: its checks and its "allow".
        let mut skip = checks + 1;
        let mut rule = |reg: u8, value: i32| {
            skip -= 1;
            p.push(insn(JNE_K, reg, 0, skip as i16 + 1, value));
        };
        rule(2, BPF_DEVCG_DEV_CHAR);
        rule(3, major as i32);
        if let Some(minor) = minor {
            rule(4, minor as i32);
        }
        p.push(insn(MOV_K, 0, 0, 0, 1));
        p.push(insn(EXIT, 0, 0, 0, 0));
    }
    p.push(insn(MOV_K, 0, 0, 0, 0));
    p.push(insn(EXIT, 0, 0, 0, 0));
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

/// Loads the program and attaches it to `cgroup` (a directory fd). Returns the program's fd;
/// the attachment lasts as long as the cgroup.
pub fn restrict(cgroup: &impl AsRawFd, allowed: &[(u32, Option<u32>)]) -> Result<OwnedFd> {
    const BPF_PROG_LOAD: libc::c_int = 5;
    const BPF_PROG_ATTACH: libc::c_int = 8;
    const BPF_PROG_TYPE_CGROUP_DEVICE: u64 = 15;
    const BPF_CGROUP_DEVICE: u64 = 6;
    const BPF_F_ALLOW_MULTI: u64 = 2;
    let insns = program(allowed);
    let license = c"GPL";
    let mut attr = [0u64; 16];
    // prog_type, insn_cnt (u32 pairs), insns, license
    attr[0] = BPF_PROG_TYPE_CGROUP_DEVICE | ((insns.len() as u64) << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    let prog = match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => fd as i32,
        Err(e) => bail!("loading the device-cgroup BPF program: {e}"),
    };
    // SAFETY: prog is a new fd that the kernel just returned and nobody else owns.
    let prog = unsafe { OwnedFd::from_raw_fd(prog) };
    let mut attr = [0u64; 16];
    // target_fd, attach_bpf_fd (u32 pair); attach_type, attach_flags (u32 pair)
    attr[0] = cgroup.as_raw_fd() as u32 as u64 | ((prog.as_raw_fd() as u64) << 32);
    attr[1] = BPF_CGROUP_DEVICE | (BPF_F_ALLOW_MULTI << 32);
    if let Err(e) = bpf(BPF_PROG_ATTACH, &mut attr) {
        bail!("attaching the device-cgroup BPF program: {e}");
    }
    Ok(prog)
}

/// Swaps the program on `cgroup`: the new one is attached before the old one goes, so no
/// access is ever allowed that neither allows (all attached programs must agree).
pub fn replace(cgroup: &impl AsRawFd, old: &OwnedFd, allowed: &[(u32, Option<u32>)]) -> Result<OwnedFd> {
    const BPF_PROG_DETACH: libc::c_int = 9;
    const BPF_CGROUP_DEVICE: u64 = 6;
    let new = restrict(cgroup, allowed)?;
    let mut attr = [0u64; 16];
    attr[0] = cgroup.as_raw_fd() as u32 as u64 | ((old.as_raw_fd() as u64) << 32);
    attr[1] = BPF_CGROUP_DEVICE;
    if let Err(e) = bpf(BPF_PROG_DETACH, &mut attr) {
        bail!("detaching the previous device-cgroup BPF program: {e}");
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the program the way the kernel would, to check the jump offsets.
    fn eval(p: &[Insn], major: u32, minor: u32, kind: u32) -> i64 {
        let ctx = [kind | (2 << 16), major, minor];
        let mut r = [0i64; 11];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                LDX_W => {
                    assert_eq!(src, 1);
                    r[dst] = ctx[i.off as usize / 4] as i64
                }
                AND_K => r[dst] &= i.imm as i64,
                JNE_K => {
                    if r[dst] != i.imm as i64 {
                        pc = (pc as i64 + i.off as i64) as usize
                    }
                }
                MOV_K => r[dst] = i.imm as i64,
                EXIT => return r[0],
                other => panic!("opcode {other:#x}"),
            }
        }
    }

    #[test]
    fn allows_exactly_the_listed_char_devices() {
        let mut allowed = STANDARD.to_vec();
        allowed.push((226, Some(128)));
        let p = program(&allowed);
        assert_eq!(eval(&p, 1, 3, 2), 1, "null");
        assert_eq!(eval(&p, 136, 42, 2), 1, "any pts");
        assert_eq!(eval(&p, 226, 128, 2), 1, "the selected render node");
        assert_eq!(eval(&p, 226, 129, 2), 0, "another render node");
        assert_eq!(eval(&p, 226, 0, 2), 0, "the card of the same GPU, not selected");
        assert_eq!(eval(&p, 1, 3, 1), 0, "a block device 1:3");
        assert_eq!(eval(&p, 1, 1, 2), 0, "/dev/mem");
        assert_eq!(eval(&program(&[]), 1, 3, 2), 0, "an empty list denies everything");
    }
}

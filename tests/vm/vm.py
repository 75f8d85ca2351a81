"""The test VM, host side: the QEMU command line, the 9p share, QMP. Used by tests/vm/run and
tests/vm/shell. Python 3 standard library only."""

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SHARE_TAG = "gpubox-vm"  # the runner in the image mounts this 9p tag
ROOT_PORTS = ("rp1", "rp2")  # empty PCIe root ports for hot-added GPUs


def build_image():
    """Builds or finds the cached image; returns its directory."""
    out = subprocess.run([str(HERE / "build-image")], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def build_package(dest):
    """`make deb DEBDIR=dest`: gpubox's Debian package, which the guest installs with dpkg.
    Returns its path, or None (make's errors shown) when that fails."""
    shutil.rmtree(dest, ignore_errors=True)
    make = subprocess.run(["make", "-s", "-C", str(REPO), "deb", f"DEBDIR={dest}"], stdout=subprocess.DEVNULL)
    debs = sorted(Path(dest).glob("gpubox_*.deb"))
    return debs[0] if make.returncode == 0 and len(debs) == 1 else None


def make_share(path, deb, mode, scenario=None, timeout=120):
    """A fresh share directory for one VM run (see tests/vm/guest/runner for its layout).
    gpubox.deb is the package; a scenario installs it with dpkg on the first boot (lib.sh). In
    shell mode, where no scenario runs, root/ holds the package's files instead, which the
    runner in the image copies into / on the first boot (the gpubox group is not made then)."""
    shutil.rmtree(path, ignore_errors=True)
    (path / "out").mkdir(parents=True)
    (path / "req").mkdir()
    shutil.copy(deb, path / "gpubox.deb")
    if mode == "shell":
        subprocess.run(["dpkg-deb", "--extract", str(deb), str(path / "root")], check=True)
    shutil.copy(HERE / "lib.sh", path / "lib.sh")
    # Small measuring tools for scenarios (./tools/NAME in the guest); host and guest are both
    # Debian 12, so what the host's compiler makes runs there.
    (path / "tools").mkdir()
    for source in sorted((HERE / "tools").glob("*.c")):
        subprocess.run(["cc", "-O2", "-Wall", "-o", str(path / "tools" / source.stem), str(source)], check=True)
    if scenario:
        shutil.copy(scenario, path / "scenario")
    (path / "mode").write_text(mode + "\n")
    (path / "timeout").write_text(f"{timeout}\n")


def accel():
    """KVM only when a real one is loaded: this kind of machine's /dev/kvm is a nested software
    hypervisor that cannot boot a stock kernel."""
    real = any(Path("/sys/module", m).exists() for m in ("kvm_intel", "kvm_amd"))
    if real and os.access("/dev/kvm", os.R_OK | os.W_OK):
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def qemu_command(image, share, qmp=None, console=None, memory="1G"):
    """console: a log file path, or None for the serial console on this terminal."""
    cmd = ["qemu-system-x86_64", "-machine", "q35", *accel(), "-smp", str(min(os.cpu_count(), 4)),
           "-m", memory, "-nodefaults", "-no-user-config", "-display", "none",
           "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
           "-append", "root=/dev/vda rw console=ttyS0 panic=-1 systemd.show_status=auto "
                      + os.environ.get("GPUBOX_VM_APPEND", ""),
           "-drive", f"file={image / 'disk.img'},format=raw,if=virtio,snapshot=on",
           "-virtfs", f"local,path={share},mount_tag={SHARE_TAG},security_model=none,id=share"]
    # Hot-added PCI devices need an empty root port with room for their BARs reserved up front.
    for i, port in enumerate(ROOT_PORTS, start=1):
        cmd += ["-device", f"pcie-root-port,id={port},bus=pcie.0,chassis={i},slot={i},"
                           "mem-reserve=64M,pref32-reserve=64M"]
    if console:
        cmd += ["-chardev", f"file,id=console,path={console}", "-serial", "chardev:console"]
    else:
        cmd += ["-serial", "mon:stdio"]
    if qmp:
        cmd += ["-qmp", f"unix:{qmp},server=on,wait=off"]
    return cmd


class QMP:
    """A minimal QMP client (QEMU's JSON monitor) on a unix socket."""

    def __init__(self, path, timeout=10):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rw")
        self._read()  # the greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:  # events (DEVICE_DELETED may never come) are not needed
                return msg

    def cmd(self, name, **args):
        self.file.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"{name}: {reply['error'].get('desc', reply['error'])}")
        return reply["return"]

    def peripherals(self):
        """The ids of the devices added with an id (-device id=…, device_add id=…)."""
        return {p["name"] for p in self.cmd("qom-list", path="/machine/peripheral")
                if p["type"].startswith("child<")}

    def device_add(self, **args):
        self.cmd("device_add", **args)

    def device_del(self, dev_id, timeout=30):
        """Asks the guest to release the device and waits until QEMU has removed it. The
        DEVICE_DELETED event does not always arrive, so this polls the peripheral list."""
        self.cmd("device_del", id=dev_id)
        deadline = time.monotonic() + timeout
        while dev_id in self.peripherals():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dev_id} still present {timeout} s after device_del")
            time.sleep(0.2)

    def close(self):
        self.file.close()
        self.sock.close()


def serve_request(qmp_path, line):
    """Carries out one request from a scenario in the guest (lib.sh `host`). Requests:
        device_add KEY=VALUE...   e.g. device_add driver=bochs-display id=gpu1 bus=rp1
        device_del ID             returns once QEMU has removed the device
    Returns the reply: "ok" or "error: …"."""
    words = line.split()
    try:
        qmp = QMP(qmp_path)
        try:
            if words[:1] == ["device_add"] and len(words) > 1:
                qmp.device_add(**dict(w.split("=", 1) for w in words[1:]))
            elif words[:1] == ["device_del"] and len(words) == 2:
                qmp.device_del(words[1])
            else:
                return f"error: unknown request {line!r}"
        finally:
            qmp.close()
    except Exception as e:  # reported to the scenario, which fails its check
        return f"error: {e}"
    return "ok"


def serve_requests(share, qmp_path):
    """Answers every new request file share/req/rN-M with share/req/rN-M.done."""
    for req in sorted((share / "req").iterdir()):
        done = share / "req" / f"{req.name}.done"
        if req.name.startswith("r") and not req.name.endswith(".done") and not done.exists():
            reply = serve_request(qmp_path, req.read_text().strip())
            tmp = share / "req" / f".{req.name}.tmp"
            tmp.write_text(reply + "\n")
            tmp.rename(done)

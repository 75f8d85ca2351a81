"""tests/gpu-check: do `gpuboxctl devices --json` and nvidia-smi agree on each NVIDIA GPU's
index, PCI address and UUID?  argv: the JSON file, then nvidia-smi's
`--query-gpu=index,pci.bus_id,uuid --format=csv,noheader` output."""
import json
import sys


def pci(bus_id):
    # nvidia-smi: 00000000:1A:00.0 (8-digit domain, upper case); gpubox: 0000:1a:00.0
    domain, rest = bus_id.strip().split(":", 1)
    return "%04x:%s" % (int(domain, 16), rest.lower())


with open(sys.argv[1]) as f:
    ours = {
        g["nvidia"]["index"]: (g["pci"], g["nvidia"]["uuid"].lower())
        for g in json.load(f)["gpus"]
        if g.get("nvidia")
    }
with open(sys.argv[2]) as f:
    rows = [line.split(",") for line in f.read().splitlines() if line.strip()]
theirs = {int(i): (pci(bus), uuid.strip().lower()) for i, bus, uuid in rows}
for index in sorted(set(ours) | set(theirs)):
    mark = "  " if ours.get(index) == theirs.get(index) else "!="
    print(f"{mark} nvidia:{index}  gpubox {ours.get(index)}  nvidia-smi {theirs.get(index)}")
if not theirs:
    sys.exit("nvidia-smi lists no GPU")
sys.exit(0 if ours == theirs else 1)

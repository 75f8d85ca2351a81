"""tests/gpu-check: the start time of a container with and without a GPU. argv: the
supervisor, RUNS, the definition without a GPU, the one with it. Runs
`gpubox-supervisor run --definition FILE` RUNS times for each, alternating, after two warm-up
runs each; prints the medians and their difference; exits 1 if any run failed."""
import statistics
import subprocess
import sys
import time

supervisor, runs, plain, gpu = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
times = {plain: [], gpu: []}


def once(definition):
    start = time.perf_counter_ns()
    done = subprocess.run(
        [supervisor, "run", "--definition", definition],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=20,
    )
    elapsed = time.perf_counter_ns() - start
    if done.returncode != 0:
        sys.exit(f"{definition}: exit status {done.returncode}: {done.stderr.decode(errors='replace')[-400:]}")
    return elapsed / 1e6


for definition in (plain, gpu, plain, gpu):
    once(definition)
for _ in range(runs):
    for definition in (plain, gpu):
        times[definition].append(once(definition))
without, with_gpu = statistics.median(times[plain]), statistics.median(times[gpu])
print(f"without a GPU: median {without:.2f} ms (min {min(times[plain]):.2f}, max {max(times[plain]):.2f})")
print(f"with nvidia:0: median {with_gpu:.2f} ms (min {min(times[gpu]):.2f}, max {max(times[gpu]):.2f})")
print(f"difference={with_gpu - without:.2f} ms")

"""bf16 8192x8192 matrix products on GPU 0, for tests/gpu-check: warm-up, then five timed
rounds of 50 products (each closed by torch.cuda.synchronize); prints the best round as
`tflops=N`, the same on the host and in a container."""
import time

import torch

n, rounds, per_round = 8192, 5, 50
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(10):
    c = a @ b
torch.cuda.synchronize()
best = 0.0
for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(per_round):
        c = a @ b
    torch.cuda.synchronize()
    best = max(best, 2 * n**3 * per_round / (time.perf_counter() - start) / 1e12)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}")
print(f"tflops={best:.1f}")

// A CUDA round trip for tests/gpu-check, built with `nvcc -cudart static` so that it needs
// nothing but glibc (and libstdc++) from its root and libcuda.so.1 from the driver: allocates
// device memory, runs a tiny kernel, copies the result back and checks it, then prints
// `cuda=ok` with the driver's and the runtime's versions. Any failure prints `cuda=fail …` and
// exits 1.
//
// With the argument `clear` it first re-executes itself with an EMPTY environment (execve of
// /proc/self/exe, no PATH, no LD_LIBRARY_PATH), as a payload that clears its environment does:
// libcuda.so.1 must then be found where the loader looks by default.
#include <cstdio>
#include <cstring>
#include <unistd.h>
#include <cuda_runtime.h>

extern char **environ;

__global__ void twice_plus_one(int *v, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) v[i] = 2 * v[i] + 1;
}

static int fail(const char *what, cudaError_t e) {
    printf("cuda=fail %s: %s (%s)\n", what, cudaGetErrorString(e), cudaGetErrorName(e));
    return 1;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "clear") == 0) {
        char *args[] = {argv[0], (char *)"cleared", nullptr};
        char *env[] = {nullptr};
        execve("/proc/self/exe", args, env);
        perror("execve /proc/self/exe");
        return 1;
    }
    int variables = 0;
    for (char **e = environ; *e; e++) variables++;

    int driver = 0, runtime = 0;
    cudaError_t e = cudaDriverGetVersion(&driver);
    if (e != cudaSuccess) return fail("cudaDriverGetVersion", e);
    cudaRuntimeGetVersion(&runtime);

    const int n = 1 << 20;
    static int host[1 << 20];
    for (int i = 0; i < n; i++) host[i] = i;
    int *dev = nullptr;
    if ((e = cudaMalloc(&dev, n * sizeof(int))) != cudaSuccess) return fail("cudaMalloc", e);
    if ((e = cudaMemcpy(dev, host, n * sizeof(int), cudaMemcpyHostToDevice)) != cudaSuccess)
        return fail("cudaMemcpy to the device", e);
    twice_plus_one<<<(n + 255) / 256, 256>>>(dev, n);
    if ((e = cudaGetLastError()) != cudaSuccess) return fail("kernel launch", e);
    if ((e = cudaDeviceSynchronize()) != cudaSuccess) return fail("kernel", e);
    if ((e = cudaMemcpy(host, dev, n * sizeof(int), cudaMemcpyDeviceToHost)) != cudaSuccess)
        return fail("cudaMemcpy from the device", e);
    cudaFree(dev);
    for (int i = 0; i < n; i++) {
        if (host[i] != 2 * i + 1) {
            printf("cuda=fail wrong result at %d: %d, expected %d\n", i, host[i], 2 * i + 1);
            return 1;
        }
    }
    cudaDeviceProp prop;
    const char *name = cudaGetDeviceProperties(&prop, 0) == cudaSuccess ? prop.name : "?";
    printf("cuda=ok driver=%d runtime=%d device=%s environment=%d%s\n", driver, runtime, name, variables,
           argc > 1 && strcmp(argv[1], "cleared") == 0 ? " (cleared by execve)" : "");
    return 0;
}

/* A stand-in libnvidia-ml for tests on machines without an NVIDIA GPU: it answers the NVML
 * calls gpubox makes, for one GPU whose minor number comes from $FAKE_NVML_MINOR. gpubox loads
 * it through the same nvml-wrapper code path as the real library (GPUBOX_NVML_LIBRARY). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int nvmlReturn_t;
typedef void *nvmlDevice_t;
static int device;

nvmlReturn_t nvmlInit_v2(void) { return 0; }
nvmlReturn_t nvmlInitWithFlags(unsigned int flags) { (void)flags; return 0; }
nvmlReturn_t nvmlShutdown(void) { return 0; }
const char *nvmlErrorString(nvmlReturn_t r) { return r ? "stand-in error" : "success"; }
nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) { *count = 1; return 0; }
nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *handle) {
    if (index != 0) return 2; /* NVML_ERROR_INVALID_ARGUMENT */
    *handle = &device;
    return 0;
}
nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t d, char *uuid, unsigned int length) {
    (void)d;
    snprintf(uuid, length, "GPU-00000000-1111-2222-3333-444444444444");
    return 0;
}
nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t d, char *name, unsigned int length) {
    (void)d;
    snprintf(name, length, "gpubox stand-in GPU");
    return 0;
}
nvmlReturn_t nvmlDeviceGetMinorNumber(nvmlDevice_t d, unsigned int *minor) {
    (void)d;
    const char *m = getenv("FAKE_NVML_MINOR");
    *minor = m ? (unsigned int)atoi(m) : 0;
    return 0;
}

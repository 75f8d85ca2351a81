/* A stand-in libnvidia-ml for tests on machines without an NVIDIA GPU, faithful to what made
 * the real one dangerous to a supervisor: as soon as it is loaded it starts a thread of its
 * own (the real library's is named cuda00001800007), which never ends, and it is built with
 * -z nodelete, so like the real one it is never unloaded. It answers the NVML calls older
 * gpubox versions made, for one GPU whose minor number comes from $FAKE_NVML_MINOR
 * (GPUBOX_NVML_LIBRARY pointed them at it). gpubox no longer loads NVML into the supervisor;
 * tests keep it in the environment to prove that. */
#define _GNU_SOURCE
#include <pthread.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef int nvmlReturn_t;
typedef void *nvmlDevice_t;
static int device;

/* The thread allocates and frees in a loop, so it often holds malloc's lock: a process cloned
 * from the one that loaded this library may inherit that lock held, as with the real one. */
static void *worker(void *arg) {
    (void)arg;
    for (;;) {
        free(malloc(4096));
        usleep(100);
    }
    return NULL;
}

__attribute__((constructor)) static void start_thread(void) {
    pthread_t t;
    if (pthread_create(&t, NULL, worker, NULL) == 0) pthread_setname_np(t, "cuda00001800007");
}

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

/* Processes on the GPU, for `gpuboxctl status`: $FAKE_NVML_PROCS is "PID:BYTES:SM,…". */
typedef struct { unsigned int pid; unsigned long long usedGpuMemory; unsigned int gpuInstanceId; unsigned int computeInstanceId; } nvmlProcessInfo_t;
typedef struct { unsigned int pid; unsigned long long timeStamp; unsigned int smUtil, memUtil, encUtil, decUtil; } nvmlProcessUtilizationSample_t;

static unsigned int fake_procs(unsigned int *pids, unsigned long long *bytes, unsigned int *sm, unsigned int max) {
    const char *env = getenv("FAKE_NVML_PROCS");
    unsigned int n = 0;
    while (env && *env && n < max) {
        unsigned int pid = 0, util = 0;
        unsigned long long b = 0;
        if (sscanf(env, "%u:%llu:%u", &pid, &b, &util) != 3) break;
        pids[n] = pid; bytes[n] = b; sm[n] = util; n++;
        env = strchr(env, ',');
        if (env) env++;
    }
    return n;
}

/* One handle per PCI address asked for, so that pairs can be told apart. */
static char buses[16][32];
static int handles[16];

nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *bus, nvmlDevice_t *handle) {
    for (int i = 0; i < 16; i++) {
        if (!buses[i][0]) snprintf(buses[i], sizeof buses[i], "%s", bus);
        if (strcasecmp(buses[i], bus) == 0) { *handle = &handles[i]; return 0; }
    }
    return 2;
}

static const char *bus_of(nvmlDevice_t d) { return buses[(int *)d - handles]; }

/* $FAKE_NVML_NVLINK: "BUS+BUS,…", the pairs joined by NVLink. */
static int nvlinked(nvmlDevice_t a, nvmlDevice_t b) {
    const char *env = getenv("FAKE_NVML_NVLINK");
    char pair[80];
    if (!env) return 0;
    snprintf(pair, sizeof pair, "%s+%s", bus_of(a), bus_of(b));
    if (strcasestr(env, pair)) return 1;
    snprintf(pair, sizeof pair, "%s+%s", bus_of(b), bus_of(a));
    return strcasestr(env, pair) != NULL;
}

nvmlReturn_t nvmlDeviceGetP2PStatus(nvmlDevice_t a, nvmlDevice_t b, int index, int *status) {
    *status = (index == 2 /* NVLINK */ && nvlinked(a, b)) ? 0 /* OK */ : 5 /* NOT_SUPPORTED */;
    return 0;
}

nvmlReturn_t nvmlDeviceGetTopologyCommonAncestor(nvmlDevice_t a, nvmlDevice_t b, int *level) {
    *level = nvlinked(a, b) ? 10 /* SINGLE */ : 50 /* SYSTEM */;
    return 0;
}

nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t d, unsigned int *count, nvmlProcessInfo_t *infos) {
    unsigned int pids[64], sm[64];
    unsigned long long bytes[64];
    unsigned int n = fake_procs(pids, bytes, sm, 64);
    (void)d;
    if (!infos || *count < n) { *count = n; return n ? 7 /* INSUFFICIENT_SIZE */ : 0; }
    for (unsigned int i = 0; i < n; i++) {
        infos[i].pid = pids[i]; infos[i].usedGpuMemory = bytes[i];
        infos[i].gpuInstanceId = 0xFFFFFFFF; infos[i].computeInstanceId = 0xFFFFFFFF;
    }
    *count = n;
    return 0;
}

nvmlReturn_t nvmlDeviceGetProcessUtilization(nvmlDevice_t d, nvmlProcessUtilizationSample_t *samples, unsigned int *count, unsigned long long last) {
    unsigned int pids[64], sm[64];
    unsigned long long bytes[64];
    unsigned int n = fake_procs(pids, bytes, sm, 64);
    (void)d; (void)last;
    if (!samples || *count < n) { *count = n; return n ? 7 : 0; }
    for (unsigned int i = 0; i < n; i++) {
        samples[i].pid = pids[i]; samples[i].timeStamp = 1; samples[i].smUtil = sm[i];
        samples[i].memUtil = 0; samples[i].encUtil = 0; samples[i].decUtil = 0;
    }
    *count = n;
    return 0;
}

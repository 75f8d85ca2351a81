/* hotplug-observe PID COUNT: loads and unloads vkms COUNT times and prints, for each, how long
 * the container of PID took to follow: "add US MODE_US UDEV_US" from the host's /dev/dri/card0 being
 * made to the node being there inside (US), and to the node inside having the mode udev gave
 * the host's (MODE_US: when a non-root user of the device group can open it; -1 if not within
 * 5 s), and to udev having set the host node's mode (UDEV_US, as this observer saw it: at the
 * latest when the node inside got its mode, since it looks at both then); "remove US" from the host's node going to the node gone inside ("missed" when nothing
 * came within 5 s).
 *
 * Both ends are events, not polls: inotify on the host's /dev/dri, and a poll of the
 * container's mountinfo, which wakes on every change of its mount table. The observer runs at a
 * real-time priority (modprobe and rmmod at the normal one), so it wakes the moment either
 * happens, and it takes no CPU from what it measures in between: a loop that polled every
 * millisecond from a shell saw the ends up to 50 ms late on two busy emulated vCPUs, or, at a
 * real-time priority, slowed what it measured. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000LL + t.tv_nsec / 1000;
}

static void die(const char *what) {
    perror(what);
    exit(2);
}

/* Starts CMD (modprobe or rmmod) at the normal priority, in the background. */
static pid_t start(char *const argv[]) {
    pid_t pid = fork();
    if (pid < 0) die("fork");
    if (pid == 0) {
        struct sched_param p = {0};
        sched_setscheduler(0, SCHED_OTHER, &p);
        execvp(argv[0], argv);
        _exit(127);
    }
    return pid;
}

/* Waits until inotify reports NAME created (want_create) or deleted in the watched directory. */
static int wait_host(int ino, int want_create) {
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    long long end = now_us() + 5000000;
    for (;;) {
        struct pollfd p = {ino, POLLIN, 0};
        int left = (int)((end - now_us()) / 1000);
        if (left <= 0 || poll(&p, 1, left) <= 0) return -1;
        ssize_t n = read(ino, buf, sizeof buf);
        for (char *at = buf; n > 0 && at < buf + n;) {
            struct inotify_event *e = (struct inotify_event *)at;
            int created = (e->mask & IN_CREATE) != 0, deleted = (e->mask & IN_DELETE) != 0;
            if (e->len && strcmp(e->name, "card0") == 0 && (want_create ? created : deleted)) return 0;
            at += sizeof *e + e->len;
        }
    }
}

/* Waits until the node inside is there (want) or gone, waking on the container's mount table. */
static int wait_inside(int mountinfo, const char *node, int want) {
    long long end = now_us() + 5000000;
    for (;;) {
        struct stat st;
        int there = stat(node, &st) == 0 && S_ISCHR(st.st_mode);
        if (there == want) return 0;
        struct pollfd p = {mountinfo, POLLPRI, 0};
        int left = (int)((end - now_us()) / 1000);
        if (left <= 0) return -1;
        poll(&p, 1, left);
    }
}

/* Waits until udev has set the host node's mode (devtmpfs makes it 0600) and the node inside
 * has the same, waking on attribute changes of either (the node inside is the inode the
 * supervisor changes). */
static int wait_mode(const char *node, long long *host_set) {
    int attr = inotify_init1(IN_CLOEXEC);
    if (attr < 0 || inotify_add_watch(attr, "/dev/dri", IN_ATTRIB) < 0 || inotify_add_watch(attr, node, IN_ATTRIB) < 0)
        die("inotify for modes");
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    long long end = now_us() + 5000000;
    int result = -1;
    for (;;) {
        struct stat host, inside;
        int udev_done = stat("/dev/dri/card0", &host) == 0 && (host.st_mode & 07777) != 0600;
        if (udev_done && *host_set < 0) *host_set = now_us();
        if (udev_done && stat(node, &inside) == 0 &&
            (host.st_mode & 07777) == (inside.st_mode & 07777)) {
            result = 0;
            break;
        }
        struct pollfd p = {attr, POLLIN, 0};
        int left = (int)((end - now_us()) / 1000);
        if (left <= 0 || poll(&p, 1, left) <= 0) break;
        if (read(attr, buf, sizeof buf) < 0) break;
    }
    close(attr);
    return result;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: hotplug-observe PID COUNT\n");
        return 2;
    }
    char node[64], mountinfo_path[64];
    snprintf(node, sizeof node, "/proc/%s/root/dev/dri/card0", argv[1]);
    snprintf(mountinfo_path, sizeof mountinfo_path, "/proc/%s/mountinfo", argv[1]);
    int count = atoi(argv[2]);

    struct sched_param rt = {.sched_priority = 10};
    if (sched_setscheduler(0, SCHED_FIFO, &rt) < 0) die("sched_setscheduler");
    /* devtmpfs removes /dev/dri once it is empty; a file of ours keeps it for the watch. */
    mkdir("/dev/dri", 0755);
    int keep = open("/dev/dri/.hotplug-observe", O_CREAT | O_WRONLY, 0600);
    if (keep < 0) die("/dev/dri/.hotplug-observe");
    int ino = inotify_init1(IN_CLOEXEC);
    if (ino < 0 || inotify_add_watch(ino, "/dev/dri", IN_CREATE | IN_DELETE) < 0) die("inotify /dev/dri");
    int mountinfo = open(mountinfo_path, O_RDONLY | O_CLOEXEC);
    if (mountinfo < 0) die(mountinfo_path);

    char *load[] = {"modprobe", "vkms", NULL}, *unload[] = {"rmmod", "vkms", NULL};
    for (int i = 0; i < count; i++) {
        for (int add = 1; add >= 0; add--) {
            pid_t cmd = start(add ? load : unload);
            long long t0 = -1, t1 = -1, t2 = -1, th = -1;
            if (wait_host(ino, add) == 0) {
                t0 = now_us();
                if (wait_inside(mountinfo, node, add) == 0) t1 = now_us();
                if (t1 >= 0 && add && wait_mode(node, &th) == 0) t2 = now_us();
            }
            if (t1 >= 0 && add)
                printf("add %lld %lld %lld\n", t1 - t0, t2 >= 0 ? t2 - t0 : -1, th >= 0 ? th - t0 : -1);
            else if (t1 >= 0)
                printf("remove %lld\n", t1 - t0);
            else
                printf("missed %s\n", add ? "add" : "remove");
            fflush(stdout);
            int status;
            waitpid(cmd, &status, 0);
        }
    }
    unlink("/dev/dri/.hotplug-observe");
    return 0;
}

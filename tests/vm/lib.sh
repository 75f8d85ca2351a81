# Helpers for scenarios, sourced in the guest: `. ./lib.sh` (the runner starts scenarios in the
# share). A scenario prints one line per check and exits non-zero when any failed.

fails=0
phase=${GPUBOX_VM_PHASE:-1}

# gpubox itself, from its Debian package in the share (tests/vm/run puts it there), installed on
# the first boot before the scenario starts, as an admin installs it: dpkg -i, whose postinst
# makes the group gpubox, reloads systemd (the generator runs) and udev. The image keeps only
# copyright files of /usr/share/doc and no man pages (its dpkg path-excludes); gpubox's are
# included again. The disk keeps the installation over a reboot_and_continue.
if [[ $phase == 1 && -f $GPUBOX_VM_SHARE/gpubox.deb ]]; then
    if ! dpkg --path-include='/usr/share/doc/gpubox/*' --path-include='/usr/share/man/man*/gpubox*' \
        -i "$GPUBOX_VM_SHARE/gpubox.deb" >"$GPUBOX_VM_SHARE/out/dpkg.log" 2>&1; then
        echo "FAIL dpkg -i gpubox.deb:"
        sed 's/^/    /' "$GPUBOX_VM_SHARE/out/dpkg.log"
        exit 1
    fi
    echo "ok   gpubox installed: dpkg -i gpubox.deb"
fi

# check DESCRIPTION SHELL-CODE: runs the code, records ok/FAIL.
check() {
    local desc=$1 code=$2
    if eval "$code"; then
        echo "ok   $desc"
    else
        echo "FAIL $desc    [$code]"
        fails=$((fails + 1))
    fi
}

# wait_until SECONDS SHELL-CODE: polls (every 50 ms) until the code succeeds; false on timeout.
wait_until() {
    local end=$((SECONDS + $1)) code=$2
    until eval "$code"; do
        ((SECONDS < end)) || return 1
        sleep 0.05
    done
}

# ms_since T0: milliseconds since T0, taken with `date +%s%N`.
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }

# host REQUEST...: has tests/vm/run do something outside the VM (see serve_request in vm.py),
# e.g. `host device_add driver=bochs-display id=gpu1 bus=rp1`, `host device_del gpu1`.
# Waits for the answer; false (and the reason on stderr) unless it is "ok".
host_seq=0
host() {
    host_seq=$((host_seq + 1))
    local req=$GPUBOX_VM_SHARE/req/r$phase-$host_seq reply end=$((SECONDS + 60))
    echo "$*" >"$GPUBOX_VM_SHARE/req/.tmp" && mv "$GPUBOX_VM_SHARE/req/.tmp" "$req"
    until [[ -e $req.done ]]; do
        ((SECONDS < end)) || { echo "host $*: no answer" >&2; return 1; }
        sleep 0.05
    done
    reply=$(cat "$req.done")
    [[ $reply == ok ]] || { echo "host $*: $reply" >&2; return 1; }
}

# The DRM device nodes (cardN, renderDN) present now, space-separated.
drm_nodes() { (cd /dev/dri 2>/dev/null && echo card* renderD* | tr ' ' '\n' | grep -v '\*' | tr '\n' ' '); }

# container_pid UNIT: a process of the unit's payload (the first one in a cgroup other than the
# supervisor's), for looking inside with /proc/PID/root or nsenter.
container_pid() {
    local cg pid
    cg=/sys/fs/cgroup$(systemctl show -P ControlGroup "$1")
    [[ $cg != /sys/fs/cgroup ]] || return 1
    pid=$(find "$cg" -mindepth 2 -name cgroup.procs -not -path '*/supervisor/*' -exec cat {} + | head -n 1)
    [[ -n $pid ]] && echo "$pid"
}

# in_container PID COMMAND...: runs COMMAND in PID's cgroup and namespaces, so that the device
# cgroup and the mounts it sees are the container's.
in_container() {
    local pid=$1
    shift
    [[ $pid =~ ^[0-9]+$ ]] || { echo "in_container: no container process" >&2; return 1; }
    sh -c 'echo $$ >"/sys/fs/cgroup$(sed -n "s/^0:://p" /proc/'"$pid"'/cgroup)/cgroup.procs" && exec "$@"' \
        sh nsenter --target "$pid" --all -- "$@"
}

# by_hand PID NAME MAJOR:MINOR: makes a device node visible inside the container of PID by hand
# (not through gpubox): a tmpfs mounted on the container's /mnt, holding NAME, mode 0666. Made
# from the host's user namespace, so that only the device cgroup can stop an open(). (umask, not
# mknod -m: chmod of a node goes through /proc/self, which is not ours in the container.)
by_hand() {
    local pid=$1 name=$2 major=${3%:*} minor=${3#*:}
    [[ $pid =~ ^[0-9]+$ ]] || { echo "by_hand: no container process" >&2; return 1; }
    nsenter --target "$pid" --mount sh -c \
        "mount -t tmpfs -o mode=0755 gpubox-by-hand /mnt && umask 0 && mknod /mnt/$name c $major $minor"
}

# reboot_and_continue: ends this boot's part; the runner reboots the VM (the disk keeps its
# changes) and runs the scenario again with GPUBOX_VM_PHASE one higher.
reboot_and_continue() { exit 100; }

# finish: the scenario's result.
finish() {
    echo "$fails failed check(s)"
    ((fails == 0))
    exit
}

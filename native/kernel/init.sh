#!/bin/busybox sh
# /init of the real-kernel tier's initramfs (docs/testing.md "The real-kernel tier").
#
# Runs as PID 1 in a QEMU guest booted by tests/kernel/vm.py. It loads the modules listed
# in /modules.list (in `modprobe --show-depends` order, already decompressed because
# busybox insmod cannot read .ko.xz), mounts the host's root read-only over 9p with a
# tmpfs overlay on top (so the guest runs the host's Python, venv and checkout at the same
# paths), mounts the second, writable 9p share ("results") and runs the command the host
# left in results/cmd.sh inside that root. Its output, exit code and the kernel log go back
# through the results share; then the guest powers off.
#
# Lines starting with "vfiod-guest:" on the console are markers the host parses (timing,
# diagnostics); keep their wording in step with tests/kernel/vm.py.

/bin/busybox --install -s /bin
export PATH=/bin

say() { echo "vfiod-guest: $*"; }

# Leaving PID 1 panics the kernel; with panic=-1 and QEMU's -no-reboot that ends the VM
# at once, so every failure path below powers off explicitly after saying why.
halt_vm() {
    sync
    poweroff -f
    sleep 5
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say "init started (uptime $(cut -d' ' -f1 /proc/uptime))"

# A failed insmod is reported and skipped: the guest tests check each module they need
# and fail naming it (quoting /insmod-failures.log), which says more than a VM that never
# comes up.
: > /insmod-failures.log
while read -r mod; do
    [ -n "$mod" ] || continue
    if ! out=$(insmod "$mod" 2>&1); then
        say "insmod $mod failed: $out"
        echo "$mod: $out" >> /insmod-failures.log
    fi
done < /modules.list

mkdir -p /mnt/lower /mnt/rw /newroot /results
# msize: 9p's default 8 KiB messages make every Python import crawl under emulation.
# cache=loose is safe for the read-only root (nothing changes under the guest's feet
# during a run); the results share stays uncached so whatever was written before a hang
# is already on the host.
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro,cache=loose hostroot /mnt/lower; then
    say "FATAL: cannot mount the host root (9p tag hostroot)"
    halt_vm
fi
if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 results /results; then
    say "FATAL: cannot mount the results share (9p tag results)"
    halt_vm
fi
mount -t tmpfs -o mode=0755 tmpfs /mnt/rw
mkdir -p /mnt/rw/upper /mnt/rw/work
if ! mount -t overlay overlay -o lowerdir=/mnt/lower,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work /newroot; then
    say "FATAL: cannot mount the overlay root"
    echo 125 > /results/exit-code
    halt_vm
fi

for d in proc sys dev tmp run vfiod-results; do mkdir -p "/newroot/$d"; done
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/shm /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
mount --move /results /newroot/vfiod-results
# The checkout, shared on its own and overlaid like the root: where it lives under a path
# the guest mounts afresh (a CI clone in /tmp), the root share alone would hide it.
if [ -f /newroot/vfiod-results/repo-path ]; then
    repo=$(cat /newroot/vfiod-results/repo-path)
    mkdir -p /mnt/repo /mnt/rw/repo-upper /mnt/rw/repo-work "/newroot$repo"
    if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro,cache=loose repo /mnt/repo ||
       ! mount -t overlay overlay -o lowerdir=/mnt/repo,upperdir=/mnt/rw/repo-upper,workdir=/mnt/rw/repo-work "/newroot$repo"; then
        say "FATAL: cannot mount the checkout share (9p tag repo) at $repo"
        echo 124 > /newroot/vfiod-results/exit-code
        halt_vm
    fi
fi
cp /insmod-failures.log /newroot/vfiod-results/insmod-failures.log

if [ ! -f /newroot/vfiod-results/cmd.sh ]; then
    say "FATAL: the results share has no cmd.sh"
    echo 126 > /newroot/vfiod-results/exit-code
    halt_vm
fi

say "command start (uptime $(cut -d' ' -f1 /proc/uptime))"
chroot /newroot /bin/sh /vfiod-results/cmd.sh > /newroot/vfiod-results/output.log 2>&1
rc=$?
say "command exit $rc (uptime $(cut -d' ' -f1 /proc/uptime))"
dmesg > /newroot/vfiod-results/dmesg.log 2>&1
# The exit code is written last: its presence tells the host that the run completed.
echo "$rc" > /newroot/vfiod-results/exit-code
sync
umount /newroot/vfiod-results
halt_vm

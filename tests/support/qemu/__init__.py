"""The QEMU VM tier's rig (docs/architecture.md §8.3): real QEMU 7.2 VMs booting the kernel tier's
Debian kernel with our workload as init (native/qemu-guest/README.md).

assets.py   the kernel and the workload initramfs, cached
guest.py    QemuGuest: one QEMU process, its RAM file, console and two QMP sockets
qmp.py      QmpClient: the test's own QMP connection
pages.py    workload_pages: what the vCPU wrote, read from a RAM file
"""

"""Pure data mirroring the kernel ABI: ctypes structs, constants and ioctl numbers under
the kernel's own names (docs/kernel-contract.md §0 - §7). Import the modules, e.g.
``import vfiod.abi.vfio as vfio``:

* ``ioctl``     -- ``_IO`` request-number helpers (VFIO_TYPE, VFIO_BASE, IOMMUFD_TYPE)
* ``layout``    -- offsetofend, flexible-array buffers, capability-chain parsing
* ``vfio``      -- <linux/vfio.h> (re-exports ``vfio_feature``: features, v2, logging, cdev)
* ``iommufd``   -- <linux/iommufd.h>
* ``v1``        -- the deprecated v1 migration region and vfiod's names for its bits

Every struct and constant here is checked against real kernel headers by tests/abi.
Nothing here performs a syscall.
"""

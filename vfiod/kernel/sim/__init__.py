"""The simulated VFIO kernel: ``SimKernel`` implements ``KernelOps`` (docs/architecture.md §2) over
simulated containers, groups, devices, type1 and iommufd, held to the real kernel's checks
and errno values (docs/kernel-contract.md §3, §4, §8); ``SimHost`` builds a host around it (sysfs tree,
/dev nodes, devices from ``DeviceSpec``s). Migration parts live in ``sim.migration``.

    from vfiod.kernel.sim import SimHost, HostDevice
    host = SimHost.build(tmp_path, [[DeviceSpec("0000:3b:00.1", migration="v2")]])
"""

from vfiod.kernel.sim.host import HostDevice, SimHost, SimHostConfig
from vfiod.kernel.sim.kernel import SIM_FD_BASE, SimKernel
from vfiod.kernel.sim.type1 import Type1Config

__all__ = ["SIM_FD_BASE", "HostDevice", "SimHost", "SimHostConfig", "SimKernel", "Type1Config"]

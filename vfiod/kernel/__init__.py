"""The syscall seam: ``KernelOps`` with a real (``linux``) and a simulated (``sim``) kernel."""

from vfiod.kernel.ops import Buffer, KernelOps

__all__ = ["Buffer", "KernelOps"]

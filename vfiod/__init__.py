"""vfiod: a VFIO migration daemon for Linux hypervisor hosts.

Layers (imports point down only, see docs/architecture.md §2):
cli → daemon → migration → dirty → vfio → kernel → abi; api/ and errors.py are leaves.
"""

__version__ = "0.1.0"

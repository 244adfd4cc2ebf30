"""What vfiod.abi claims about the kernel ABI, as probe keys (see native/abi_probe.c),
and how to judge one claim against one header set. Shared by tests/abi and the
real-kernel tier (which runs the probe against the guest kernel's headers).

Every mirrored struct contributes its sizeof and each field's offset and size (flexible
tails: offset and element size); every kernel-named int/str constant contributes its
value. vfiod's own names (the v1 state bits, header sizes) map to the kernel's
spelling in ALIASES. ``SINCE`` says in which release a name first appeared in the uAPI
headers, so an older header set is allowed (and required) to lack it; ``LEGACY`` lists the
few values older headers legitimately disagree on.
"""

from __future__ import annotations

import ctypes
import importlib
import pkgutil
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import vfiod.abi
from vfiod.abi import iommufd, v1, vfio
from vfiod.abi.layout import FlexStruct

Version = tuple[int, int]

#: Names (struct, struct.field or constant) newer than the oldest headers checked.
SINCE: dict[str, Version] = {
    # 6.2: <linux/iommufd.h> (names of vfiod.abi.ioctl that only it defines)
    "IOMMUFD_TYPE": (6, 2), "IOMMUFD_CMD_BASE": (6, 2),
    # 6.2: PRE_COPY, PRECOPY_INFO, MIG_DATA_SIZE (docs/kernel-contract.md §1)
    "VFIO_MIGRATION_PRE_COPY": (6, 2), "VFIO_DEVICE_STATE_PRE_COPY": (6, 2),
    "VFIO_DEVICE_STATE_PRE_COPY_P2P": (6, 2), "VFIO_DEVICE_STATE_NR": (6, 2),
    "MigState.PRE_COPY": (6, 2), "MigState.PRE_COPY_P2P": (6, 2),
    "VFIO_MIG_GET_PRECOPY_INFO": (6, 2), "vfio_precopy_info": (6, 2),
    "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE": (6, 2), "vfio_device_feature_mig_data_size": (6, 2),
    # 6.6: cdev, explicit pads, CDX
    "VFIO_DEVICE_BIND_IOMMUFD": (6, 6), "VFIO_DEVICE_ATTACH_IOMMUFD_PT": (6, 6),
    "VFIO_DEVICE_DETACH_IOMMUFD_PT": (6, 6), "vfio_device_bind_iommufd": (6, 6),
    "vfio_device_attach_iommufd_pt": (6, 6), "vfio_device_detach_iommufd_pt": (6, 6),
    "vfio_device_info.pad": (6, 6), "vfio_iommu_type1_info.pad": (6, 6),
    "VFIO_DEVICE_FLAGS_CDX": (6, 6),
    # 6.7: CDX bus master feature; iommufd dirty tracking
    "VFIO_DEVICE_FEATURE_BUS_MASTER": (6, 7),
    # 6.11: iommufd fault queue (HWPT fault_id)
    "iommu_hwpt_alloc.fault_id": (6, 11), "iommu_hwpt_alloc.__reserved2": (6, 11),
    "IOMMU_HWPT_FAULT_ID_VALID": (6, 11),
    # present in the 6.12 header; the exact first release is not verified here
    "iommu_hw_info.out_max_pasid_log2": (6, 12),
}
#: Every name in vfiod.abi.iommufd: <linux/iommufd.h> first shipped in 6.2.
MODULE_SINCE: dict[str, Version] = {iommufd.__name__: (6, 2)}

#: Probe key -> (first release with our value, the value headers before it print).
LEGACY: dict[str, tuple[Version, int]] = {
    # 6.1 ends vfio_device_info at cap_offset (20 bytes); 6.6 added the explicit pad.
    "struct.vfio_device_info.sizeof": ((6, 6), 20),
}

#: vfiod's own names -> the probe key that holds the kernel's value.
ALIASES: dict[str, str] = {
    "V1_STATE_STOP": "const.VFIO_DEVICE_STATE_V1_STOP",
    "V1_STATE_RUNNING": "const.VFIO_DEVICE_STATE_V1_RUNNING",
    "V1_STATE_SAVING": "const.VFIO_DEVICE_STATE_V1_SAVING",
    "V1_STATE_RESUMING": "const.VFIO_DEVICE_STATE_V1_RESUMING",
    "V1_STATE_MASK": "const.VFIO_DEVICE_STATE_MASK",
    "V1_STATE_ERROR": "macro.VFIO_DEVICE_STATE_SET_ERROR(0)",
    "FEATURE_HEADER_SIZE": "struct.vfio_device_feature.sizeof",
    "CAP_HEADER_SIZE": "struct.vfio_info_cap_header.sizeof",
}

#: v1 rule macros evaluated by the probe, per argument (must match abi_probe.c).
V1_VALID_ARGS = (0, 1, 2, 3, 4, 5, 6, 7, 12, 9)
V1_IS_ERROR_ARGS = (0, 1, 2, 3, 4, 5, 6, 7, 14)


@dataclass(frozen=True)
class Entry:
    key: str            # probe key
    name: str           # the Python-side name, for messages
    value: Any          # what vfiod.abi says
    since: Version | None
    module: str


def abi_modules() -> list[ModuleType]:
    """Every module of the vfiod.abi package (new modules are picked up automatically)."""
    return [importlib.import_module(f"{vfiod.abi.__name__}.{m.name}")
            for m in pkgutil.iter_modules(vfiod.abi.__path__)]


def abi_structs() -> dict[str, type[ctypes.Structure]]:
    """Every ctypes struct defined in vfiod.abi, by name (helper bases excluded)."""
    out: dict[str, type[ctypes.Structure]] = {}
    for mod in abi_modules():
        for obj in vars(mod).values():
            if (isinstance(obj, type) and issubclass(obj, ctypes.Structure)
                    and obj.__module__ == mod.__name__ and obj is not FlexStruct):
                out[obj.__name__] = obj
    return out


def abi_constants() -> dict[str, tuple[Any, str]]:
    """Kernel-named (or aliased) int/str constants of every vfiod.abi module:
    name -> (value, first module defining it; re-exports share the value)."""
    out: dict[str, tuple[Any, str]] = {}
    for mod in abi_modules():
        for name, value in vars(mod).items():
            if not name.isupper() or name.startswith("_") or isinstance(value, bool):
                continue
            if isinstance(value, (int, str)):
                out.setdefault(name, (value, mod.__name__))
    return out


def _since(*names: str, module: str = "") -> Version | None:
    found = [SINCE[n] for n in names if n in SINCE]
    if module in MODULE_SINCE:
        found.append(MODULE_SINCE[module])
    return max(found) if found else None


def _struct_entries(name: str, st: type[ctypes.Structure]) -> Iterator[Entry]:
    mod = st.__module__
    yield Entry(f"struct.{name}.sizeof", name, ctypes.sizeof(st), _since(name, module=mod), mod)
    for fname, *_ in st._fields_:
        desc = getattr(st, fname)
        since = _since(name, f"{name}.{fname}", module=mod)
        yield Entry(f"struct.{name}.offsetof.{fname}", f"{name}.{fname}", desc.offset,
                    since, mod)
        yield Entry(f"struct.{name}.sizeof.{fname}", f"{name}.{fname}", desc.size, since, mod)
    flex = getattr(st, "_flex_", None)
    if flex is not None:
        fname, elem, offset = flex
        since = _since(name, f"{name}.{fname}", module=mod)
        yield Entry(f"struct.{name}.offsetof.{fname}", f"{name}.{fname}[]", offset, since, mod)
        yield Entry(f"struct.{name}.elemsize.{fname}", f"{name}.{fname}[]",
                    ctypes.sizeof(elem), since, mod)


def entries() -> list[Entry]:
    """Every claim vfiod.abi makes, one per probe key."""
    out: list[Entry] = []
    for name, st in sorted(abi_structs().items()):
        out.extend(_struct_entries(name, st))
    for name, (value, mod) in sorted(abi_constants().items()):
        key = ALIASES.get(name, f"const.{name}")
        out.append(Entry(key, name, value, _since(name, module=mod), mod))
    for member in vfio.MigState:
        out.append(Entry(f"const.VFIO_DEVICE_STATE_{member.name}", f"MigState.{member.name}",
                         int(member), _since(f"MigState.{member.name}"), vfio.__name__))
    for arg in V1_VALID_ARGS:
        out.append(Entry(f"macro.VFIO_DEVICE_STATE_VALID({arg})", f"v1_state_valid({arg})",
                         int(v1.v1_state_valid(arg)), None, v1.__name__))
    for arg in V1_IS_ERROR_ARGS:
        out.append(Entry(f"macro.VFIO_DEVICE_STATE_IS_ERROR({arg})",
                         f"v1_state_is_error({arg})", int(v1.v1_state_is_error(arg)), None,
                         v1.__name__))
    return out


def _fmt(value: Any) -> str:
    return hex(value) if isinstance(value, int) and value > 9 else repr(value)


def judge(entry: Entry, probe: dict[str, Any], header_name: str,
          version: Version) -> str | None:
    """None if ``probe`` (from header set ``header_name`` of release ``version``) agrees
    with ``entry``; otherwise a message naming the key, the Python name and both values."""
    newer = entry.since is not None and version < entry.since
    if entry.key not in probe:
        if newer:
            return None      # correctly absent: the name arrived after this header set
        return (f"{entry.key} ({entry.name}): {header_name} headers print no such entry; "
                f"abi_probe.c does not emit it, or its #if guard / SINCE is wrong")
    if newer:
        assert entry.since is not None
        return (f"{entry.key} ({entry.name}): present in {header_name} headers although "
                f"SINCE says {entry.since[0]}.{entry.since[1]}: fix SINCE or the probe guard")
    want = entry.value
    legacy = LEGACY.get(entry.key)
    if legacy is not None and version < legacy[0]:
        want = legacy[1]
    got = probe[entry.key]
    if got != want:
        return (f"{entry.key} ({entry.name}): vfiod.abi says {_fmt(want)}, "
                f"{header_name} headers say {_fmt(got)}")
    return None

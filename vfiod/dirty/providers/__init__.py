"""Dirty-page providers (docs/architecture.md §3): one protocol (``base.DirtyProvider``) over device
DMA logging, type1 container tracking, iommufd HWPT tracking and "none", and the
per-container choice among them (``select``)."""

from vfiod.dirty.providers.base import (
    Bitmap,
    DirtyProvider,
    DmaSpace,
    IommufdSpace,
    ProviderName,
    ProviderUnavailable,
)
from vfiod.dirty.providers.device_logging import DeviceLoggingProvider, plan_ranges
from vfiod.dirty.providers.iommufd import IommufdProvider
from vfiod.dirty.providers.none import NoneProvider
from vfiod.dirty.providers.select import Selection, preferred, select
from vfiod.dirty.providers.type1 import Type1Provider

__all__ = [
    "Bitmap", "DirtyProvider", "DmaSpace", "IommufdSpace", "ProviderName", "ProviderUnavailable",
    "DeviceLoggingProvider", "plan_ranges", "IommufdProvider", "NoneProvider",
    "Selection", "preferred", "select", "Type1Provider",
]

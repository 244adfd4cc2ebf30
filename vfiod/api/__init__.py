"""The control protocol (docs/architecture.md §6): the JSON-lines envelope with its schema version
(``schema``), the operations and their typed arguments (``ops``), and a socket client
(``client``). A leaf of the layer graph: imports nothing of vfiod but ``errors``.
"""

from vfiod.api.client import DEFAULT_SOCKET, ClientError, ControlClient
from vfiod.api.ops import (
    OPS,
    AttachArgs,
    CancelArgs,
    CheckArgs,
    DetachArgs,
    DirtyTrackingArgs,
    MigrateArgs,
    NoArgs,
    RamHandOver,
    StatusArgs,
    args_to_json,
    format_host_port,
    parse_args,
    parse_host_port,
)
from vfiod.api.schema import (
    MAX_LINE,
    SCHEMA_VERSION,
    ApiError,
    ApiErrorCode,
    Request,
    RequestError,
    Response,
)

__all__ = [
    "DEFAULT_SOCKET", "ClientError", "ControlClient", "OPS", "CancelArgs", "CheckArgs",
    "DirtyTrackingArgs", "MigrateArgs", "NoArgs", "StatusArgs", "AttachArgs", "DetachArgs",
    "RamHandOver", "args_to_json",
    "format_host_port", "parse_args", "parse_host_port", "MAX_LINE", "SCHEMA_VERSION",
    "ApiError", "ApiErrorCode", "Request", "RequestError", "Response",
]

"""What a caller is told when a call this service made downstream fails.

The downstream's status code and name, not its details: those can name an account ("caller not allowed:
aggregator-sa@..."), an address, or what a metadata server answered, none of which is the caller's business.
The details go to this service's log. The one exception is INVALID_ARGUMENT, whose details describe the request
the caller sent (a field out of range) and tell the caller what to fix.
"""

from __future__ import annotations

import logging

import grpc

_log = logging.getLogger("mesh.downstream")
_ABOUT_THE_REQUEST = frozenset({grpc.StatusCode.INVALID_ARGUMENT})


def reported(downstream: str, error: grpc.aio.AioRpcError) -> str:
    """What to tell the caller about `error` from `downstream`: its details for INVALID_ARGUMENT, else the
    code's name. The details are logged either way."""
    code, details = error.code(), error.details() or ""
    _log.warning("downstream call to %s failed: %s %s", downstream, code.name, details)
    return details if code in _ABOUT_THE_REQUEST and details else code.name

"""Calling other services: what a service's outgoing calls go through.

A call going out, in order:
  Channels      one MeshChannel per upstream, made once (_channels): TLS, keepalive, retries of idempotent
                methods; each call made directly while its ID token is at hand, else through interceptors
                that wait for the mint
  ClientChain   on each call, in one place (_chain): the timeout capped by the incoming deadline
                (mesh.deadlines), the ID token for the callee's audience (IdTokens, _tokens), the CLIENT span
                and trace headers (_spans), the duration (mesh.metrics)
  reported      what the caller is told when that call fails (_downstream)

The modules are private: what is used from outside is named here.
"""

from mesh.client._chain import ClientChain
from mesh.client._channels import MAX_MESSAGE_BYTES, Channels, retry_service_config
from mesh.client._downstream import reported
from mesh.client._tokens import IdTokens, NoCredentialsError, audience_for

__all__ = [
    "MAX_MESSAGE_BYTES",
    "Channels",
    "ClientChain",
    "IdTokens",
    "NoCredentialsError",
    "audience_for",
    "reported",
    "retry_service_config",
]

"""What every service shares: serving, calling other services, identity, tracing, metrics, logs, settings.

A service imports only this face (`from mesh import main, Service, Runtime, ...`); its tests add mesh.testing.

A call coming in:
  serving        the process: settings, logs, tracing and metrics, the server on $PORT, the drain on SIGTERM,
                 N workers on one port (workers)
  server/        the serving model (grpc.aio, or grpc.server's threads: one object, ServingModel), then the
                 chain around each method: the order of a call's steps is written once, in ServerChain.wrap
                 (deadlines, identity, the span, metrics, the parse check), then the servicer's method

A call going out:
  client/        one channel per upstream (Channels), then, on each call, the client chain (ClientChain):
                 the timeout capped by the incoming deadline, the ID token for the callee's audience, the
                 CLIENT span and trace headers, the duration; `reported`: what the caller is told when it fails
"""

from mesh.client import Channels, IdTokens, NoCredentialsError, audience_for, reported
from mesh.server import AsyncioModel, Caller, Threads, ThreadsModel, current_caller, never_waits
from mesh.serving import RunningServer, Runtime, Service, ServiceFactory, main
from mesh.settings import ConfigError, ConnectTo, Env, Upstream, text

__all__ = [
    "AsyncioModel",
    "Caller",
    "Channels",
    "ConfigError",
    "ConnectTo",
    "Env",
    "IdTokens",
    "NoCredentialsError",
    "RunningServer",
    "Runtime",
    "Service",
    "ServiceFactory",
    "Threads",
    "ThreadsModel",
    "Upstream",
    "audience_for",
    "current_caller",
    "main",
    "never_waits",
    "reported",
    "text",
]

"""What every service shares: serving, calling other services, identity, tracing, metrics, logs, settings.

A service imports only this face (`from mesh import main, Service, Runtime, ...`); its tests add mesh.testing.

A call coming in:
  serving        the process: settings, logs, tracing and metrics, the server on $PORT, the drain on SIGTERM,
                 N workers on one port (workers)
  server/        the serving model (grpc.aio, or grpc.server's threads: one object, ServingModel), then the
                 chain around each method: the order of a call's steps is written once, in ServerChain.wrap
                 (deadlines, identity, the span, metrics, the parse check), then the servicer's method

A call going out:
  channels       one channel per downstream, made once: TLS, keepalive, retries of idempotent methods
  client_chain   on each call: the timeout capped by the incoming deadline (deadlines), the ID token for the
                 callee's audience (tokens), the CLIENT span and trace headers (client_spans), the duration
                 (metrics)
  downstream     what the caller is told when that call fails
"""

from mesh.downstream import reported
from mesh.server import AsyncioModel, Caller, Threads, ThreadsModel, current_caller, never_waits
from mesh.serving import RunningServer, Runtime, Service, ServiceFactory, main
from mesh.settings import ConfigError, Env, Upstream, text

__all__ = [
    "AsyncioModel",
    "Caller",
    "ConfigError",
    "Env",
    "RunningServer",
    "Runtime",
    "Service",
    "ServiceFactory",
    "Threads",
    "ThreadsModel",
    "Upstream",
    "current_caller",
    "main",
    "never_waits",
    "reported",
    "text",
]

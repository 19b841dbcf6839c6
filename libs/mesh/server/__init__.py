"""The server half of the mesh: a call coming in, from the serving model to the servicer's method.

_model      the serving model, one object (ServingModel): the server, its health servicer, the handler
            wrappers, start, drain, stop; two implementations: _asyncio (grpc.aio) and _threads
            (grpc.server's threads)
_chain      one wrapper per method, made when a service is added: the order of a call's steps
_calls      what a call is to both models: handler kinds, enter/after, refusals, the tolerant parse
admission   _identity (ID tokens, with _issuer_keys), _exempt_gate (health Check takes none), _drain
            (the calls of a shutdown), _quick_pool (the threads model's never_waits pool)
_spans      the SERVER span
"""

from mesh.server._asyncio import AsyncioModel
from mesh.server._chain import ServerChain
from mesh.server._drain import Drain, Drained
from mesh.server._exempt_gate import EXEMPT_CONCURRENCY
from mesh.server._identity import EXEMPT_METHODS, AuthError, Caller, TokenVerifier, current_caller
from mesh.server._model import ServingModel
from mesh.server._threads import Threads, ThreadsModel, never_waits

__all__ = [
    "EXEMPT_CONCURRENCY",
    "EXEMPT_METHODS",
    "AsyncioModel",
    "AuthError",
    "Caller",
    "Drain",
    "Drained",
    "ServerChain",
    "ServingModel",
    "Threads",
    "ThreadsModel",
    "TokenVerifier",
    "current_caller",
    "never_waits",
]

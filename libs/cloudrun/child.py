"""`python -m cloudrun.child PARENT_PID MODULE`: runs a service module as __main__, dying with its parent (the
local Cloud Run or the local mesh that started it), so nothing outlives it even if it is killed outright.

PR_SET_PDEATHSIG is set here, after exec, not in a preexec_fn: Python code between fork and exec in a parent
that runs gRPC threads lets gRPC's fork handlers restart its pollers in the child, which then abort
("epoll_wait error: Bad file descriptor") when the child's descriptors are closed. Without a preexec_fn,
subprocess uses vfork and nothing runs between fork and exec.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Mapping

from mesh.workers import die_with_parent

# What a parent's own settings would wrongly give a service: each service gets its own, explicitly.
NOT_INHERITED = ("OTEL_", "GCE_METADATA", "GRPC_PING", "AUTH_", "TLS_", "K_", "MESH_")


def python_module(module: str) -> list[str]:
    """argv that runs `module` with this interpreter and this process's import path, tied to this process."""
    return [sys.executable, "-m", __name__, str(os.getpid()), module]


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without the services' settings, this import path, then `extra`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(NOT_INHERITED) and k != "PORT"}
    # Absolute, so that what runs with it elsewhere (the mesh's CLI script, in another shell) imports the same.
    base["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in sys.path if p)
    return {**base, **extra}


def main(argv: list[str]) -> None:
    parent, module = int(argv[1]), argv[2]
    if not die_with_parent(parent):  # the parent died before the signal was armed
        sys.exit(f"{module}: its parent (pid {parent}) is gone; not starting")
    sys.argv = [module, *argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv)

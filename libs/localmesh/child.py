"""`python -m localmesh.child LAUNCHER_PID MODULE`: runs a service module as __main__, dying with the launcher.

PR_SET_PDEATHSIG is set here, after exec, not in a preexec_fn: Python code between fork and exec in a launcher
that runs gRPC threads lets gRPC's fork handlers restart its pollers in the child, which then abort
("epoll_wait error: Bad file descriptor") when the child's descriptors are closed. Without a preexec_fn,
subprocess uses vfork and nothing runs between fork and exec.
"""

from __future__ import annotations

import runpy
import sys

from mesh.workers import die_with_parent


def main(argv: list[str]) -> None:
    launcher, module = int(argv[1]), argv[2]
    if not die_with_parent(launcher):  # the launcher died before the signal was armed
        sys.exit(f"{module}: the mesh launcher (pid {launcher}) is gone; not starting")
    sys.argv = [module, *argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv)

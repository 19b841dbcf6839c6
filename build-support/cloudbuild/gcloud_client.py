"""The `gcloud` program the steps run: hands its command line to the runner's Cloud Run stand-in
(cloudbuild.gcloud) over loopback and prints its answer. Standard library only: a step runs gcloud many
times, and each run pays this module's imports, not the stand-in's."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections.abc import Sequence

URL_VARIABLE = "CLOUDRUN_STANDIN_URL"


def command_name(argv: Sequence[str]) -> str:
    words = [a for a in argv[:3] if not a.startswith("-")]
    return "gcloud." + ".".join(words)


def main(argv: Sequence[str]) -> int:
    url = os.environ.get(URL_VARIABLE)
    if not url:
        print(
            f"ERROR: ({command_name(argv)}) {URL_VARIABLE} is not set: run this through the local runner",
            file=sys.stderr,
        )
        return 1
    request = json.dumps({"argv": list(argv), "cwd": os.getcwd()}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=request), timeout=300) as reply:
        result = json.loads(reply.read())
    sys.stdout.write(result["stdout"])
    sys.stderr.write(result["stderr"])
    return int(result["code"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

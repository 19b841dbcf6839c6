#!/usr/bin/env bash
# build_image.sh SERVICE TAG [CONTEXT]: build one service image from services/Dockerfile, the way every
# builder does it (Cloud Build's images step, tests/images, the benchmarks; Pants' services/SERVICE:image runs
# the same file with the same SERVICE build arg). CONTEXT holds services.SERVICE/SERVICE.pex (default: dist,
# where `./pants package services/SERVICE:SERVICE` puts it).
set -euo pipefail
if [[ $# -lt 2 || $# -gt 3 ]]; then
  echo "usage: $0 SERVICE TAG [CONTEXT]" >&2
  exit 2
fi
service="$1" tag="$2" context="${3:-dist}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
exec docker build --file="$root/services/Dockerfile" --build-arg="SERVICE=$service" --tag="$tag" "$context"

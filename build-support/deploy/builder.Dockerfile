# The image the Cloud Build steps run ./pants and the deploy programs in: CPython 3.9 (Pants 2.17 itself),
# CPython 3.11 (the services and the deploy programs), git (--changed-since), Debian's Node.js and npm (the
# contract check installs buf from npm with build-support/contracts' lockfile) and PyYAML, pinned as in
# python-default.lock (deploy/invokers.py and deploy/render.py read services/invokers.yaml), installed from
# the hashed lock builder-requirements.txt: pip refuses any file whose sha256 the lock does not list.
# The base images are named by tag: a team pins them by digest where it can verify one (docs/security.md, "The build").
# Built by the first step of cloudbuild.yaml; ./pants bootstraps itself on top, as on a developer machine.
FROM python:3.9-slim-bookworm AS python39

FROM python:3.11-slim-bookworm
# Both official images install CPython under /usr/local with a shared libpython; the 3.9 files do not
# overlap with 3.11's, so copying them gives ./pants the python3.9 it looks for on PATH.
COPY --from=python39 /usr/local/bin/python3.9 /usr/local/bin/python3.9
COPY --from=python39 /usr/local/lib/python3.9 /usr/local/lib/python3.9
COPY --from=python39 /usr/local/lib/libpython3.9.so.1.0 /usr/local/lib/libpython3.9.so.1.0
COPY builder-requirements.txt /tmp/builder-requirements.txt
# git, nodejs and npm are left unpinned on purpose (DL3008): bookworm's archive drops superseded versions,
# and a pin would break the builder on the next Debian security update.
# hadolint ignore=DL3008
RUN ldconfig \
    && python3.9 -c "import ssl, venv" \
    && apt-get update \
    && apt-get install -y --no-install-recommends git nodejs npm \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir --require-hashes --only-binary=:all: -r /tmp/builder-requirements.txt \
    && rm /tmp/builder-requirements.txt

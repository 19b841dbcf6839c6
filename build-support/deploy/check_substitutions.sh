#!/usr/bin/env bash
# check_substitutions.sh NAME...: each named Cloud Build substitution, which the step received through its
# `env:` (NAME=${NAME}), must match its pattern here, or the step stops before it uses any of them.
#
# cloudbuild.yaml never pastes a substitution into a script's text: a value such as `HEAD~1$(touch X)` would
# run as the build's service account. As environment variables the values are data, and these patterns keep
# them to the shapes the steps expect (a value cannot start an option, hold a space, a quote or a `$`).
# Plain bash, so every step image can run it (the docker and cloud-sdk builders have no PyYAML).
set -euo pipefail

pattern() {
  case "$1" in
    PROJECT_ID) echo '[a-z][a-z0-9-]{4,28}[a-z0-9]' ;;
    PROJECT_NUMBER) echo '[0-9]{1,20}' ;;
    SHORT_SHA) echo '[0-9a-f]{7,40}' ;;
    _REGION) echo '[a-z]+-[a-z]+[0-9]+' ;;
    _REPOSITORY | _NETWORK | _SUBNET) echo '[a-z]([a-z0-9-]{0,61}[a-z0-9])?' ;;
    # host[:port]/path, as render.py takes it (_REGISTRY is made of _REGION, PROJECT_ID and _REPOSITORY).
    _REGISTRY) echo '[a-z0-9][a-z0-9.-]*(:[0-9]+)?(/[a-z0-9._-]+)+' ;;
    _SERVICES) echo '(all|[a-z][a-z0-9-]*(,[a-z][a-z0-9-]*)*)?' ;;
    # A commit, branch or tag, with ~N / ^N: git reads it as a revision, never as an option.
    _BASE_REF) echo '[A-Za-z0-9][A-Za-z0-9._/-]{0,199}([~^][0-9]{0,3})*' ;;
    _VERIFY) echo '(changed|none)' ;;
    _VPC) echo '(direct|none)' ;;
    _TRAFFIC_STEPS) echo '[0-9]{1,3}(,[0-9]{1,3}){0,9}' ;;
    *) return 1 ;;
  esac
}

status=0
for name in "$@"; do
  if ! shape="$(pattern "$name")"; then
    echo "check_substitutions: no pattern for substitution $name: add one to $0" >&2
    status=2
  elif [[ -z "${!name+set}" ]]; then
    echo "check_substitutions: substitution $name is not in this step's env: add $name=\${$name}" >&2
    status=2
  elif [[ ! "${!name}" =~ ^${shape}$ ]]; then
    printf 'ERROR: substitution %s=%q does not match the pattern ^%s$\n' "$name" "${!name}" "$shape" >&2
    status=1
  fi
done
exit "$status"

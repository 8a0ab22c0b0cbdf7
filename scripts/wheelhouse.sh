#!/usr/bin/env bash
# Prepare the wheelhouse the training image installs from: `docker build` has no network here
# (TLS interception), like an air-gapped site, so every wheel is fetched on the host beforehand.
#
#   scripts/wheelhouse.sh [--lock] [OUT_DIR]
#
#   --lock   re-resolve docker/requirements.lock (with hashes) from training/pyproject.toml and
#            docker/requirements-build.in first; needs the package index. Without it the lock is
#            only created when missing.
#   OUT_DIR  default: wheelhouse/ (git-ignored); it ends up holding exactly the lock's wheels.
#
# Wheels are verified against the lock's hashes (--require-hashes). torch comes from the local
# find-links folder (CPU wheel, torch==2.13.0+cpu); nothing newer is ever resolved. A rerun with
# an unchanged lock is offline and takes seconds: the previous wheelhouse is the first source.
set -euo pipefail
cd "$(dirname "$0")/.."

REPO=$PWD
PY=${PYTHON:-$REPO/.venv/bin/python}
UV=${UV:-$REPO/.venv/bin/uv}
LOCK=docker/requirements.lock
FIND_LINKS=${FIND_LINKS:-$("$PY" -m pip config get global.find-links 2>/dev/null || echo /opt/wheels)}
# The image's interpreter and platform, not the host's: bookworm (glibc 2.36), CPython 3.11, x86_64.
PY_VERSION=${WHEELHOUSE_PYTHON_VERSION:-3.11}
GLIBC_MINOR=${WHEELHOUSE_GLIBC_MINOR:-36}
# pip does not expand an explicit manylinux_2_X tag to the older ones it implies: list them all.
platforms=()
for ((minor = GLIBC_MINOR; minor >= 5; minor--)); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64)

relock=0
if [[ "${1:-}" == "--lock" ]]; then relock=1; shift; fi
OUT=$(realpath -m "${1:-wheelhouse}")

if ((relock)) || [[ ! -s $LOCK ]]; then
  echo "wheelhouse: resolving $LOCK"
  "$UV" pip compile --quiet --generate-hashes --find-links "$FIND_LINKS" \
    --python-version "$PY_VERSION" --python-platform "x86_64-manylinux_2_28" \
    --custom-compile-command "scripts/wheelhouse.sh --lock" \
    --output-file "$LOCK" training/pyproject.toml docker/requirements-build.in
fi
if ! grep -q '^torch==2\.13\.0' "$LOCK"; then
  echo "wheelhouse: $LOCK must pin torch==2.13.0 (found: $(grep '^torch==' "$LOCK" || echo none))" >&2
  exit 1
fi

# Download into a fresh folder and swap it in, so the result holds no stale wheels and an
# interrupted run leaves the previous wheelhouse intact.
NEW=$(mktemp -d "${OUT%/}.new.XXXXXX")
trap 'rm -rf "$NEW"' EXIT
download() {
  "$PY" -m pip download --quiet --disable-pip-version-check --no-deps --require-hashes \
    --only-binary=:all: "${platforms[@]}" --python-version "$PY_VERSION" \
    --implementation cp --abi "cp${PY_VERSION/./}" \
    -r "$LOCK" -d "$NEW" "$@"
}
offline=(--no-index --find-links "$FIND_LINKS")
[[ -d $OUT ]] && offline+=(--find-links "$OUT")
if download "${offline[@]}" 2>/dev/null; then
  echo "wheelhouse: all wheels found locally"
else
  echo "wheelhouse: fetching missing wheels from the package index"
  online=(--find-links "$FIND_LINKS")
  [[ -d $OUT ]] && online+=(--find-links "$OUT")
  download "${online[@]}"
fi
rm -rf "$OUT"
mv "$NEW" "$OUT"
trap - EXIT
chmod 755 "$OUT"
echo "wheelhouse: $(find "$OUT" -name '*.whl' | wc -l) wheels, $(du -sh "$OUT" | cut -f1) in $OUT"

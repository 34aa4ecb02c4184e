#!/usr/bin/env bash
# Builds the dinoforge container image (Containerfile) with podman, buildah or docker, whichever is
# installed, and prints its tag, size and build time. README "Container image".
#
#   scripts/build_image.sh [--flavor cpu|cuda] [--tag NAME] [--base auto|debian|IMAGE] [--online]
#                          [--wheelhouse DIR] [--engine podman|buildah|docker] [--push]
#
# --flavor   cpu (default, tagged VERSION-cpu) or cuda (tagged VERSION: the released default, which
#            also runs without a GPU); VERSION is the package version in pyproject.toml.
# --base     auto (default): the official python:3.11-slim-bookworm image when the engine can pull
#            it, else `debian`; debian: a base built here from Debian packages with mmdebstrap
#            (localhost/dinoforge-base:bookworm, reused once built); or any image with python3 and venv.
# --online   let the build download its Python packages from the indexes. By default they are
#            downloaded on this host into a wheelhouse (--wheelhouse, default
#            ~/.cache/dinoforge/wheelhouse-FLAVOR) and the build runs with no network.
# --push     push the tag after the build (the engine's registry configuration and login apply).
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), TORCH_CPU_INDEX (default
# https://download.pytorch.org/whl/cpu), CONTAINERS_CONF (default here: scripts/containers.conf
# when runc is installed: runc with explicit ulimits, which works where crun does not).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
flavor=cpu tag="" base=auto online=0 push=0 engine="" wheelhouse=""
while [ $# -gt 0 ]; do
  case "$1" in
    --flavor) flavor=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --online) online=1; shift ;;
    --wheelhouse) wheelhouse=$2; shift 2 ;;
    --engine) engine=$2; shift 2 ;;
    --push) push=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build_image.sh: unknown argument '$1' (--help lists them)" >&2; exit 2 ;;
  esac
done
case "$flavor" in cpu|cuda) ;; *) echo "build_image.sh: --flavor must be cpu or cuda, got '$flavor'" >&2; exit 2 ;; esac
say() { printf 'build_image: %s\n' "$*" >&2; }
started=$(date +%s)

if [ -z "$engine" ]; then
  for candidate in podman buildah docker; do
    if command -v "$candidate" >/dev/null; then engine=$candidate; break; fi
  done
fi
[ -n "$engine" ] || { echo "build_image.sh: needs podman, buildah or docker on PATH" >&2; exit 1; }
if [ "$engine" != docker ] && [ -z "${CONTAINERS_CONF:-}" ] && command -v runc >/dev/null; then
  export CONTAINERS_CONF="$root/scripts/containers.conf"
  say "CONTAINERS_CONF=$CONTAINERS_CONF (runc, explicit ulimits)"
fi

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml" | head -n1)
[ -n "$version" ] || { echo "build_image.sh: no version in pyproject.toml" >&2; exit 1; }
commit=unknown
if git -C "$root" rev-parse HEAD >/dev/null 2>&1; then
  commit=$(git -C "$root" rev-parse HEAD)
  [ -z "$(git -C "$root" status --porcelain --untracked-files=no)" ] || commit="$commit-dirty"
fi
if [ -z "$tag" ]; then
  tag="ghcr.io/dinoforge/dinoforge:$version"
  [ "$flavor" = cuda ] || tag="$tag-$flavor"
fi

image_exists() {
  case "$engine" in
    docker) docker image inspect "$1" >/dev/null 2>&1 ;;
    *) "$engine" inspect --type image "$1" >/dev/null 2>&1 ;;
  esac
}

debian_base() {
  local name=localhost/dinoforge-base:bookworm
  if ! image_exists "$name"; then
    command -v mmdebstrap >/dev/null || { echo "build_image.sh: --base debian needs mmdebstrap (apt-get install mmdebstrap)" >&2; exit 1; }
    local mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
    say "building $name from $mirror with mmdebstrap (a few minutes, once)"
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates bookworm - "$mirror" |
      "$engine" import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/bash"]' - "$name" >/dev/null
  fi
  echo "$name"
}

case "$base" in
  auto)
    base=docker.io/library/python:3.11-slim-bookworm
    if ! image_exists "$base" && ! timeout 120 "$engine" pull -q "$base" >/dev/null 2>&1; then
      say "cannot pull $base: using a Debian base built from packages"
      base=$(debian_base)
    fi ;;
  debian) base=$(debian_base) ;;
esac
say "engine $engine, flavor $flavor, base $base, tag $tag, commit $commit"

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
# The build context: the files git knows (tracked, or untracked and not ignored), else everything
# but the usual build debris.
if git -C "$root" rev-parse HEAD >/dev/null 2>&1; then
  (cd "$root" && git ls-files -z --cached --others --exclude-standard) |
    while IFS= read -r -d '' file; do
      [ -e "$root/$file" ] || continue  # deleted in the working tree
      mkdir -p "$context/$(dirname "$file")"
      cp -p "$root/$file" "$context/$file"
    done
else
  tar -C "$root" --exclude=.git --exclude=.venv --exclude=runs --exclude='*.egg-info' --exclude=__pycache__ -cf - . |
    tar -C "$context" -xf -
fi

build_args=(--build-arg "BASE_IMAGE=$base" --build-arg "FLAVOR=$flavor" --build-arg "VERSION=$version"
            --build-arg "GIT_COMMIT=$commit" --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
[ -z "${TORCH_CPU_INDEX:-}" ] || build_args+=(--build-arg "TORCH_CPU_INDEX=$TORCH_CPU_INDEX")
if [ "$online" = 0 ]; then
  wheelhouse=${wheelhouse:-${XDG_CACHE_HOME:-$HOME/.cache}/dinoforge/wheelhouse-$flavor}
  mkdir -p "$wheelhouse"
  # What the image's Python accepts, asked of the base itself: its version and the manylinux tags
  # of its glibc and machine (pip matches --platform tags exactly, so every older one is listed).
  case "$engine" in
    buildah) probe_ctr=$(buildah from --pull=never "$base"); probe=(buildah run "$probe_ctr" --) ;;
    *) probe=("$engine" run --rm --network none "$base") ;;
  esac
  read -r py_version platforms < <("${probe[@]}" python3 -c '
import platform, sys
major, minor = map(int, platform.libc_ver()[1].split(".")[:2])
arch = platform.machine()
tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
tags += [f"{legacy}_{arch}" for legacy in ("manylinux2014", "manylinux2010", "manylinux1")]
print(f"{sys.version_info[0]}.{sys.version_info[1]}", ",".join(tags))')
  [ -z "${probe_ctr:-}" ] || buildah rm "$probe_ctr" >/dev/null
  mapfile -t requirements < <(python3 "$root/scripts/requirements.py" "$root/pyproject.toml" image)
  pip_args=(download --quiet --disable-pip-version-check --dest "$wheelhouse" --only-binary=:all:
            --python-version "$py_version" --implementation cp)
  IFS=, read -r -a platform_tags <<< "$platforms"
  for tag_name in "${platform_tags[@]}"; do pip_args+=(--platform "$tag_name"); done
  if [ "$flavor" = cuda ]; then
    pip_args=(--isolated "${pip_args[@]}" --index-url https://pypi.org/simple)  # no local CPU wheels of torch
  else
    torch_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
    if python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/torch/', timeout=10)" "$torch_index" 2>/dev/null; then
      pip_args+=(--extra-index-url "$torch_index")
    else
      say "$torch_index is not reachable: torch comes from pip's own configuration"
    fi
  fi
  # A complete download for these requirements and this platform is reused (pip would spend
  # minutes asking the indexes again).
  stamp=$(printf '%s\n' "${pip_args[@]}" "${requirements[@]}" | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$wheelhouse/.complete" 2>/dev/null)" = "$stamp" ]; then
    say "reusing the wheels in $wheelhouse"
  else
    say "downloading wheels into $wheelhouse (Python $py_version, ${platform_tags[0]})"
    rm -f "$wheelhouse/.complete"
    python3 -m pip "${pip_args[@]}" "${requirements[@]}" setuptools wheel
    echo "$stamp" > "$wheelhouse/.complete"
  fi
  if [ "$flavor" = cpu ] && ! ls "$wheelhouse" | grep -q '^torch-.*+cpu-'; then
    echo "build_image.sh: no CPU build of torch in $wheelhouse (set TORCH_CPU_INDEX, or use --flavor cuda)" >&2
    exit 1
  fi
  mkdir -p "$context/scripts/wheelhouse"
  cp -l "$wheelhouse"/*.whl "$context/scripts/wheelhouse/" 2>/dev/null || cp "$wheelhouse"/*.whl "$context/scripts/wheelhouse/"
  network=(--network none)
else
  network=()
fi

say "building (the context holds $(du -sh "$context" | cut -f1))"
case "$engine" in  # the build's log goes to stderr: stdout is the tag alone
  buildah) buildah bud --layers "${network[@]}" -f "$context/Containerfile" "${build_args[@]}" -t "$tag" "$context" >&2 ;;
  *) "$engine" build "${network[@]}" -f "$context/Containerfile" "${build_args[@]}" -t "$tag" "$context" >&2 ;;
esac

size=$("$engine" image inspect --format '{{.Size}}' "$tag")
say "built $tag: $((size / 1000000)) MB in $(( $(date +%s) - started )) s"
if [ "$push" = 1 ]; then
  "$engine" push "$tag" >&2
fi
echo "$tag"

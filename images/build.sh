#!/usr/bin/env bash
# Builds the release images a provider publishes:
#   images/build.sh [agent|operator]...      (default: both)
# cargo build --release, images/stage.sh, then images/NAME/Containerfile with
# the first of buildah, podman, docker found. Tags: caravan/NAME:VERSION (the
# workspace version, which is the chart's appVersion) unless IMAGE_PREFIX /
# IMAGE_TAG say otherwise, e.g. IMAGE_PREFIX=registry.example/caravan.
# Push with your tool afterwards (buildah push / podman push / docker push).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
names=("$@")
((${#names[@]})) || names=(agent operator)
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$ROOT/charts/caravan/Chart.yaml")
tag="${IMAGE_TAG:-$version}"
prefix="${IMAGE_PREFIX:-caravan}"
tool=""
for t in buildah podman docker; do command -v "$t" >/dev/null && { tool=$t; break; }; done
[[ -n "$tool" ]] || { echo "need buildah, podman or docker" >&2; exit 1; }
(cd "$ROOT" && cargo build --release --locked -p caravan-agent -p caravan-operator --bins)
for n in "${names[@]}"; do
  ctx=$(mktemp -d)
  bash "$ROOT/images/stage.sh" "$n" "$ROOT/target/release/caravan-$n" "$ctx"
  "$tool" build -f "$ROOT/images/$n/Containerfile" --build-arg "VERSION=$version" -t "$prefix/$n:$tag" "$ctx"
  rm -rf "$ctx"
  echo "built $prefix/$n:$tag"
done

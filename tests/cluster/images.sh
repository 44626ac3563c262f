#!/usr/bin/env bash
# Builds the project's container images with buildah (vfs storage, chroot isolation,
# `from scratch` + the binary + the shared libraries ldd lists + the loader) and
# imports them into the local cluster's containerd (namespace k8s.io):
#   pause     docker.io/caravan/pause:3.2      (Kubernetes tree's pause.c; up.sh needs it)
#   agent     docker.io/caravan/agent:dev      from target/release/caravan-agent
#   operator  docker.io/caravan/operator:dev   from target/release/caravan-operator
# Agent and operator are built from images/NAME/Containerfile (the recipe a
# provider publishes with) over a context made by images/stage.sh, and are also
# tagged with the chart's appVersion (the chart's default tag).
# Usage: images.sh [pause|agent|operator|all]...   (default: all)
# Overrides: CARAVAN_AGENT_BIN / CARAVAN_OPERATOR_BIN = path to a binary, or `standin`
#   (a busybox stand-in with the same `run --config FILE` + :9400 /readyz interface).
#   CARAVAN_ALLOW_STANDIN=1 uses the stand-in when a release binary is missing and
#   cannot be built. CARAVAN_NO_CARGO_BUILD=1 never runs cargo.
# Manifests use these images with imagePullPolicy: Never.
set -euo pipefail
# shellcheck source=tests/cluster/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

IMAGE_CACHE="$CACHE_ROOT/images"
export BUILDAH_ISOLATION=chroot
BUILDAH=(buildah --storage-driver vfs --root "$CACHE_ROOT/buildah/storage"
  --runroot "/run/caravan-buildah")
CTR=(ctr --address "$CONTAINERD_SOCK" --namespace k8s.io)
IMAGE_FORMAT_VERSION=2   # bump when the image layout below changes
APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$REPO_ROOT/charts/caravan/Chart.yaml")
cargo_built=0

targets=("$@")
((${#targets[@]})) || targets=(all)

stage_common() { # ROOTFS — passwd/group for the non-root user, CA bundle, /tmp
  local rootfs="$1"
  mkdir -p "$rootfs/etc" "$rootfs/tmp"
  chmod 1777 "$rootfs/tmp"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
  if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  fi
}

# resolve_binary NAME — prints the binary path or `standin`.
resolve_binary() {
  local name="$1" var path
  var="CARAVAN_$(tr '[:lower:]' '[:upper:]' <<<"$name")_BIN"
  path="${!var:-}"
  if [[ -n "$path" ]]; then echo "$path"; return 0; fi
  path="$REPO_ROOT/target/release/caravan-$name"
  # Always through cargo (a no-op when fresh): a binary left over from an
  # older tree must never be packed as if it were this one.
  if [[ "${CARAVAN_NO_CARGO_BUILD:-0}" != 1 && $cargo_built == 0 ]] &&
    [[ -f "$REPO_ROOT/Cargo.toml" ]] && command -v cargo >/dev/null; then
    log "cargo build --release --bins (for $path)"
    cargo_built=1
    (cd "$REPO_ROOT" && timeout 3600 cargo build --release --bins) >&2 ||
      log "cargo build --release --bins failed"
  fi
  if [[ -x "$path" ]]; then echo "$path"; return 0; fi
  if [[ "${CARAVAN_ALLOW_STANDIN:-0}" == 1 ]]; then
    log "WARNING: $path does not exist: building the busybox STAND-IN for caravan-$name"
    echo standin
    return 0
  fi
  die "$path does not exist and could not be built; run 'cargo build --release --bins', set CARAVAN_${name^^}_BIN, or CARAVAN_ALLOW_STANDIN=1 for the busybox stand-in"
}

# build_archive NAME REF ROOTFS ENTRYPOINT_JSON [CONTAINERFILE] — caches an OCI
# archive keyed by content. With CONTAINERFILE, ROOTFS's parent is the build context.
build_archive() {
  local name="$1" ref="$2" rootfs="$3" entrypoint="$4" containerfile="${5:-}" key archive ctr
  key=$( (cd "$rootfs" && find . -printf '%p %m %l\n' | LC_ALL=C sort && find . -type f -print0 |
    LC_ALL=C sort -z | xargs -0 sha256sum; echo "$ref $entrypoint v$IMAGE_FORMAT_VERSION $APP_VERSION";
    [[ -z "$containerfile" ]] || cat "$containerfile") |
    sha256sum | cut -c1-16)
  archive="$IMAGE_CACHE/$name-$key.oci.tar"
  if [[ -f "$archive" ]]; then
    log "$ref: cached $archive"
  elif [[ -n "$containerfile" ]]; then
    log "$ref: buildah build -f ${containerfile#"$REPO_ROOT"/}"
    mkdir -p "$IMAGE_CACHE"
    "${BUILDAH[@]}" build --quiet --layers=false -f "$containerfile" --build-arg "VERSION=$APP_VERSION" \
      -t "$ref" "$(dirname "$rootfs")" >/dev/null
    rm -f "$archive.tmp"
    "${BUILDAH[@]}" push --quiet "$ref" "oci-archive:$archive.tmp:$ref"
    "${BUILDAH[@]}" rmi --force "$ref" >/dev/null 2>&1 || true
    mv "$archive.tmp" "$archive"
  else
    log "$ref: building with buildah"
    mkdir -p "$IMAGE_CACHE"
    ctr=$("${BUILDAH[@]}" from --quiet scratch)
    "${BUILDAH[@]}" copy --quiet "$ctr" "$rootfs" / >/dev/null
    "${BUILDAH[@]}" config --entrypoint "$entrypoint" --cmd '' --user 65532:65532 \
      --env PATH=/usr/local/bin:/bin --workingdir / \
      --label "org.opencontainers.image.title=$name" \
      --label "org.opencontainers.image.source=caravan" "$ctr"
    "${BUILDAH[@]}" commit --quiet --rm "$ctr" "$ref" >/dev/null
    rm -f "$archive.tmp"
    "${BUILDAH[@]}" push --quiet "$ref" "oci-archive:$archive.tmp:$ref"
    "${BUILDAH[@]}" rmi --force "$ref" >/dev/null 2>&1 || true
    mv "$archive.tmp" "$archive"
  fi
  import_archive "$ref" "$archive"
}

import_archive() { # REF ARCHIVE
  local ref="$1" archive="$2"
  if use_existing_cluster; then
    log "$ref: archive $archive (existing cluster: load it yourself, e.g. 'kind load image-archive' or 'k3d image import')"
    return 0
  fi
  "${CTR[@]}" version >/dev/null 2>&1 || die "containerd at $CONTAINERD_SOCK is not running: run tests/cluster/up.sh first"
  "${CTR[@]}" images import --base-name "${ref%:*}" "$archive" >/dev/null
  "${CTR[@]}" images ls -q | grep -x "$ref" >/dev/null || die "$ref not found in containerd after importing $archive"
  if [[ "$ref" == */caravan/agent:dev || "$ref" == */caravan/operator:dev ]]; then
    # The chart's default tag is its appVersion: the same image under that tag.
    "${CTR[@]}" images rm "${ref%:*}:$APP_VERSION" >/dev/null 2>&1 || true
    "${CTR[@]}" images tag "$ref" "${ref%:*}:$APP_VERSION" >/dev/null
  fi
  log "$ref: imported into containerd (k8s.io)"
}

image_pause() {
  local rootfs
  [[ -x "$K8S_BIN/pause" ]] || "$CLUSTER_DIR/build-kubernetes.sh"
  rootfs=$(mktemp -d)
  install -D -m 0755 "$K8S_BIN/pause" "$rootfs/pause"
  build_archive pause "docker.io/$PAUSE_IMAGE" "$rootfs" '["/pause"]'
  rm -rf "$rootfs"
}

image_component() { # agent|operator
  local name="$1" bin ctx rootfs
  bin=$(resolve_binary "$name")
  ctx=$(mktemp -d)
  rootfs="$ctx/rootfs"
  if [[ "$bin" == standin ]]; then
    mkdir -p "$rootfs"
    stage_common "$rootfs"
    [[ -x /bin/busybox ]] || apt_install busybox-static
    install -D -m 0755 /bin/busybox "$rootfs/bin/busybox"
    ldd /bin/busybox >/dev/null 2>&1 && die "/bin/busybox is not static (install busybox-static)"
    ln -s busybox "$rootfs/bin/sh"
    install -D -m 0755 "$CLUSTER_DIR/standin/caravan-standin" "$rootfs/usr/local/bin/caravan-$name"
    mkdir -p "$rootfs/standin/www"
    echo ok >"$rootfs/standin/www/livez"
    echo ok >"$rootfs/standin/www/readyz"
    printf '# HELP caravan_standin 1 when this is the busybox stand-in\n# TYPE caravan_standin gauge\ncaravan_standin 1\n' \
      >"$rootfs/standin/www/metrics"
  else
    bash "$REPO_ROOT/images/stage.sh" "$name" "$bin" "$ctx"
  fi
  build_archive "$name" "docker.io/caravan/$name:dev" "$rootfs" "[\"/usr/local/bin/caravan-$name\"]" \
    "$REPO_ROOT/images/$name/Containerfile"
  rm -rf "$ctx"
}

need_root
apt_install buildah
for t in "${targets[@]}"; do
  case "$t" in
    pause) image_pause ;;
    agent | operator) image_component "$t" ;;
    all) image_pause; image_component agent; image_component operator ;;
    *) die "unknown image '$t' (pause|agent|operator|all)" ;;
  esac
done

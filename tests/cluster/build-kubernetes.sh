#!/usr/bin/env bash
# Builds the Kubernetes server binaries (and the pause binary) from Debian's
# `kubernetes` source package, once, into a cache outside the checkout:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/caravan/kubernetes/<version>/bin
# Called by up.sh; safe to run on its own (e.g. in the background, early).
set -euo pipefail
# shellcheck source=tests/cluster/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy pause)

have_binaries() {
  local b
  [[ -f "$K8S_BIN/.complete" ]] || return 1
  for b in "${BINARIES[@]}"; do [[ -x "$K8S_BIN/$b" ]] || return 1; done
}

if have_binaries; then
  log "Kubernetes $K8S_VERSION binaries cached in $K8S_BIN"
  exit 0
fi
need_root

mkdir -p "$K8S_CACHE"
exec 9>"$K8S_CACHE/.build.lock"
if ! flock -w 3600 9; then die "another build holds $K8S_CACHE/.build.lock for more than an hour"; fi
if have_binaries; then exit 0; fi   # built by whoever held the lock

start=$(date +%s)
apt_install golang-go rsync make gcc libc6-dev golang-github-modern-go-reflect2-dev ca-certificates

# apt-get source needs a deb-src entry: copy the machine's own Debian entry.
ensure_deb_src() {
  local f out=/etc/apt/sources.list.d/caravan-deb-src.sources
  if grep -rqsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 0
  fi
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] || continue
    if grep -q 'debian-archive-keyring' "$f"; then
      log "adding deb-src entries copied from $f"
      sed -E 's/^Types:.*/Types: deb-src/' "$f" >"$out"
      return 0
    fi
  done
  if [[ -f /etc/apt/sources.list ]] && grep -qE '^deb .*debian' /etc/apt/sources.list; then
    log "adding deb-src lines copied from /etc/apt/sources.list"
    grep -E '^deb .*debian' /etc/apt/sources.list | sed 's/^deb /deb-src /' \
      >/etc/apt/sources.list.d/caravan-deb-src.list
    return 0
  fi
  die "no Debian apt entry found to derive a deb-src entry from"
}
ensure_deb_src
timeout 600 apt-get update -qq

SRC="$K8S_CACHE/src"
mkdir -p "$SRC"
cd "$SRC"
if ! compgen -G "./kubernetes_*.orig.tar.*" >/dev/null; then
  log "downloading Debian's kubernetes source package"
  timeout 1800 apt-get source --download-only kubernetes </dev/null
fi
dscs=(./kubernetes_*.dsc)
dsc=${dscs[0]}
debver=$(sed -n 's/^Version: //p' "$dsc")
log "source package version $debver"
[[ "$debver" == *"$K8S_VERSION"* ]] || die "source package $debver is not Kubernetes $K8S_VERSION"

TREE="$SRC/tree"
rm -rf "$TREE"
mkdir -p "$TREE"
log "unpacking the upstream tree"
origs=(./kubernetes_*.orig.tar.*)
tar -xf "${origs[0]}" -C "$TREE" --strip-components=1

cd "$TREE"
# reflect2 1.0.1 (vendored) crashes the API server under Go >= 1.18: use Debian's 1.0.2.
R2=/usr/share/gocode/src/github.com/modern-go/reflect2
[[ -d "$R2" ]] || die "missing $R2 (golang-github-modern-go-reflect2-dev)"
rm -rf vendor/github.com/modern-go/reflect2
mkdir -p vendor/github.com/modern-go/reflect2
cp -a "$R2"/. vendor/github.com/modern-go/reflect2/
rm -f vendor/github.com/modern-go/reflect2/go.mod vendor/github.com/modern-go/reflect2/go.sum

export GOCACHE="$K8S_CACHE/go-build" GOPATH="$K8S_CACHE/gopath"
log "make generated_files"
make generated_files
log "make WHAT=... (the long part)"
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kubelet cmd/kube-proxy"

log "building pause"
stage="$K8S_CACHE/bin.new"
rm -rf "$stage"
mkdir -p "$stage"
gcc -static -O2 -DVERSION=3.2 -o "$stage/pause" build/pause/linux/pause.c
for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
  cp "_output/bin/$b" "$stage/$b"
done
echo "$debver" >"$stage/.source-version"
touch "$stage/.complete"
rm -rf "$K8S_BIN"
mv "$stage" "$K8S_BIN"

# The tree and Go caches are large; keep only the downloaded source package.
cd "$K8S_CACHE"
rm -rf "$TREE" "$K8S_CACHE/go-build" "$K8S_CACHE/gopath"
log "Kubernetes $K8S_VERSION built in $(( $(date +%s) - start ))s into $K8S_BIN"

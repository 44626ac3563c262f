#!/usr/bin/env bash
# Makes the build context of images/NAME/Containerfile:
#   images/stage.sh NAME BINARY OUTDIR
# OUTDIR/rootfs/ gets BINARY as /usr/local/bin/caravan-NAME, the shared
# libraries `ldd` lists (with the loader; nothing for a static binary),
# /etc/passwd and /etc/group with the nonroot user 65532, the CA bundle and /tmp.
set -euo pipefail
(($# == 3)) || { echo "usage: $0 agent|operator BINARY OUTDIR" >&2; exit 2; }
name="$1" bin="$2" out="$3"
[[ "$name" == agent || "$name" == operator ]] || { echo "unknown image '$name'" >&2; exit 2; }
[[ -x "$bin" ]] || { echo "$bin is not an executable" >&2; exit 1; }
rootfs="$out/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs/etc" "$rootfs/tmp"
chmod 1777 "$rootfs/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
if [[ -f /etc/ssl/certs/ca-certificates.crt ]]; then
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
install -D -m 0755 "$bin" "$rootfs/usr/local/bin/caravan-$name"
if ldd "$bin" >/dev/null 2>&1; then
  while read -r line; do
    lib=""
    case "$line" in
      *"=> /"*) lib=${line#*=> }; lib=${lib%% (*} ;;
      /*) lib=${line%% (*} ;;
    esac
    [[ -n "$lib" && -e "$lib" ]] || continue
    install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
  done < <(ldd "$bin")
fi

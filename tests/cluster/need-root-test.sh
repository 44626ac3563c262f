#!/usr/bin/env bash
# Checks need_root (tests/cluster/env.sh) as an unprivileged user: with a sudo on
# PATH the script re-runs itself through it with its arguments; without sudo it
# stops with a message that says what to do. Needs root (to switch to `nobody`);
# prints SKIP otherwise. Nothing is started.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ "$(id -u)" != 0 ]] || ! command -v runuser >/dev/null; then echo "SKIP: need-root test needs root and runuser"; exit 0; fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
chmod 755 "$tmp"
cp "$here/env.sh" "$tmp/env.sh"
cat >"$tmp/script.sh" <<'S'
source "$(dirname "$0")/env.sh"
need_root
echo "ran as $(id -u) with: $*"
S
mkdir "$tmp/bin"
# A stand-in sudo: records how it was called, then runs the command without
# becoming root (so need_root must not loop: it refuses a second round).
printf '#!/bin/sh\necho "sudo $*" >"%s/sudo.log"\nshift\nexec env "$@"\n' "$tmp" >"$tmp/bin/sudo"
chmod 755 "$tmp/bin/sudo" "$tmp/script.sh"
chmod 777 "$tmp"
fail=0
out=$(runuser -u nobody -- env PATH="/usr/sbin:/usr/bin:/bin" bash "$tmp/script.sh" a 'b c' 2>&1) && rc=0 || rc=$?
if [[ $rc != 0 && "$out" == *"run it as root, or install sudo"* ]]; then echo "PASS without sudo: clear error"; else echo "FAIL without sudo (rc=$rc): $out"; fail=1; fi
out=$(runuser -u nobody -- env PATH="$tmp/bin:/usr/sbin:/usr/bin:/bin" bash "$tmp/script.sh" a 'b c' 2>&1) || true
if grep -q -- "--preserve-env _CARAVAN_VIA_SUDO=1 bash $tmp/script.sh a b c" "$tmp/sudo.log" 2>/dev/null &&
  [[ "$out" == *"run it as root, or install sudo"* ]]; then echo "PASS with sudo: re-ran itself through sudo with its arguments, once"; else echo "FAIL with sudo: $out / $(cat "$tmp/sudo.log" 2>/dev/null)"; fail=1; fi
exit $fail

#!/usr/bin/env bash
# The ARM path, proved under emulation: the agent's inference on aarch64 (qemu-user, a Debian
# arm64 root made by debootstrap, the aarch64 wheels from PyPI) against x86 on the real stacks.
#
#   sudo tests/arm64/check.sh            (or: make arm64-check)
#
# Checks, inside the arm64 root: `hpa-edge verify` of the demo bundle (schema, hashes, golden
# vectors computed by aarch64 LiteRT and ONNX Runtime) and `hpa-edge predict` on every real
# stack; then compares with `hpa-edge predict` on this machine: identical label sets, largest
# score difference. Exit 1 if the golden check fails or fewer stacks keep their exact label
# set than the bundle's own fidelity gate (`fidelity.gate` in its manifest, the share it had
# to keep against the float reference at export; MIN_IDENTICAL overrides). A bundle whose
# forests were trained on its own embedder has no such gate (null): the share is reported,
# and only the golden check can fail it. Emulated timings
# mean nothing and are not reported. BUNDLE=DIR checks another bundle than models/demo.
# Needs root (debootstrap, chroot, binfmt_misc), Debian's qemu-user-static and debootstrap,
# and the network to Debian's and PyPI's registries. The root is kept in $ARM64_ROOT
# (default /var/tmp/hpa-edge-arm64) and reused; delete it to start afresh.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
ROOT="${ARM64_ROOT:-/var/tmp/hpa-edge-arm64}"
REAL="${HPA_REAL:-$REPO/../shared/hpa-real}"
BUNDLE="${BUNDLE:-$REPO/models/demo}"
HOST_PYTHON="${HOST_PYTHON:-$REPO/.venv/bin/python}"
say() { echo "arm64-check: $*"; }

[ "$(id -u)" -eq 0 ] || { echo "arm64-check: run as root (debootstrap, chroot, binfmt_misc)" >&2; exit 2; }
[ -d "$REAL/stacks" ] || { echo "arm64-check: real stacks not found in $REAL (set HPA_REAL)" >&2; exit 2; }
[ -x "$HOST_PYTHON" ] || { echo "arm64-check: no $HOST_PYTHON (run make venv first)" >&2; exit 2; }
GATE="$("$HOST_PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["fidelity"]["gate"] or 0)' "$BUNDLE/manifest.json")"
MIN_IDENTICAL="${MIN_IDENTICAL:-$GATE}"
say "bundle $BUNDLE; pass mark: identical label sets on at least $MIN_IDENTICAL of the stacks"

need=()
[ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]} from Debian's packages"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# Let the kernel run aarch64 binaries through qemu (F: the interpreter works inside the chroot).
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
fi

if [ ! -x "$ROOT/usr/bin/python3" ]; then
  say "debootstrap: Debian bookworm arm64 with Python into $ROOT (several minutes)"
  debootstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1 \
    bookworm "$ROOT" http://deb.debian.org/debian >"$ROOT.debootstrap.log" 2>&1 \
    || { tail -20 "$ROOT.debootstrap.log"; exit 1; }
fi
say "$(chroot "$ROOT" /usr/bin/python3 -c 'import platform; print(platform.machine(), platform.python_version())')"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# The host's CA bundle: it holds any local CA a proxy in front of the registries uses.
[ -f /etc/ssl/certs/ca-certificates.crt ] && cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/"

say "the agent extra from the aarch64 wheels (pip inside the emulated root)"
rm -rf "$ROOT/opt/src" && mkdir -p "$ROOT/opt/src"
cp -r "$REPO/agent" "$REPO/export" "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/constraints.txt" "$ROOT/opt/src/"
mkdir -p "$ROOT/opt/src/models" && cp -r "$BUNDLE" "$ROOT/opt/src/models/bundle"
[ -x "$ROOT/opt/venv/bin/python" ] || chroot "$ROOT" /usr/bin/python3 -m venv /opt/venv
chroot "$ROOT" /opt/venv/bin/python -m pip install --quiet --disable-pip-version-check \
  -c /opt/src/constraints.txt "/opt/src[agent]"
rm -rf "$ROOT/opt/stacks" && cp -r "$REAL/stacks" "$ROOT/opt/stacks"

say "hpa-edge verify on aarch64 (golden vectors)"
chroot "$ROOT" /opt/venv/bin/hpa-edge verify /opt/src/models/bundle | tee "$ROOT/opt/verify.txt"
say "hpa-edge predict on aarch64, $(ls "$REAL/stacks" | wc -l) files"
chroot "$ROOT" /opt/venv/bin/hpa-edge predict --bundle /opt/src/models/bundle /opt/stacks \
  >"$ROOT/opt/arm64.jsonl" 2>"$ROOT/opt/arm64.err" || { tail "$ROOT/opt/arm64.err"; exit 1; }
"$HOST_PYTHON" -m agent.cli predict --bundle "$BUNDLE" "$REAL/stacks" >"$ROOT/opt/x86.jsonl" 2>/dev/null

"$HOST_PYTHON" - "$ROOT/opt/x86.jsonl" "$ROOT/opt/arm64.jsonl" "$MIN_IDENTICAL" <<'EOF'
import json, sys
x86 = {d["stack_id"]: d for d in map(json.loads, open(sys.argv[1]))}
arm = {d["stack_id"]: d for d in map(json.loads, open(sys.argv[2]))}
assert x86.keys() == arm.keys(), "different stacks analysed"
same = sum(x86[s]["labels"] == arm[s]["labels"] for s in x86)
worst = max(abs(x86[s]["scores"][k] - arm[s]["scores"][k]) for s in x86 for k in x86[s]["scores"])
share = same / len(x86)
print(f"arm64-check: {len(x86)} stacks: identical label sets {same}/{len(x86)} ({share:.1%}); "
      f"largest score difference {worst:.2e}")
sys.exit(0 if share >= float(sys.argv[3]) else 1)
EOF

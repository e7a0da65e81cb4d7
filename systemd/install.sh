#!/usr/bin/env bash
# Install (or remove) the hpa-edge agent as a systemd service.
#
#   sudo systemd/install.sh [--folder /data/acquisition] [--bundle DIR]
#   sudo systemd/install.sh --uninstall [--purge]
#
# What it does, in order: the hpa-edge user (sysusers.d), a virtual environment in
# /opt/hpa-edge/venv with the agent extra only (no TensorFlow, no scikit-learn), the model
# bundle in /opt/hpa-edge/models, /etc/hpa-edge/agent.toml from the commented example (an
# existing one is kept), /etc/hpa-edge/agent.env for per-device overrides, the acquisition
# folder, the unit, and `systemctl enable`. `--root DIR` does all of it inside DIR (as
# systemd-sysusers --root and systemctl --root do), for images and for the tests.
# --uninstall removes the unit, the environment and the user file; --purge also removes
# /etc/hpa-edge, /var/lib/hpa-edge (state, done/, failed/) and the user.
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
ROOT=""
FOLDER="/var/lib/hpa-edge/incoming"
BUNDLE="$SRC/models/demo"
ACTION=install
PURGE=0
ENABLE=1
PYTHON="${PYTHON:-python3}"

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }

while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT="$(realpath -m "$2")"; shift 2 ;;
    --folder) FOLDER="$2"; shift 2 ;;
    --bundle) BUNDLE="$(realpath "$2")"; shift 2 ;;
    --uninstall) ACTION=uninstall; shift ;;
    --purge) PURGE=1; shift ;;
    --no-enable) ENABLE=0; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

case "$FOLDER" in /*) ;; *) echo "install.sh: --folder must be an absolute path" >&2; exit 2 ;; esac
if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo), or with --root DIR" >&2; exit 1
fi

OPT="$ROOT/opt/hpa-edge"
ETC="$ROOT/etc/hpa-edge"
UNIT_DIR="$ROOT/etc/systemd/system"
SYSUSERS="$ROOT/usr/lib/sysusers.d/hpa-edge.conf"
STATE="$ROOT/var/lib/hpa-edge"
SYSTEMCTL=(systemctl)
[ -n "$ROOT" ] && SYSTEMCTL=(systemctl "--root=$ROOT")
say() { echo "install.sh: $*"; }

# Owner ids as the target system knows them (inside --root, the host's names may differ).
ids() { awk -F: -v u=hpa-edge '$1 == u {print $3 ":" $4}' "$ROOT/etc/passwd"; }

if [ "$ACTION" = uninstall ]; then
  if [ -e "$UNIT_DIR/hpa-edge.service" ]; then
    if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then systemctl stop hpa-edge.service || true; fi
    "${SYSTEMCTL[@]}" disable hpa-edge.service >/dev/null 2>&1 || true
  fi
  rm -rf "$UNIT_DIR/hpa-edge.service" "$UNIT_DIR/hpa-edge.service.d" "$OPT" "$SYSUSERS"
  if [ "$PURGE" = 1 ]; then
    rm -rf "$ETC" "$STATE"
    if grep -q '^hpa-edge:' "$ROOT/etc/passwd" 2>/dev/null; then
      if [ -n "$ROOT" ]; then userdel --root "$ROOT" hpa-edge; else userdel hpa-edge; fi
    fi
    say "removed everything, including configuration, state and the hpa-edge user"
  else
    say "removed the service and /opt/hpa-edge; kept $ETC and $STATE (--purge removes them)"
  fi
  [ -z "$ROOT" ] && [ -d /run/systemd/system ] && systemctl daemon-reload
  exit 0
fi

[ -f "$BUNDLE/manifest.json" ] || { echo "install.sh: $BUNDLE is not a model bundle" >&2; exit 2; }
"$PYTHON" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || {
  echo "install.sh: needs Python >= 3.11 with venv (sudo apt-get install -y python3 python3-venv)" >&2; exit 1; }

say "user hpa-edge (sysusers.d)"
install -D -m 0644 "$SRC/systemd/hpa-edge.sysusers" "$SYSUSERS"
mkdir -p "$ROOT/etc"
if [ -n "$ROOT" ]; then systemd-sysusers --root="$ROOT" "$SYSUSERS"; else systemd-sysusers "$SYSUSERS"; fi
OWNER="$(ids)"
[ -n "$OWNER" ] || { echo "install.sh: user hpa-edge was not created" >&2; exit 1; }

say "virtual environment $OPT/venv (agent extra only)"
mkdir -p "$OPT"
"$PYTHON" -m venv "$OPT/venv"
"$OPT/venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$OPT/venv/bin/python" -m pip install --quiet --disable-pip-version-check -c "$SRC/constraints.txt" "$SRC[agent]"
rm -rf "$OPT/models"
mkdir -p "$OPT/models"
cp -r "$BUNDLE" "$OPT/models/$(basename "$BUNDLE")"
cp "$SRC/README.md" "$OPT/README.md"
rm -rf "$OPT/docs" && cp -r "$SRC/docs" "$OPT/docs"  # the README links into docs/
BUNDLE_PATH="/opt/hpa-edge/models/$(basename "$BUNDLE")"

say "configuration $ETC"
install -d -m 0750 "$ETC"
chown "root:${OWNER#*:}" "$ETC"
if [ ! -e "$ETC/agent.toml" ]; then
  install -m 0640 "$SRC/agent/service/agent.example.toml" "$ETC/agent.toml"
  chown "root:${OWNER#*:}" "$ETC/agent.toml"
else
  say "kept the existing $ETC/agent.toml"
fi
if [ ! -e "$ETC/agent.env" ]; then
  {
    echo "# Per-device overrides of /etc/hpa-edge/agent.toml (HPA_EDGE_<SECTION>_<KEY>=value)."
    echo "# HPA_EDGE_INSTRUMENT=confocal-2"
    echo "# HPA_EDGE_MQTT_HOST=broker.lab"
    echo "HPA_EDGE_WATCH_FOLDER=$FOLDER"
    echo "HPA_EDGE_BUNDLE_PATH=$BUNDLE_PATH"
  } > "$ETC/agent.env"
  chmod 0640 "$ETC/agent.env"
  chown "root:${OWNER#*:}" "$ETC/agent.env"
fi

say "acquisition folder $FOLDER and state $STATE"
install -d -m 0750 -o "${OWNER%:*}" -g "${OWNER#*:}" "$STATE"
install -d -m 2775 -o "${OWNER%:*}" -g "${OWNER#*:}" "$ROOT$FOLDER"

say "unit $UNIT_DIR/hpa-edge.service"
install -D -m 0644 "$SRC/systemd/hpa-edge.service" "$UNIT_DIR/hpa-edge.service"
case "$FOLDER" in
  /var/lib/hpa-edge/*) rm -rf "$UNIT_DIR/hpa-edge.service.d" ;;
  *)  # ProtectSystem=strict: the agent may write only where it is told
    install -d "$UNIT_DIR/hpa-edge.service.d"
    printf '[Service]\nReadWritePaths=%s\n' "$FOLDER" > "$UNIT_DIR/hpa-edge.service.d/folder.conf" ;;
esac

if [ -z "$ROOT" ]; then
  HPA_EDGE_WATCH_FOLDER="$FOLDER" HPA_EDGE_BUNDLE_PATH="$BUNDLE_PATH" \
    "$OPT/venv/bin/hpa-edge" run --config "$ETC/agent.toml" --check-config >/dev/null
  "$OPT/venv/bin/hpa-edge" verify "$BUNDLE_PATH"
fi
if [ "$ENABLE" = 1 ]; then
  if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable --now hpa-edge.service
    say "started: journalctl -u hpa-edge -f"
  else
    "${SYSTEMCTL[@]}" enable hpa-edge.service
    say "enabled (systemd is not running here: it starts at the next boot)"
  fi
fi
say "done"

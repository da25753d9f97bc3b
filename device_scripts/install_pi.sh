#!/usr/bin/env bash
# Install edgetl's device side on a Raspberry Pi (Raspberry Pi OS Bookworm, 64-bit, Python 3.11).
#
#   bash install_pi.sh [--bundle PATH] [--package SPEC] [--prefix DIR] [--service] [--serve]
#
#   --bundle PATH    a bundle folder or .zip from 'edgetl export' (copied to PREFIX/models/)
#   --package SPEC   what pip installs (default: "edgetl[device]"; a wheel path works too)
#   --prefix DIR     where the venv, scripts, models and state go (default: /opt/edgetl)
#   --service        install and start the inbox watcher's systemd unit (edgetl-personalize)
#   --serve          install and start the web service's unit (edgetl-serve: API + page on port 8080)
set -euo pipefail

PACKAGE="edgetl[device]"
PREFIX="/opt/edgetl"
BUNDLE=""
SERVICE=0
SERVE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --bundle) BUNDLE="$2"; shift 2 ;;
    --package) PACKAGE="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --service) SERVICE=1; shift ;;
    --serve) SERVE=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done

arch="$(uname -m)"
case "$arch" in
  aarch64|arm64|x86_64) ;;
  armv7l|armv6l|armhf)
    echo "error: this is a 32-bit ARM system ($arch). LiteRT (ai-edge-litert) and ONNX Runtime publish no" >&2
    echo "wheels for 32-bit ARM, so edgetl's device side cannot run here. Install Raspberry Pi OS (64-bit)," >&2
    echo "Bookworm or newer, on a Pi 3/4/5 or Zero 2 W, and run this script again." >&2
    exit 1 ;;
  *) echo "error: unsupported machine type '$arch'; expected aarch64 (64-bit Raspberry Pi OS)" >&2; exit 1 ;;
esac

if [ -r /etc/os-release ]; then
  . /etc/os-release
  if [ "${ID:-}" != "debian" ] && [ "${ID_LIKE:-}" != "debian" ] && [ "${ID:-}" != "raspbian" ]; then
    echo "warning: tested on Raspberry Pi OS Bookworm (Debian 12); this is ${PRETTY_NAME:-unknown}" >&2
  elif [ "${VERSION_CODENAME:-}" != "bookworm" ] && [ "${VERSION_CODENAME:-}" != "trixie" ]; then
    echo "warning: tested on Bookworm; this is ${VERSION_CODENAME:-unknown}" >&2
  fi
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
  echo "error: $($PY --version 2>&1) is too old; edgetl needs Python 3.10 or newer (Bookworm has 3.11)" >&2
  exit 1
fi
if ! "$PY" -c 'import venv, ensurepip' 2>/dev/null; then
  echo "installing python3-venv (sudo)..."
  sudo apt-get update && sudo apt-get install -y python3-venv
fi

SUDO=""
if [ ! -w "$(dirname "$PREFIX")" ] && [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
$SUDO mkdir -p "$PREFIX"/{models,state,inbox/unlabelled,scripts}
$SUDO chown -R "$(id -un)" "$PREFIX"

# --system-site-packages lets the venv see Debian's python3-picamera2 when it is installed.
"$PY" -m venv --system-site-packages "$PREFIX/venv"
"$PREFIX/venv/bin/python" -m pip install --upgrade pip
"$PREFIX/venv/bin/python" -m pip install "$PACKAGE"
cp "$(dirname "$0")/personalize.py" "$PREFIX/scripts/"

if [ -n "$BUNDLE" ]; then
  cp -r "$BUNDLE" "$PREFIX/models/"
  BUNDLE="$PREFIX/models/$(basename "$BUNDLE")"
  "$PREFIX/venv/bin/edgetl-device" --bundle "$BUNDLE" --store "$PREFIX/state/store.sqlite" info
fi

$SUDO tee /etc/default/edgetl >/dev/null <<CONF
EDGETL_VENV=$PREFIX/venv
EDGETL_SCRIPTS=$PREFIX/scripts
EDGETL_BUNDLE=${BUNDLE:-$PREFIX/models/CHANGE-ME}
EDGETL_INBOX=$PREFIX/inbox
EDGETL_STORE=$PREFIX/state/store.sqlite
EDGETL_ARGS=--threads 4 --retrain-every 10
# edgetl-serve: listen on every network (a token is then required; see edgetl-serve.service)
EDGETL_SERVE_ARGS=--host 0.0.0.0 --port 8080 --threads 4
CONF

# A systemd unit from device_scripts/, for this user, enabled and started.
install_unit() {
  sed "s/%EDGETL_USER%/$(id -un)/" "$(dirname "$0")/$1.service" | $SUDO tee "/etc/systemd/system/$1.service" >/dev/null
  $SUDO systemctl daemon-reload
  $SUDO systemctl enable --now "$1"
}
if [ "$SERVICE" = 1 ]; then
  install_unit edgetl-personalize
  echo "service started: journalctl -u edgetl-personalize -f"
fi
if [ "$SERVE" = 1 ]; then
  install_unit edgetl-serve
  echo "web service started: journalctl -u edgetl-serve shows the address to open on a phone, and the token"
fi
echo "installed in $PREFIX. Try: $PREFIX/venv/bin/edgetl-device --bundle ${BUNDLE:-BUNDLE} info"

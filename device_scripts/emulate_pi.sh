#!/usr/bin/env bash
# An emulated Raspberry Pi on an x86-64 Linux machine: a Debian arm64 userland run by qemu-user,
# with the CPU model of a Pi 4 (Cortex-A72) or a Pi 5 (Cortex-A76).
#
#   sudo bash device_scripts/emulate_pi.sh [--suite bookworm|trixie] [--cpu cortex-a72|cortex-a76]
#                                          [--steps rootfs,install,tests,installer,round] [--bundle DIR]
#
#   --suite    bookworm (Python 3.11, what Raspberry Pi OS Bookworm ships; default) or trixie (3.13)
#   --cpu      cortex-a72 (Pi 4, no dot-product instructions; default) or cortex-a76 (Pi 5, with them)
#   --steps    what to do, in this order (default: all of them)
#                rootfs     debootstrap the arm64 userland once into $EDGETL_EMU_DIR (reused after)
#                install    a venv inside it with `pip install .[device,dev]` from the registry's aarch64 wheels
#                tests      the device test suite (`pytest -m device`) inside, on the emulated CPU
#                installer  device_scripts/install_pi.sh end to end inside (venv, package, bundle, config)
#                round      a personalization round through the device CLI with a real exported bundle,
#                           compared with the same round on this x86 host
#                crosscpu   benchmarks/cross_cpu.py measure on the emulated CPU (not in the default steps;
#                           needs --bundle and the references of `cross_cpu.py reference`, see that script)
#   --bundle   the bundle the tests and the round use (default: the tiny test bundle, made here with
#              `python -m tests.helpers`, which needs the workstation environment .venv)
#
# Needs root (debootstrap, chroot, mounts) and Debian's qemu-user-static and debootstrap
# (installed with apt-get when missing). Timings on a 2-core x86-64 host: rootfs ~10-13 min the
# first time, install ~1-2 min, tests ~2-4 min per CPU model. Environment: EDGETL_EMU_DIR (default
# ~/.cache/edgetl/emulate), EDGETL_SHARED (default ../shared), DEBIAN_MIRROR, and for crosscpu
# EDGETL_CROSS_CPU_PHOTOS (default 100) and EDGETL_CROSS_CPU_FILES (default: every file).
set -euo pipefail

SUITE=bookworm
CPU=cortex-a72
STEPS=rootfs,install,tests,installer,round
BUNDLE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --suite) SUITE="$2"; shift 2 ;;
    --cpu) CPU="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --bundle) BUNDLE="$2"; shift 2 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$SUITE" in bookworm|trixie) ;; *) echo "--suite: expected bookworm or trixie; received '$SUITE'" >&2; exit 2 ;; esac
case "$CPU" in cortex-a72|cortex-a76) ;; *) echo "--cpu: expected cortex-a72 or cortex-a76; received '$CPU'" >&2; exit 2 ;; esac
[ "$(id -u)" = 0 ] || { echo "emulate_pi.sh needs root (debootstrap, chroot and mounts)" >&2; exit 2; }
[ "$(uname -m)" = x86_64 ] || { echo "emulate_pi.sh runs on an x86-64 host; this is $(uname -m)" >&2; exit 2; }

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SHARED="$(cd "${EDGETL_SHARED:-$ROOT/../shared}" && pwd)"
EMU="${EDGETL_EMU_DIR:-$HOME/.cache/edgetl/emulate}"
FS="$EMU/$SUITE-arm64"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
export QEMU_CPU="$CPU"   # qemu-user reads the CPU model from here, through binfmt_misc and chroot alike
has() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
say() { printf '== [%s %s/arm64 %s] %s\n' "$(date +%H:%M:%S)" "$SUITE" "$CPU" "$*"; }
# One run per userland at a time: a second one (a CI job beside a manual run) waits here, since
# each run replaces the venv inside and unmounts everything below the userland when it ends.
mkdir -p "$EMU"
exec 9>"$EMU/$SUITE-arm64.lock"
if ! flock -n 9; then say "waiting for another run on this userland to finish"; flock 9; fi

need_host_tools() {
  if ! command -v debootstrap >/dev/null || [ ! -x /usr/bin/qemu-aarch64-static ]; then
    say "installing qemu-user-static and debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static debootstrap >/dev/null
  fi
  # Run arm64 binaries through qemu: binfmt_misc with the F flag (the interpreter is opened now,
  # so it also works inside the chroot).
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
    printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:/usr/bin/qemu-aarch64-static:F' \
      > /proc/sys/fs/binfmt_misc/register
  fi
}

build_rootfs() {
  if [ -f "$FS/.edgetl-complete" ]; then say "rootfs: reusing $FS"; return; fi
  say "rootfs: debootstrap $SUITE arm64 into $FS (10-13 min the first time)"
  rm -rf "$FS.partial"; mkdir -p "$EMU"
  debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,sudo,procps \
    "$SUITE" "$FS.partial" "$MIRROR" > "$EMU/debootstrap-$SUITE.log" 2>&1 || {
      tail -20 "$EMU/debootstrap-$SUITE.log" >&2; exit 1; }
  touch "$FS.partial/.edgetl-complete"
  mv "$FS.partial" "$FS"
}

# /proc/cpuinfo as the Pi shows it. Under qemu-user the kernel's own file describes the x86 host,
# which ONNX Runtime's CPU detection dies on (SIGSEGV); claiming features the emulated model lacks
# would make LiteRT die of an illegal instruction, so each model claims what qemu emulates for it.
fake_cpuinfo() {
  local features part variant revision model
  if [ "$CPU" = cortex-a76 ]; then
    features="fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
    part=0xd0b; variant=0x4; revision=1; model="Raspberry Pi 5 Model B Rev 1.0 (emulated: qemu-aarch64 -cpu cortex-a76)"
  else
    features="fp asimd evtstrm crc32 cpuid"
    part=0xd08; variant=0x0; revision=3; model="Raspberry Pi 4 Model B Rev 1.4 (emulated: qemu-aarch64 -cpu cortex-a72)"
  fi
  for i in $(seq 0 $(( $(nproc) - 1 ))); do
    printf 'processor\t: %s\nBogoMIPS\t: 108.00\nFeatures\t: %s\nCPU implementer\t: 0x41\n' "$i" "$features"
    printf 'CPU architecture: 8\nCPU variant\t: %s\nCPU part\t: %s\nCPU revision\t: %s\n\n' "$variant" "$part" "$revision"
  done
  printf 'Hardware\t: BCM2835\nModel\t\t: %s\n' "$model"
}

MOUNTS=()
enter() {
  leave  # stale mounts of an interrupted run
  mkdir -p "$FS/work/edgetl" "$FS/work/shared" "$FS/work/bundle"
  mount -t proc proc "$FS/proc"; MOUNTS+=("$FS/proc")
  fake_cpuinfo > "$EMU/cpuinfo-$CPU"
  mount --bind "$EMU/cpuinfo-$CPU" "$FS/proc/cpuinfo"; MOUNTS+=("$FS/proc/cpuinfo")
  mount --rbind /sys "$FS/sys"; mount --make-rslave "$FS/sys"; MOUNTS+=("$FS/sys")
  mount --rbind /dev "$FS/dev"; mount --make-rslave "$FS/dev"; MOUNTS+=("$FS/dev")
  mount --bind "$SHARED" "$FS/work/shared"; mount -o remount,bind,ro "$FS/work/shared"; MOUNTS+=("$FS/work/shared")
  # The registry is reached through this host's resolver and CA certificates.
  cp /etc/resolv.conf "$FS/etc/resolv.conf"
  cp /etc/ssl/certs/ca-certificates.crt "$FS/etc/ssl/certs/ca-certificates.crt"
  # This checkout, as it is (tracked and untracked-but-not-ignored files), not a build of it.
  rm -rf "$FS/work/edgetl"; mkdir -p "$FS/work/edgetl"
  git -C "$ROOT" ls-files -z --cached --others --exclude-standard | (cd "$ROOT" && tar --null -T - -cf -) \
    | tar -xf - -C "$FS/work/edgetl"
}
leave() {
  # Everything mounted below the userland, deepest first: ours, and any left by a run that was
  # killed before its own clean-up (one run per userland at a time).
  local m
  for m in $(awk -v fs="$FS/" 'index($2, fs) == 1 {print $2}' /proc/mounts | sort -r); do
    umount -l "$m" 2>/dev/null || true
  done
  MOUNTS=()
}
trap leave EXIT

# Run a command inside: a clean environment, the emulated CPU model, the venv first on PATH.
inside() {
  chroot "$FS" /usr/bin/env -i HOME=/root LANG=C.UTF-8 PATH=/opt/edgetl-venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    QEMU_CPU="$CPU" PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 EDGETL_SHARED=/work/shared PYTHONDONTWRITEBYTECODE=1 "$@"
}

the_bundle() {
  if [ -n "$BUNDLE" ]; then
    rm -rf "$FS/work/bundle"; cp -r "$BUNDLE" "$FS/work/bundle"; return
  fi
  local py="${PYTHON:-$ROOT/.venv/bin/python}"
  if [ ! -f "$EMU/tiny/bundle/manifest.json" ] || [ -n "$(find "$ROOT/edgetl" -newer "$EMU/tiny/bundle/manifest.json" -name '*.py' | head -1)" ]; then
    say "bundle: the tiny test bundle, made on this x86 host with $py (needs the workstation environment)"
    rm -rf "$EMU/tiny"
    (cd "$ROOT" && EDGETL_SHARED="$SHARED" "$py" -m tests.helpers "$EMU/tiny" >"$EMU/tiny.log" 2>&1) || {
      tail -20 "$EMU/tiny.log" >&2; exit 1; }
  fi
  rm -rf "$FS/work/bundle"; cp -r "$EMU/tiny/bundle" "$FS/work/bundle"
}

need_host_tools
has rootfs && build_rootfs
[ -f "$FS/.edgetl-complete" ] || { echo "no rootfs at $FS: run with --steps rootfs first" >&2; exit 1; }
enter
inside /bin/sh -c 'echo "inside: $(uname -m), $(. /etc/os-release; echo "$PRETTY_NAME"), $(python3 --version)"; grep -m1 Features /proc/cpuinfo'

if has install; then
  say "install: venv + pip install .[device,dev] (aarch64 wheels from the registry)"
  t0=$SECONDS
  inside /bin/sh -c 'rm -rf /opt/edgetl-venv && python3 -m venv /opt/edgetl-venv && pip install -q --upgrade pip \
    && pip install -q "/work/edgetl[device,dev]"' 
  inside python -c 'import sys; from importlib.metadata import version as v
print("installed:", ", ".join(f"{p} {v(p)}" for p in ("edgetl", "ai-edge-litert", "onnxruntime", "numpy", "pillow")))
import importlib.util as u; sys.exit(1 if u.find_spec("tensorflow") else 0)' || { echo "TensorFlow got installed on the device side" >&2; exit 1; }
  say "install: done in $((SECONDS - t0)) s"
fi

if has tests || has round || has crosscpu; then the_bundle; fi

if has tests; then
  say "tests: pytest -m device on the emulated $CPU"
  t0=$SECONDS
  inside /bin/sh -c 'cd /work/edgetl && EDGETL_TEST_BUNDLE=/work/bundle python -m pytest -m device -p no:cacheprovider -q'
  say "tests: passed in $((SECONDS - t0)) s"
fi

if has installer; then
  say "installer: device_scripts/install_pi.sh end to end (venv in /opt/edgetl-pi, the package from this checkout)"
  t0=$SECONDS
  inside /bin/sh -c 'rm -rf /opt/edgetl-pi && cd /work/edgetl && PATH=/usr/sbin:/usr/bin:/sbin:/bin \
    bash device_scripts/install_pi.sh --package "/work/edgetl[device]" --prefix /opt/edgetl-pi \
      --bundle /work/bundle >/tmp/install_pi.log 2>&1 || { tail -30 /tmp/install_pi.log; exit 1; }
    tail -9 /tmp/install_pi.log; test -x /opt/edgetl-pi/venv/bin/edgetl-device && test -f /etc/default/edgetl'
  say "installer: done in $((SECONDS - t0)) s"
fi

if has round; then
  say "round: add 10 ants to the bundle's classes, train, predict 10 ants + 10 bees it never saw"
  t0=$SECONDS
  round='set -e
    export EDGETL_BUNDLE=/work/bundle EDGETL_STORE=/tmp/round.sqlite
    rm -f /tmp/round.sqlite*
    H=/work/shared/datasets/hymenoptera
    edgetl-device add --label ants $(ls $H/train/ants/*.jpg | head -10)
    edgetl-device train
    edgetl-device predict --json $(ls $H/val/ants/*.jpg | head -10) $(ls $H/val/bees/*.jpg | head -10) > /tmp/round.json
    python -c "import json; p = json.load(open(\"/tmp/round.json\"))[\"predictions\"]; print(\" \".join(x[\"label\"] for x in p))"'
  inside /bin/sh -c "$round" | tee "$EMU/round-$SUITE-$CPU.txt"
  # The same round on this x86 host, with the workstation environment's device side.
  host="${PYTHON:-$ROOT/.venv/bin/python}"
  hround="$(printf '%s' "$round" | sed -e "s#/work/bundle#$FS/work/bundle#g" -e "s#/work/shared#$SHARED#g" \
    -e "s#/tmp/round#$EMU/host-round#g" -e "s#edgetl-device #$(dirname "$host")/edgetl-device #g" -e "s#python -c#$host -c#")"
  (cd "$ROOT" && PYTHONPATH="$ROOT" /bin/sh -c "$hround") > "$EMU/round-host.txt"
  same=$(paste -d' ' <(tail -1 "$EMU/round-$SUITE-$CPU.txt" | tr ' ' '\n') <(tail -1 "$EMU/round-host.txt" | tr ' ' '\n') \
    | awk '$1 == $2' | wc -l)
  say "round: done in $((SECONDS - t0)) s; the same label as on this x86 host for $same of 20 photos"
  [ "$same" = 20 ] || { echo "the emulated Pi and this x86 host disagree: see $EMU/round-*.txt" >&2; exit 1; }
fi

if has crosscpu; then
  [ -n "$BUNDLE" ] || { echo "--steps crosscpu needs --bundle (the bundle the references were made for)" >&2; exit 2; }
  DIR="$ROOT/benchmarks/results/cross_cpu"
  [ -f "$DIR/reference.npz" ] || { echo "no $DIR/reference.npz: run benchmarks/cross_cpu.py reference first" >&2; exit 2; }
  mkdir -p "$FS/work/crosscpu"; mount --bind "$DIR" "$FS/work/crosscpu"; MOUNTS+=("$FS/work/crosscpu")
  say "crosscpu: every file of the bundle on ${EDGETL_CROSS_CPU_PHOTOS:-100} photos"
  t0=$SECONDS
  inside /bin/sh -c "cd /work/edgetl && python benchmarks/cross_cpu.py measure --bundle /work/bundle \
    --dir /work/crosscpu --cpu $CPU --limit ${EDGETL_CROSS_CPU_PHOTOS:-100} \
    ${EDGETL_CROSS_CPU_FILES:+--files $EDGETL_CROSS_CPU_FILES}"
  say "crosscpu: done in $((SECONDS - t0)) s"
fi
say "all steps passed"

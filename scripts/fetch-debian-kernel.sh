#!/usr/bin/env bash
# Fetches a Debian kernel for rtvm's Linux guests and prints the path of its
# bzImage: the newest linux-image-*-FLAVOUR-amd64-unsigned package Debian's
# archive offers (FLAVOUR: cloud, the default, or rt for PREEMPT_RT).
#
#   scripts/fetch-debian-kernel.sh [cloud|rt] [DIR]
#
# DIR (default: target/debian-kernel) receives the .deb and its unpacked
# files; the kernel is DIR/<flavour>/boot/vmlinuz-*. Needs apt-get and dpkg.
set -euo pipefail
flavour=${1:-cloud}
dir=${2:-target/debian-kernel}
case "$flavour" in cloud|rt) ;; *) echo "usage: $0 [cloud|rt] [DIR]" >&2; exit 2 ;; esac

existing=$(ls "$dir/$flavour"/boot/vmlinuz-* 2>/dev/null | head -n 1 || true)
if [ -n "$existing" ]; then
    echo "$existing"
    exit 0
fi
mkdir -p "$dir/$flavour"
pkg=$(apt-cache search --names-only "^linux-image-[0-9.]+-[0-9]+-$flavour-amd64-unsigned\$" \
      | awk '{print $1}' | sort -V | tail -n 1)
if [ -z "$pkg" ]; then
    apt-get update -qq >&2
    pkg=$(apt-cache search --names-only "^linux-image-[0-9.]+-[0-9]+-$flavour-amd64-unsigned\$" \
          | awk '{print $1}' | sort -V | tail -n 1)
fi
[ -n "$pkg" ] || { echo "no linux-image-*-$flavour-amd64-unsigned package found" >&2; exit 1; }
(cd "$dir" && apt-get download -qq "$pkg" >&2)
dpkg -x "$dir/${pkg}"_*.deb "$dir/$flavour"
ls "$dir/$flavour"/boot/vmlinuz-* | head -n 1

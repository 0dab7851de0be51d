#!/usr/bin/env bash
# Boots a Debian PREEMPT_RT guest on 2 vCPUs (vCPU 1 real-time) and runs an
# unmodified cyclictest in it twice on vCPU 1: plainly (the guest's own
# timer interrupts), then with librtvm_preload.so (its clock_nanosleep long
# polls through VMRPC). The VM exits with the status of the run; the
# console, with both cyclictest summaries, is in OUT/console.log.
#
#   scripts/linux-cyclictest.sh [OUT]        (default OUT: target/linux-cyclictest)
#
# Needs: hardware KVM (on nested kvm_pvm hosts the guest kernel stops early,
# see README), root, apt-get (for the kernel), rt-tests and busybox-static.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/linux-cyclictest}
loops=${RTVM_CYCLICTEST_LOOPS:-5000}
mkdir -p "$out"

kernel=$(scripts/fetch-debian-kernel.sh rt target/debian-kernel)
RUSTFLAGS='-C target-feature=+crt-static' \
    cargo build --release -p rtvm-guest-linux --bin rtvm-guest --target x86_64-unknown-linux-gnu
cargo build --release -p rtvm-preload
cargo build --release --bin rtvm

rtvm=target/release/rtvm
cyclictest="cyclictest -m -p 90 -a 1 --mainaffinity=0 -t 1 -i 1000 -l $loops -q"
"$rtvm" initramfs --out "$out/initramfs.cpio.gz" \
    --add target/x86_64-unknown-linux-gnu/release/rtvm-guest:/bin/rtvm-guest \
    --add target/release/librtvm_preload.so:/lib/librtvm_preload.so \
    --program /usr/bin/cyclictest --rt-cpu 1 \
    --run "rtvm-guest ping && echo '== cyclictest, guest timer interrupts' && $cyclictest && echo '== cyclictest, long polling' && LD_PRELOAD=/lib/librtvm_preload.so $cyclictest"

exec "$rtvm" run --kernel "$kernel" --initramfs "$out/initramfs.cpio.gz" \
    --memory 1G --vcpus 2 --rt-vcpu 1:prio=80,cpu=1 \
    --cmdline "console=ttyS0 isolcpus=1 nohz_full=1 rcu_nocbs=1 quiet" \
    --serial-log "$out/console.log"

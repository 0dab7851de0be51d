//! A real Debian kernel booted to its first console lines.
//!
//! On nested `kvm_pvm` hosts a Linux guest's kernel code runs in the host's
//! instruction emulator, so a full boot is out of reach there; what this
//! checks is that the VMM's 64-bit direct boot (host-unpacked bzImage, zero
//! page, e820, command line) gets the kernel running and talking on ttyS0.
//! The kernel comes from `scripts/fetch-debian-kernel.sh`; `.ci/run` fetches
//! it and sets RTVM_TEST_KERNEL.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rtvm_vmm::need_kvm;
use rtvm_vmm::{Console, GuestSpec, Vm, VmConfig};

mod support;

fn kernel() -> Option<std::path::PathBuf> {
    match std::env::var_os("RTVM_TEST_KERNEL") {
        Some(path) => Some(path.into()),
        None if std::env::var("CI").is_ok() => panic!("CI must set RTVM_TEST_KERNEL (see .ci/run)"),
        None => {
            eprintln!("skipping: set RTVM_TEST_KERNEL to a Debian bzImage (scripts/fetch-debian-kernel.sh)");
            None
        }
    }
}

#[test]
fn debian_kernel_reaches_its_console_with_our_e820_and_cmdline() {
    need_kvm!();
    let Some(kernel) = kernel() else { return };
    let mut config = VmConfig::new(GuestSpec::Linux(kernel));
    config.memory = 512 << 20;
    config.cmdline = "console=ttyS0 earlyprintk=ttyS0 nokaslr".into();
    let out = Arc::new(Mutex::new(Vec::new()));
    let running = Vm::new(&config, Console::capture(out.clone()))
        .unwrap()
        .start()
        .unwrap();
    let text = || String::from_utf8_lossy(&out.lock().unwrap()).into_owned();
    let start = Instant::now();
    let wanted = [
        "Linux version",
        "BIOS-e820: [mem 0x0000000000100000-",
        "rtvm.vmrpc=0x",
    ];
    while !wanted.iter().all(|w| text().contains(w)) {
        if let Some(reason) = running.wait_timeout(Duration::from_millis(100)) {
            panic!("the guest ended early ({reason}):\n{}", text());
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "no {wanted:?} within 90 s:\n{}",
            text()
        );
    }
    eprintln!(
        "Linux printed its version {:.1} s after start",
        start.elapsed().as_secs_f64()
    );
    running.stop();
}

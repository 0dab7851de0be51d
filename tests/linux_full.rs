//! The whole Linux-guest path, opt-in (`RTVM_LINUX_FULL=1`): a Debian
//! PREEMPT_RT kernel booted to our initramfs, `rtvm-guest ping`, then an
//! unmodified cyclictest on the RT vCPU, plainly and with the preload
//! library. It needs hardware KVM (nested kvm_pvm hosts stop the guest
//! kernel early), root and Debian's archive; `scripts/linux-cyclictest.sh`
//! does the work and this test checks what it printed.

use std::process::Command;

#[test]
fn cyclictest_runs_in_a_linux_guest_with_and_without_long_polling() {
    if std::env::var("RTVM_LINUX_FULL").as_deref() != Ok("1") {
        eprintln!("skipping: set RTVM_LINUX_FULL=1 on a host with hardware KVM (see README)");
        return;
    }
    let out = std::env::temp_dir().join(format!("rtvm-linux-full-{}", std::process::id()));
    let status = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/linux-cyclictest.sh"
    ))
    .arg(&out)
    .env("RTVM_CYCLICTEST_LOOPS", "2000")
    .status()
    .expect("the script runs");
    let console = std::fs::read_to_string(out.join("console.log")).unwrap_or_default();
    assert!(
        status.success(),
        "the guest run failed ({status}):\n{console}"
    );
    assert!(console.contains("rtvm-init: exit 0"), "{console}");
    let plain = console
        .find("== cyclictest, guest timer interrupts")
        .expect("plain run");
    let polled = console
        .find("== cyclictest, long polling")
        .expect("long-polling run");
    for (from, to) in [(plain, polled), (polled, console.len())] {
        let part = &console[from..to];
        assert!(
            part.contains("T: 0") && part.contains("C:   2000") || part.contains("C:2000"),
            "{part}"
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

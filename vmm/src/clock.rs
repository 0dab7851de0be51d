//! Host time as the VMM reads it, and how a vCPU's TSC relates to it.
//!
//! Every deadline a guest names and every time the VMM hands back is host
//! `CLOCK_MONOTONIC` in nanoseconds ([`now_ns`]). A guest may read that
//! clock through its own TSC only where the host keeps time with its TSC
//! (see [`crate::host::tsc_is_clocksource`]); then the pairing of the two is
//! a [`TscOffset`] measured through KVM.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

/// Host CLOCK_MONOTONIC in nanoseconds.
pub fn now_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CPU time the calling thread has used (CLOCK_THREAD_CPUTIME_ID), ns: for
/// a vCPU thread, host and guest time together.
pub fn thread_cpu_ns() -> u64 {
    clock_ns(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time another thread of this process (kernel id `tid`) has used so
/// far; `None` if it has ended. The clock id is the kernel's per-thread CPU
/// clock encoding (`MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)`), a stable
/// part of its ABI.
pub fn thread_cpu_of(tid: i32) -> Option<std::time::Duration> {
    let clock = (!(tid as libc::clockid_t) << 3) | 6;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a live timespec to fill in; a bad clock id is an error.
    (unsafe { libc::clock_gettime(clock, &mut ts) } == 0)
        .then(|| std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a live timespec to fill in.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The host TSC.
pub fn host_tsc() -> u64 {
    // SAFETY: rdtsc has no preconditions on x86-64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// How a vCPU's TSC relates to the host's: guest TSC minus host TSC, and
/// how precisely that is known. rtvm never changes the guest TSC
/// frequency, so an offset is all there is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TscOffset {
    pub ticks: i64,
    pub error_ns: u64,
}

impl TscOffset {
    /// The vCPU's TSC when the host's reads `host_tsc`.
    pub fn guest_tsc(&self, host_tsc: u64) -> u64 {
        host_tsc.wrapping_add_signed(self.ticks)
    }
}

/// The guest TSC's frequency as guests may use it to tell time: KVM's
/// figure, or 0 ("no TSC clock") when the host does not keep time with its
/// TSC, as then KVM shifts the guest's TSC whenever the vCPU thread is
/// scheduled in.
pub fn guest_tsc_khz(fd: &VcpuFd) -> u64 {
    if !crate::host::tsc_is_clocksource() {
        return 0;
    }
    fd.get_tsc_khz().map(u64::from).unwrap_or(0)
}

/// Guest TSC minus host TSC: the guest's IA32_TSC read through KVM between
/// two host TSC reads, best of five; the error is half that window. None
/// when the guest's TSC is no clock (`tsc_khz` 0).
pub fn measure_tsc_offset(fd: &VcpuFd, tsc_khz: u64) -> Option<TscOffset> {
    const MSR_IA32_TSC: u32 = 0x10;
    if tsc_khz == 0 {
        return None;
    }
    let mut best: Option<(u64, i64)> = None;
    for _ in 0..5 {
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        }])
        .ok()?;
        let before = host_tsc();
        let read = fd.get_msrs(&mut msrs).ok()?;
        let after = host_tsc();
        if read != 1 {
            return None;
        }
        let window = after.wrapping_sub(before);
        let offset = msrs.as_slice()[0].data.wrapping_sub(before + window / 2) as i64;
        if best.is_none_or(|(w, _)| window < w) {
            best = Some((window, offset));
        }
    }
    let (window, ticks) = best?;
    Some(TscOffset {
        ticks,
        error_ns: (window / 2) * 1_000_000 / tsc_khz,
    })
}

#[cfg(test)]
mod cpu_clock_tests {
    use super::*;

    #[test]
    fn another_threads_cpu_time_is_read_by_its_id() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            let start = std::time::Instant::now();
            while start.elapsed() < std::time::Duration::from_millis(20) {
                std::hint::spin_loop();
            }
            done_rx.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let used = thread_cpu_of(tid).expect("a live thread's clock");
        assert!(used > std::time::Duration::ZERO);
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert_eq!(thread_cpu_of(tid), None, "an ended thread has none");
    }
}

//! The whole VMRPC call path as a guest drives it: a call page and guest
//! memory the guest wrote, a doorbell value, and the real server with its
//! file service (on a scratch share) and socket service (loopback only),
//! while a second thread keeps rewriting the call's arguments, as another
//! vCPU of a hostile guest could. The VMM must never panic, hang or touch
//! memory outside the guest's; the server's state (open files, sockets,
//! the periodic timer) carries over from one input to the next.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use rtvm_abi::vmrpc::Status;
use rtvm_vmm::config::{AdvanceMode, NetPolicy, ShareConfig};
use rtvm_vmm::memory::GuestRam;
use rtvm_vmm::rpc::park::{Interrupted, Park, Parked};
use rtvm_vmm::rpc::{Doorbell, RpcServer, Services, VcpuFacts};
use rtvm_vmm::{GuestSpec, VmConfig};
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM: small, so that addresses past its end are easy to reach.
const RAM: u64 = 16 << 20;
/// The call page the fuzzer fills; the doorbell may name any other.
const PAGE: u64 = 0x10_0000;
/// Where the rest of an input goes: buffers the call's arguments may name.
const BUFFERS: u64 = 0x20_0000;

/// A park that waits a millisecond at most: a nearer deadline is waited
/// for, a later one is cut short as a stop would cut it (the timer service
/// trusts its park to have waited, and spins the rest).
struct BriefWait;

impl Park for BriefWait {
    fn park(&mut self, _: &mut [libc::pollfd], deadline: u64) -> Result<Parked, Interrupted> {
        let now = rtvm_vmm::clock::now_ns();
        if deadline.saturating_sub(now) > 1_000_000 {
            return Err(Interrupted);
        }
        std::thread::sleep(std::time::Duration::from_nanos(
            deadline.saturating_sub(now),
        ));
        Ok(Parked::Deadline)
    }
}

struct Target {
    ram: Arc<GuestRam>,
    server: RpcServer,
}

fn target() -> &'static Mutex<Target> {
    static TARGET: OnceLock<Mutex<Target>> = OnceLock::new();
    TARGET.get_or_init(|| {
        let share = std::env::temp_dir().join(format!("rtvm-fuzz-share-{}", std::process::id()));
        std::fs::create_dir_all(share.join("dir")).unwrap();
        std::fs::write(share.join("input.txt"), b"fuzz").unwrap();
        let mut share = ShareConfig::new(share, false);
        share.max_bytes_written = 1 << 20;
        share.max_open_files = 16;
        let mut config = VmConfig::new(GuestSpec::Builtin("fuzz".into()));
        config.share = Some(share);
        config.net = NetPolicy {
            bind: vec!["127.0.0.1:*".parse().unwrap()],
            connect: vec!["127.0.0.1:*".parse().unwrap()],
            max_sockets: 16,
            ..NetPolicy::default()
        };
        config.sample_streams = true;
        let ram = Arc::new(GuestRam::new(RAM).unwrap());
        let facts = VcpuFacts {
            index: 0,
            count: 1,
            realtime: true,
            tsc_khz: 0,
            tsc_offset: None,
        };
        let services = Arc::new(Services::new(&config).unwrap());
        let advance = AdvanceMode::Adaptive { max_ns: 500_000 };
        let server = RpcServer::new(facts, ram.clone(), services, advance);
        // Another vCPU of a hostile guest, rewriting the call's arguments
        // all the time, calls in progress included.
        let scribbler = ram.clone();
        std::thread::spawn(move || {
            let mut word = 0x9e37_79b9_7f4a_7c15u64;
            loop {
                for at in (16..64).step_by(8) {
                    word = word.rotate_left(7) ^ 0x5851_f42d;
                    let _ = scribbler.mem().write_obj(word, GuestAddress(PAGE + at));
                }
            }
        });
        Mutex::new(Target { ram, server })
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 5 {
        return;
    }
    let mut target = target().lock().unwrap();
    let Target { ram, server } = &mut *target;
    let (head, rest) = data.split_at(5);
    // Mostly the page the input fills; one input in eight rings any value.
    let doorbell = if head[0] & 7 == 0 {
        u32::from_le_bytes(head[1..5].try_into().unwrap())
    } else {
        (PAGE >> 12) as u32
    };
    let (page, buffers) = rest.split_at(rest.len().min(4096));
    let mem = ram.mem();
    mem.write_slice(page, GuestAddress(PAGE)).unwrap();
    let buffers = &buffers[..buffers.len().min(64 << 10)];
    mem.write_slice(buffers, GuestAddress(BUFFERS)).unwrap();
    let served = server.on_doorbell(doorbell, &mut BriefWait);
    // A call served in the page the input filled leaves a status the ABI
    // defines there.
    if doorbell == (PAGE >> 12) as u32 && served == Doorbell::Served {
        let status: u32 = mem.read_obj(GuestAddress(PAGE + 12)).unwrap();
        assert!(Status::from_u32(status).is_some(), "status {status:#x}");
    }
});

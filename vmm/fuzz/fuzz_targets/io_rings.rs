//! The I/O rings as a hostile guest writes them: any ring header, any
//! submissions, any indices, rewritten between the poller's passes. The
//! poller must never panic, hang or write outside guest RAM (vm-memory
//! checks every access); a ring it cannot make sense of is broken, alone.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use rtvm_abi::ring::{self, field, Sqe};
use rtvm_abi::vmrpc::net;
use rtvm_vmm::config::NetPolicy;
use rtvm_vmm::memory::GuestRam;
use rtvm_vmm::rpc::park::{Interrupted, Park, Parked};
use rtvm_vmm::rpc::Services;
use rtvm_vmm::{GuestSpec, VmConfig};
use vm_memory::{Bytes, GuestAddress};

/// A park whose deadline has always passed: a wait serves, looks, and
/// returns.
struct NoPark;

impl Park for NoPark {
    fn park(&mut self, _: &mut [libc::pollfd], _: u64) -> Result<Parked, Interrupted> {
        Ok(Parked::Deadline)
    }
}

const RAM: u64 = 16 << 20;
const AREA: u64 = 0x10_0000;

/// Guest RAM, kept from one input to the next.
fn ram() -> &'static Arc<GuestRam> {
    static RAM_: OnceLock<Arc<GuestRam>> = OnceLock::new();
    RAM_.get_or_init(|| Arc::new(GuestRam::new(RAM).unwrap()))
}

/// A VM's services, new for each input (a VM holds at most 64 rings), with
/// one real socket: its handle.
fn services() -> (Services, u64) {
    let mut config = VmConfig::new(GuestSpec::Builtin("fuzz".into()));
    config.net = NetPolicy {
        bind: vec!["127.0.0.1:*".parse().unwrap()],
        connect: vec!["127.0.0.1:*".parse().unwrap()],
        ..NetPolicy::default()
    };
    let services = Services::new(&config).unwrap();
    services.sockets.serve_rings();
    let handle = services.sockets.open(net::INET, net::UDP, 0).unwrap()[0];
    services
        .sockets
        .bind(handle, net::v4([127, 0, 0, 1], 0))
        .unwrap();
    (services, handle)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 4 {
        return;
    }
    let ram = ram();
    let (services, handle) = services();
    let mem = ram.mem();
    let (sq, cq) = (1u32 << (data[0] % 6), 1u32 << (data[1] % 6));
    // A well-formed header most of the time, so that setup succeeds and
    // the poller gets to the entries.
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&ring::MAGIC.to_le_bytes());
    header[4..8].copy_from_slice(&ring::VERSION.to_le_bytes());
    header[8..12].copy_from_slice(&sq.to_le_bytes());
    header[12..16].copy_from_slice(&cq.to_le_bytes());
    if data[2] & 0x80 != 0 {
        header[0] ^= data[3];
    }
    let _ = mem.write_slice(&[0u8; 64], GuestAddress(AREA));
    let _ = mem.write_slice(&header, GuestAddress(AREA));
    let rings = services.sockets.rings();
    let Ok([id, ..]) = rings.setup(ram, AREA, u64::from(sq), u64::from(cq)) else {
        return;
    };
    // Submissions from the rest of the input: 64 bytes each, the handle
    // made real when its low bit says so.
    let mut rest = &data[4..];
    let mut n = 0u32;
    while rest.len() >= 64 && n < sq {
        let mut bytes = [0u8; 64];
        bytes.copy_from_slice(&rest[..64]);
        let mut sqe = Sqe::from_bytes(&bytes);
        if sqe.handle & 1 == 1 {
            sqe.handle = handle;
        }
        let at = AREA + ring::SQ_OFFSET + u64::from(n) * ring::ENTRY_SIZE;
        let _ = mem.write_slice(&sqe.to_bytes(), GuestAddress(at));
        rest = &rest[64..];
        n += 1;
    }
    let _ = mem.store(
        n,
        GuestAddress(AREA + field::SQ_TAIL as u64),
        std::sync::atomic::Ordering::SeqCst,
    );
    // Half the inputs hand the submissions to a vCPU's `NetRingWait`
    // (which serves them itself before it parks) instead of the poller.
    if data[2] & 0x40 != 0 {
        let _ = rings.wait(&services.sockets, ram, id, 0, &mut NoPark);
    }
    rings.serve_all(&services.sockets, ram);
    // The guest rewrites both of its indices with whatever is left.
    for chunk in rest.chunks(8).take(4) {
        if chunk.len() == 8 {
            let tail = u32::from_le_bytes(chunk[0..4].try_into().unwrap());
            let head = u32::from_le_bytes(chunk[4..8].try_into().unwrap());
            let _ = mem.store(
                tail,
                GuestAddress(AREA + field::SQ_TAIL as u64),
                std::sync::atomic::Ordering::SeqCst,
            );
            let _ = mem.store(
                head,
                GuestAddress(AREA + field::CQ_HEAD as u64),
                std::sync::atomic::Ordering::SeqCst,
            );
            rings.serve_all(&services.sockets, ram);
        }
    }
    let _ = rings.kick(id);
});

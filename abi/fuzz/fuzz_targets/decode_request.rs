//! The host-side decoder of VMRPC requests, fed whatever a guest could put
//! in a call page and a doorbell. It must never panic, and whatever it
//! accepts must be a valid request that survives a round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rtvm_abi::vmrpc::{self, call_page_address, Request, REQUEST_SIZE};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::decode(data) {
        assert_eq!(req.flags & !vmrpc::flags::ALL, 0);
        let mut page = [0u8; REQUEST_SIZE];
        req.encode(&mut page);
        assert_eq!(Request::decode(&page), Ok(req));
    }
    if data.len() >= 12 {
        let doorbell = u32::from_le_bytes(data[0..4].try_into().unwrap());
        let ram = u64::from_le_bytes(data[4..12].try_into().unwrap());
        if let Some(addr) = call_page_address(doorbell, ram) {
            assert!(addr.checked_add(vmrpc::CALL_PAGE_SIZE as u64).is_some_and(|end| end <= ram));
        }
    }
});

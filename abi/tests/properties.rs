//! Properties of the VMRPC encoding that must hold for any input a guest
//! can produce.

use proptest::prelude::*;
use rtvm_abi::vmrpc::{
    self, buffer_in_ram, call_page_address, Call, Request, Service, Status, REQUEST_SIZE,
};

fn any_call() -> impl Strategy<Value = Call> {
    proptest::sample::select(Call::ALL)
}

#[test]
fn the_tables_are_one_with_the_numbers() {
    for &call in Call::ALL {
        assert_eq!(Call::from_u32(call as u32), Some(call));
        let service = match call.name() {
            name if name.starts_with("Fs") => Service::Files,
            name if name.starts_with("Net") => Service::Net,
            _ => Service::Vcpu,
        };
        assert_eq!(
            call.service(),
            service,
            "{call:?} is in another service's range"
        );
    }
    for &status in Status::ALL {
        assert_eq!(Status::from_u32(status as u32), Some(status));
        assert!(!status.name().is_empty());
    }
    let numbers = (0..100).filter(|&n| Call::from_u32(n).is_some()).count();
    assert_eq!(
        numbers,
        Call::ALL.len(),
        "no number decodes to a call the table lacks"
    );
    assert_eq!(Status::name(Status::NotEmpty), "directory not empty");
}

proptest! {
    #[test]
    fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Request::decode(&bytes);
    }

    #[test]
    fn decoded_requests_are_always_valid(bytes in proptest::collection::vec(any::<u8>(), REQUEST_SIZE)) {
        if let Ok(req) = Request::decode(&bytes) {
            prop_assert_eq!(req.flags & !vmrpc::flags::ALL, 0);
            prop_assert_eq!(Call::from_u32(req.call as u32), Some(req.call));
        }
    }

    #[test]
    fn encode_then_decode_round_trips(call in any_call(), args in any::<[u64; 6]>(), early in any::<bool>()) {
        let flags = if early && call.is_long_poll() { vmrpc::flags::WAIT_ONLY } else { 0 };
        let req = Request { call, flags, args };
        let mut page = [0u8; REQUEST_SIZE];
        req.encode(&mut page);
        prop_assert_eq!(Request::decode(&page), Ok(req));
    }

    #[test]
    fn unknown_flags_are_refused(call in any_call(), bit in 2u32..32) {
        let req = Request { call, flags: 1 << bit, args: [0; 6] };
        let mut page = [0u8; REQUEST_SIZE];
        req.encode(&mut page);
        prop_assert_eq!(Request::decode(&page), Err(Status::BadFlags));
    }

    #[test]
    fn buffer_check_agrees_with_wide_arithmetic(addr in any::<u64>(), len in any::<u64>(), ram in any::<u64>()) {
        let wide = addr as u128 + len as u128 <= ram as u128;
        prop_assert_eq!(buffer_in_ram(addr, len, ram), wide);
    }

    #[test]
    fn call_pages_lie_wholly_in_ram(doorbell in any::<u32>(), ram in 0u64..(1 << 45)) {
        if let Some(addr) = call_page_address(doorbell, ram) {
            prop_assert_eq!(addr % 4096, 0);
            prop_assert!(addr + 4096 <= ram);
        }
    }
}

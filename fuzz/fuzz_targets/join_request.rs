//! Protobuf bytes as a worker's join -> the validated domain type.
#![no_main]
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = tessera_proto::v1::JoinRequest::decode(data) {
        let _ = tessera_common::node::JoinInfo::try_from(req);
    }
    if let Ok(inv) = tessera_proto::v1::Inventory::decode(data) {
        let _ = tessera_common::node::Inventory::try_from(inv);
    }
});

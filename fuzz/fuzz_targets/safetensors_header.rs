//! A safetensors file's first bytes: the 8-byte length and the JSON header.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let n = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let rest = &data[8..];
    // The reader refuses lengths past the file; mirror that here.
    if n as usize <= rest.len() {
        let data_len = (rest.len() - n as usize) as u64;
        if let Ok(t) = tessera_common::model::safetensors::parse_header(&rest[..n as usize], Some(data_len)) {
            let _ = tessera_common::model::safetensors::WeightBytes::from_tensors(64, &t);
        }
    }
});

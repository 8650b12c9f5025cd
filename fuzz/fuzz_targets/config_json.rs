//! config.json text -> ModelDesc -> the planner's rules and estimate: no panic, no runaway allocation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(m) = tessera_common::model::parse_config("fuzz.json", text) {
            let _ = tessera_common::plan::rules::valid_tp_sizes(&m);
            let _ = tessera_common::plan::memory::Weights::estimate(&m);
        }
    }
});

//! `batch::decode` on arbitrary bytes returns a result, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tributary_log::batch::decode(data);
});

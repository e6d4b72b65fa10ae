//! A batch that decodes re-encodes, at its offsets and with its producer fields, to a batch
//! that decodes to the same records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_log::batch::{self, Pending};

fuzz_target!(|data: &[u8]| {
    let Ok((header, records)) = batch::decode(data) else { return };
    let base = header.base_offset;
    let pending = records.iter().map(|r| Pending {
        offset_delta: (r.offset - base) as u32,
        timestamp_ms: r.timestamp_ms,
        key: r.key.as_deref(),
        value: r.value.as_deref(),
        headers: &r.headers,
    });
    let mut again = Vec::new();
    batch::encode_pending(pending, header.producer_id, header.base_sequence, &mut again).expect("what decoded re-encodes");
    batch::set_base_offset(&mut again, base);
    let (again_header, decoded) = batch::decode(&again).expect("a re-encoded batch decodes");
    assert_eq!(decoded, records);
    assert_eq!((again_header.base_offset, again_header.last_offset()), (header.base_offset, header.last_offset()));
    assert_eq!((again_header.producer_id, again_header.base_sequence), (header.producer_id, header.base_sequence));
});

//! A batch that decodes re-encodes, at its offsets and with its producer fields, to a batch
//! that decodes to the same records.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_log::batch;

fuzz_target!(|data: &[u8]| {
    let Ok((header, records)) = batch::decode(data) else { return };
    let mut again = Vec::new();
    batch::encode_stored(&records, header.producer_id, header.base_sequence, &mut again).expect("what decoded re-encodes");
    let (again_header, decoded) = batch::decode(&again).expect("a re-encoded batch decodes");
    assert_eq!(decoded, records);
    assert_eq!((again_header.base_offset, again_header.last_offset()), (header.base_offset, header.last_offset()));
    assert_eq!((again_header.producer_id, again_header.base_sequence), (header.producer_id, header.base_sequence));
});

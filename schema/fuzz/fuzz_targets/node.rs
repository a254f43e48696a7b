//! Messages between gate nodes over arbitrary bytes: the envelope and the message never panic,
//! what decodes encodes back to the same bytes, and `encoded_len` (by which senders fill
//! batches and pack the relay's requests and answers) is exactly what it takes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use schema::node::{Envelope, NodeMsg};

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = Envelope::parse(data) {
        assert_eq!(e.header.len() + e.sealed.len(), data.len());
    }
    if let Ok(m) = NodeMsg::decode(data) {
        assert_eq!(m.to_bytes(), data);
        assert_eq!(m.encoded_len(), data.len());
    }
});

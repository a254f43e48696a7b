//! Messages between gate nodes over arbitrary bytes: the envelope and the message never panic,
//! what decodes encodes back to the same bytes, and the relay's requests and answers take
//! exactly the bytes their `wire_len` says (senders pack messages by it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use schema::node::{Envelope, NodeMsg};

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = Envelope::parse(data) {
        assert_eq!(e.header.len() + e.sealed.len(), data.len());
    }
    if let Ok(m) = NodeMsg::decode(data) {
        assert_eq!(m.to_bytes(), data);
        // Kind byte and count, then the items.
        let items = match &m {
            NodeMsg::Requests(rs) => Some(rs.iter().map(|r| r.wire_len()).sum::<usize>()),
            NodeMsg::Answers(a) => Some(a.iter().map(|a| a.wire_len()).sum::<usize>()),
            _ => None,
        };
        if let Some(n) = items {
            assert_eq!(1 + 4 + n, data.len());
        }
    }
});

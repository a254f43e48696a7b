//! The secure channel's `Transport::open` on hostile records: a sequence of bodies, each a
//! genuine record (any of them, in any order, maybe changed) or raw bytes. A body opens exactly
//! when it is the genuine record for the next nonce: no tampered, replayed, reordered or forged
//! record ever opens, and no genuine one in order is refused.
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run channel_open` in schema/.
#![no_main]

use std::sync::OnceLock;

use channel::Transport;
use libfuzzer_sys::fuzz_target;

const N: usize = 8;

/// The first N records the app side seals under fixed keys (bodies only) and their plaintexts.
fn genuine() -> &'static Vec<(Vec<u8>, Vec<u8>)> {
    static G: OnceLock<Vec<(Vec<u8>, Vec<u8>)>> = OnceLock::new();
    G.get_or_init(|| {
        let mut app = Transport::from_keys([0xa1; 32], [0xb2; 32]);
        (0..N)
            .map(|i| {
                let plain = vec![i as u8; i * 7];
                let mut wire = Vec::new();
                app.seal_into(&plain, &mut wire).unwrap();
                (wire[3..].to_vec(), plain)
            })
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let g = genuine();
    let mut gate = Transport::from_keys([0xb2; 32], [0xa1; 32]);
    let mut plain = Vec::new();
    let mut input = data;
    // Each step: op byte, then for raw bytes a length byte and the bytes.
    while let Some((&op, rest)) = input.split_first() {
        input = rest;
        let body = match op >> 6 {
            // A genuine record, maybe out of order.
            0 | 1 => g[op as usize % N].0.clone(),
            // A genuine record with one byte changed.
            2 => {
                let Some((&at, rest)) = input.split_first() else { return };
                input = rest;
                let mut b = g[op as usize % N].0.clone();
                let i = at as usize % b.len();
                b[i] ^= (op & 0x3f) | 1;
                b
            }
            // Raw bytes.
            _ => {
                let Some((&len, rest)) = input.split_first() else { return };
                let take = (len as usize).min(rest.len());
                input = &rest[take..];
                rest[..take].to_vec()
            }
        };
        let n = gate.received() as usize;
        let expected = g.get(n).filter(|(b, _)| *b == body);
        let before = plain.len();
        match gate.open_into(&body, &mut plain) {
            Ok(len) => {
                let (_, want) = expected.expect("only the genuine record for the next nonce opens");
                assert_eq!(&plain[before..], &want[..]);
                assert_eq!(len, want.len());
            }
            Err(_) => {
                assert!(expected.is_none(), "the genuine record for the next nonce was refused");
                assert_eq!(plain.len(), before, "a refused record appends nothing");
                assert_eq!(gate.received() as usize, n, "a refused record takes no nonce");
            }
        }
    }
});

//! The secure channel's record reader over arbitrary bytes cut at arbitrary points: it never
//! panics, and records read in pieces are the records read in one go.
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run channel_records` in schema/.
#![no_main]

use channel::record::{RecordReader, RecordType};
use libfuzzer_sys::fuzz_target;

/// Every record of `stream` fed in chunks of `chunk` bytes, up to the first error.
fn read(stream: &[u8], chunk: usize, max_body: u16) -> (Vec<(RecordType, Vec<u8>)>, Option<String>) {
    let mut reader = RecordReader::with_max_body(max_body);
    let mut out = Vec::new();
    for piece in stream.chunks(chunk) {
        let mut input = piece;
        loop {
            match reader.next(&mut input) {
                Ok(Some(r)) => {
                    assert!(r.body.len() <= max_body as usize);
                    out.push((r.kind, r.body.to_vec()));
                }
                Ok(None) => break,
                Err(e) => return (out, Some(e.to_string())),
            }
        }
        assert!(input.is_empty(), "a piece is used up before next returns None");
    }
    (out, reader.finish().err().map(|e| e.to_string()))
}

fuzz_target!(|data: &[u8]| {
    // First byte: chunk size; second: a small body limit now and then, to reach TooLong often.
    let Some((&[c, m], stream)) = data.split_first_chunk::<2>() else { return };
    let max_body = if m < 32 { m as u16 * 16 } else { channel::record::MAX_BODY as u16 };
    let whole = read(stream, stream.len().max(1), max_body);
    let pieces = read(stream, c as usize % 17 + 1, max_body);
    assert_eq!(whole, pieces);
});

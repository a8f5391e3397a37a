//! The chunked decoder (RFC 9112 §7.1) on arbitrary bytes: whatever the
//! input, no panic, and the verdict does not depend on how the bytes
//! arrived. The first byte picks where reads are split; the rest is the
//! body as sent. Decoded whole and decoded in those pieces, the data, the
//! end and any error must be the same: a decoder that read a split
//! differently from a whole buffer would frame a request two ways.
#![no_main]

use abgate_http1::framing::{Chunked, Step};
use bytes::BytesMut;

/// Feeds `pieces` in turn; the data decoded, and how it stopped.
fn decode<'a>(pieces: impl Iterator<Item = &'a [u8]>) -> (Vec<u8>, Result<bool, &'static str>) {
    let mut state = Chunked::START;
    let mut buffer = BytesMut::new();
    let mut data = Vec::new();
    for piece in pieces {
        buffer.extend_from_slice(piece);
        loop {
            match state.step(&mut buffer) {
                Ok(Step::Data(bytes)) => data.extend_from_slice(&bytes),
                Ok(Step::End) => return (data, Ok(true)),
                Ok(Step::More) => break,
                Err(error) => return (data, Err(error)),
            }
        }
    }
    (data, Ok(false))
}

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    let Some((&split, body)) = input.split_first() else {
        return;
    };
    let whole = decode(std::iter::once(body));
    let size = usize::from(split % 16) + 1;
    let pieces = decode(body.chunks(size));
    assert_eq!(whole.1, pieces.1, "the verdict depends on the reads");
    assert_eq!(whole.0, pieces.0, "the data depends on the reads");
});

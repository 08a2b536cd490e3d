//! Bytes on a data port: the length prefix and the body decode or are
//! refused without panicking, whatever decodes encodes back to itself, and
//! activations are checked against the model without overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lime_schemas::frame::{Frame, PREFIX_BYTES};

fuzz_target!(|data: &[u8]| {
    if let Some(prefix) = data.get(..PREFIX_BYTES) {
        let _ = Frame::body_len(prefix.try_into().expect("four bytes"));
    }
    let Ok(frame) = Frame::decode(data) else {
        return;
    };
    if let Frame::Activations(a) = &frame {
        for (hidden, context) in [(1, 1), (64, 2048), (8192, 131_072), (usize::MAX, usize::MAX)] {
            let _ = a.check(hidden, context);
        }
        let _ = a.tokens();
    }
    if let Ok(bytes) = frame.encode() {
        let body = &bytes[PREFIX_BYTES..];
        assert_eq!(Frame::decode(body).expect("an encoded frame decodes"), frame);
    }
});

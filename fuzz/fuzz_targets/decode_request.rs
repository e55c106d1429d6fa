//! Arbitrary bytes into `decode::<Request>`: it must never panic, overflow its stack
//! or accept another major version, and whatever it accepts must survive a re-encode.

#![no_main]

use keelson_protocol::codec::MAX_MESSAGE_BYTES;
use keelson_protocol::{Request, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(request) = decode::<Request>(data) else {
        return;
    };
    assert!(request.v.is_compatible(), "accepted version {}", request.v);
    let bytes = encode(&request).expect("a decoded request encodes");
    // A positional (array) input can grow when re-encoded with named fields.
    if bytes.len() <= MAX_MESSAGE_BYTES {
        let again = decode::<Request>(&bytes).expect("a re-encoded request decodes");
        assert_eq!(again, request);
    }
});

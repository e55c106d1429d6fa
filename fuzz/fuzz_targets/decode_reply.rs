//! Arbitrary bytes into `decode::<Reply>`: it must never panic, overflow its stack
//! or accept another major version, and whatever it accepts must survive a re-encode.

#![no_main]

use keelson_protocol::codec::MAX_MESSAGE_BYTES;
use keelson_protocol::{Reply, decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(reply) = decode::<Reply>(data) else {
        return;
    };
    assert!(reply.v.is_compatible(), "accepted version {}", reply.v);
    let bytes = encode(&reply).expect("a decoded reply encodes");
    // A positional (array) input can grow when re-encoded with named fields.
    if bytes.len() <= MAX_MESSAGE_BYTES {
        let again = decode::<Reply>(&bytes).expect("a re-encoded reply decodes");
        assert_eq!(again, reply);
    }
});

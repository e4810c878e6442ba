//! Bytes a client could write to emberd's control socket, through the
//! server's own framing and request parsing
//! ([`supervisor::control::decode_stream`]). The first byte sets how the
//! rest is cut into reads (1–256 bytes each), as a socket may deliver it.
//! Must never panic, overflow the stack or return a frame over the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use supervisor::control::decode_stream;
use supervisor::varlink::Call;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let chunks = rest.chunks(usize::from(cut) + 1);
    if let Ok(calls) = decode_stream(chunks) {
        for d in calls {
            // What was accepted encodes back to a call with the same method,
            // flags and parameter names (numbers may not round-trip
            // exactly: serde_json parses long decimals to the nearest
            // float only approximately).
            let wire = d.call.encode();
            let again = Call::parse(&wire[..wire.len() - 1]).unwrap();
            assert_eq!(again.method, d.call.method);
            assert_eq!(
                (again.more, again.oneway, again.upgrade),
                (d.call.more, d.call.oneway, d.call.upgrade)
            );
            assert!(again.parameters.keys().eq(d.call.parameters.keys()));
        }
    }
});

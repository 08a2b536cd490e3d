//! A request payload as any MQTT client can publish it: parsing and checking
//! never panic, and a valid request survives a round trip through JSON
//! unchanged. (An invalid one need not: a number too large for f32 parses as
//! infinity, which JSON writes as null.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use lime_schemas::Request;

fuzz_target!(|payload: &[u8]| {
    let Ok(request) = Request::parse(payload) else {
        return;
    };
    let _ = request.sampling();
    if request.validate().is_err() {
        return;
    }
    let again = serde_json::to_vec(&request).expect("a parsed request serialises");
    let reparsed = Request::parse(&again).expect("a serialised request parses");
    assert_eq!(reparsed, request);
    assert!(reparsed.validate().is_ok());
});

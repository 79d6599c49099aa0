//! Fuzzes the API's request parser: `METHOD PATH\n` then the body, any bytes at all.
//!
//! Beyond "never panics", it checks what the server relies on: every error is a 4xx with
//! one non-empty line, and every accepted migration survives a round trip through the JSON
//! a client would send.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::api::{ApiRequest, MigrateBody, parse_request};

fuzz_target!(|data: &[u8]| {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let head = String::from_utf8_lossy(head);
    let (method, path) = head.split_once(' ').unwrap_or((&head, "/"));
    match parse_request(method, path, body) {
        Ok(ApiRequest::Migrate(request)) => {
            let echo = MigrateBody::from_request(&request);
            assert_eq!(echo.validate().ok().as_ref(), Some(&*request));
            let json = serde_json::to_vec(&echo).unwrap();
            match parse_request("PUT", "/memory/migrate", &json) {
                Ok(ApiRequest::Migrate(again)) => assert_eq!(again, request),
                other => panic!("the echo of an accepted request was refused: {other:?}"),
            }
        }
        Ok(_) => {}
        Err(e) => {
            assert!(
                (400..500).contains(&e.status()),
                "{e:?} is not a client error"
            );
            let sentence = e.sentence();
            assert!(
                !sentence.is_empty() && !sentence.contains('\n'),
                "{sentence:?}"
            );
            assert!(
                sentence.len() < 1024,
                "an error echoes too much: {}",
                sentence.len()
            );
        }
    }
});

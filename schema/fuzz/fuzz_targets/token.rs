//! Login and resume token verification over arbitrary bytes: never panics, never accepts without the secret.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let r = schema::token::verify(b"fuzz-secret", data, 0);
    if let Ok(c) = r {
        // Only a token signed with the secret verifies; re-issuing must give the same bytes.
        assert_eq!(&schema::token::issue(b"fuzz-secret", c)[..], data);
    }
    if let Ok(c) = schema::token::verify_resume(b"fuzz-secret", data) {
        assert_eq!(&schema::token::issue_resume(b"fuzz-secret", c)[..], data);
    }
});

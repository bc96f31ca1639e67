//! CONNECT targets from arbitrary bytes: never a panic; what parses prints back the same way.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(target) = portcullis::policy::host::Target::parse_authority(text) {
            let again = portcullis::policy::host::Target::parse_authority(&target.to_string()).unwrap();
            assert_eq!(again, target);
        }
    }
});

//! The SNI peek must never panic, and any name it reports must be a valid DNS name; the same
//! for the second ClientHello after a HelloRetryRequest, and the hello's record length is
//! within the input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portcullis::gateway::sni::{Hello, hello_records_len, parse, parse_after_retry};
use portcullis::policy::host::DnsName;

fuzz_target!(|data: &[u8]| {
    if let Some(Hello::Name(name)) = parse(data) {
        assert!(DnsName::parse(name.as_str()).is_ok());
    }
    if let Some(Hello::Name(name)) = parse_after_retry(data) {
        assert!(DnsName::parse(name.as_str()).is_ok());
    }
    if let Some(len) = hello_records_len(data) {
        assert!(len <= data.len());
    }
});

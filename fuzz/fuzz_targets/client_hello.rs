//! The SNI peek must never panic, and any name it reports must be a valid DNS name.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(portcullis::gateway::sni::Hello::Name(name)) = portcullis::gateway::sni::parse(data) {
        assert!(portcullis::policy::host::DnsName::parse(name.as_str()).is_ok());
    }
});

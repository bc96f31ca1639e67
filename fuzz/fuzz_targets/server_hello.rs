//! The upstream's first flight, as the SNI check reads it to see a HelloRetryRequest: never a
//! panic, and a verdict once given stands whatever bytes follow (the gateway decides on the
//! bytes read so far).
#![no_main]
use libfuzzer_sys::fuzz_target;
use portcullis::gateway::hello_retry::parse;

fuzz_target!(|data: &[u8]| {
    let verdict = parse(data);
    for cut in [data.len() / 3, data.len() / 2, data.len().saturating_sub(1)] {
        if let Some(early) = parse(&data[..cut]) {
            assert_eq!(verdict, Some(early));
        }
    }
});

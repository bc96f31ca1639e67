//! Bounded fuzzing inside `cargo test` for the byte parsers that read what clients and
//! upstreams send (the ClientHello peek, the HelloRetryRequest check): seeds from real peers,
//! mutated (bit flips, truncation, inserted junk) or replaced by random bytes, deterministic.
//! Longer runs: fuzz/ with cargo fuzz.

/// Calls `check` on `rounds` inputs derived from `seeds` (a fixed pseudo-random sequence
/// from `seed`, so a failure repeats).
pub fn each_mutation(seeds: &[Vec<u8>], rounds: usize, seed: u64, mut check: impl FnMut(&[u8])) {
    let mut state = seed;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..rounds {
        let mut input = seeds[round % seeds.len()].clone();
        match next() % 4 {
            0 => {
                for _ in 0..1 + next() % 8 {
                    let i = (next() as usize) % input.len();
                    input[i] ^= 1 << (next() % 8);
                }
            }
            1 => input.truncate((next() as usize) % input.len()),
            2 => {
                let i = (next() as usize) % input.len();
                let junk: Vec<u8> = (0..1 + next() % 64).map(|_| next() as u8).collect();
                input.splice(i..i, junk);
            }
            _ => input = (0..(next() % 2048)).map(|_| next() as u8).collect(),
        }
        check(&input);
    }
}

//! Proxy passwords as the config stores them: argon2id PHC strings, parsed once when the
//! config is compiled (parameters, salt and expected output), so a credential check runs
//! argon2 and a constant-time comparison and nothing else. No password is ever kept. A check
//! works in memory its caller lends (`verify_in`), so the gateway can bound what all checks
//! together hold.

use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use std::fmt;

/// One user's stored password.
#[derive(Clone)]
pub struct StoredPassword {
    argon2: Argon2<'static>,
    /// The salt's raw bytes (decoded from the PHC string's base64 once).
    salt: Vec<u8>,
    expected: Output,
    blocks: usize,
}

impl StoredPassword {
    /// Parses an argon2id PHC string (`$argon2id$v=19$m=...,t=...,p=...$salt$hash`).
    pub fn parse(phc: &str) -> Result<Self, &'static str> {
        const EXPECTED: &str = "expected an argon2id hash (see `portcullis hash-password`)";
        let hash = PasswordHash::new(phc).map_err(|_| EXPECTED)?;
        if hash.algorithm.as_str() != "argon2id" {
            return Err(EXPECTED);
        }
        let params = Params::try_from(&hash).map_err(|_| EXPECTED)?;
        let version = match hash.version {
            None => Version::default(),
            Some(v) => Version::try_from(v).map_err(|_| EXPECTED)?,
        };
        let mut salt = [0u8; 64];
        let salt = hash
            .salt
            .and_then(|s| s.decode_b64(&mut salt).ok())
            .ok_or(EXPECTED)?
            .to_vec();
        let expected = hash.hash.ok_or(EXPECTED)?;
        let blocks = params.block_count();
        Ok(Self {
            argon2: Argon2::new(Algorithm::Argon2id, version, params),
            salt,
            expected,
            blocks,
        })
    }

    /// Bytes of memory one check takes (`m_cost` KiB).
    pub fn memory_bytes(&self) -> usize {
        self.blocks * std::mem::size_of::<Block>()
    }

    /// Whether `password` is this one, working in `memory` (grown to this hash's size when
    /// smaller, then kept for the next check). Slow by design: run it off the async workers.
    pub fn verify_in(&self, password: &str, memory: &mut Vec<Block>) -> bool {
        if memory.len() < self.blocks {
            memory.resize(self.blocks, Block::default());
        }
        let mut out = [0u8; 64];
        let out = &mut out[..self.expected.len()];
        self.argon2
            .hash_password_into_with_memory(password.as_bytes(), &self.salt, out, &mut memory[..])
            .ok()
            .and_then(|()| Output::new(out).ok())
            // `Output`'s equality is constant-time.
            .is_some_and(|output| output == self.expected)
    }

    /// Whether `other` is the same stored password (same salt and hash: a reload that kept a
    /// user's password).
    pub fn same_as(&self, other: &StoredPassword) -> bool {
        self.salt == other.salt && self.expected == other.expected && self.blocks == other.blocks
    }

    /// `verify_in` with memory of its own.
    pub fn verify(&self, password: &str) -> bool {
        self.verify_in(password, &mut Vec::new())
    }
}

impl fmt::Debug for StoredPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StoredPassword(argon2id)")
    }
}

/// An argon2id PHC string for `password` with a fresh random salt (`portcullis hash-password`).
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt)
        .map_err(|_| "no system randomness".to_owned())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_parse_and_verify_round_trip() {
        let phc = hash_password("correct horse").unwrap();
        assert!(phc.starts_with("$argon2id$"), "{phc}");
        let stored = StoredPassword::parse(&phc).unwrap();
        assert!(stored.verify("correct horse"));
        assert!(!stored.verify("wrong horse"));
        assert_ne!(
            phc,
            hash_password("correct horse").unwrap(),
            "fresh salt each time"
        );
        assert_eq!(format!("{stored:?}"), "StoredPassword(argon2id)");
        // The memory a check lends is sized once and kept.
        let mut memory = Vec::new();
        assert!(stored.verify_in("correct horse", &mut memory));
        assert_eq!(memory.len() * 1024, stored.memory_bytes());
        assert!(!stored.verify_in("wrong horse", &mut memory));
    }

    #[test]
    fn only_argon2id_phc_strings_are_stored_passwords() {
        for bad in [
            "plaintext",
            "",
            "$argon2i$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ",
        ] {
            assert!(StoredPassword::parse(bad).is_err(), "{bad:?}");
        }
    }
}

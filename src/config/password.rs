//! Proxy passwords as the config stores them: argon2id PHC strings, parsed once when the
//! config is compiled (parameters, salt and expected output), so a credential check runs
//! argon2 and a constant-time comparison and nothing else. No password is ever kept.

use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use std::fmt;

/// One user's stored password.
#[derive(Clone)]
pub struct StoredPassword {
    argon2: Argon2<'static>,
    salt: SaltString,
    expected: Output,
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
        let salt = hash
            .salt
            .and_then(|s| SaltString::from_b64(s.as_str()).ok())
            .ok_or(EXPECTED)?;
        let expected = hash.hash.ok_or(EXPECTED)?;
        Ok(Self {
            argon2: Argon2::new(Algorithm::Argon2id, version, params),
            salt,
            expected,
        })
    }

    /// Whether `password` is this one (slow by design: run it off the async workers).
    pub fn verify(&self, password: &str) -> bool {
        self.argon2
            .hash_password(password.as_bytes(), self.salt.as_salt())
            .ok()
            .and_then(|h| h.hash)
            // `Output`'s equality is constant-time.
            .is_some_and(|output| output == self.expected)
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

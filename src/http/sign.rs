//! Signed requests, the Standard Webhooks way
//! (standard-webhooks/standard-webhooks, `spec/standard-webhooks.md`): a
//! receiver that knows the endpoint's secret can check that a request came
//! from outboxd, that its body was not changed, and that it is fresh.
//!
//! - A secret is `whsec_` followed by the base64 of 24 to 64 random bytes,
//!   the key.
//! - Each request is signed over `"{webhook-id}.{webhook-timestamp}.{body}"`
//!   with HMAC-SHA256, over the exact body bytes sent.
//! - `webhook-signature` carries `v1,<base64 of the MAC>`, one per active
//!   secret, separated by spaces, so a receiver holding either the old or the
//!   new secret accepts requests while a secret is rotated.
//!
//! The MAC comes from the `hmac` and `sha2` crates; nothing here compares
//! signatures (receivers do).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// What every serialised secret starts with.
pub const SECRET_PREFIX: &str = "whsec_";

/// The key's length in bytes, as the specification allows.
pub const KEY_BYTES: std::ops::RangeInclusive<usize> = 24..=64;

/// The length of the keys outboxd generates: 32 bytes, 256 bits.
pub const GENERATED_KEY_BYTES: usize = 32;

/// An endpoint's signing key. Its `Debug` shows the fingerprint only, and it
/// has no `Display`: the secret cannot end up in a log line by accident.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.fingerprint())
    }
}

/// Why a text is not a signing secret. Never quotes the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("a signing secret starts with {SECRET_PREFIX}")]
    Prefix,
    #[error("the part after {SECRET_PREFIX} is not base64")]
    Base64,
    #[error("the key is {0} bytes; it must be 24 to 64")]
    Length(usize),
}

impl SigningKey {
    /// Reads a serialised secret (`whsec_…`), surrounding whitespace
    /// ignored (a secret file ends with a newline).
    pub fn parse(text: &str) -> Result<SigningKey, SecretError> {
        let encoded = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::Prefix)?;
        let key = STANDARD.decode(encoded).map_err(|_| SecretError::Base64)?;
        if !KEY_BYTES.contains(&key.len()) {
            return Err(SecretError::Length(key.len()));
        }
        Ok(SigningKey(key))
    }

    /// A new random key (OpenSSL's CSPRNG) and its serialised form, which
    /// is shown once and stored.
    pub fn generate() -> Result<(SigningKey, String), String> {
        let mut key = vec![0u8; GENERATED_KEY_BYTES];
        openssl::rand::rand_bytes(&mut key).map_err(|e| format!("no random bytes: {e}"))?;
        let text = format!("{SECRET_PREFIX}{}", STANDARD.encode(&key));
        Ok((SigningKey(key), text))
    }

    /// What may be shown of a key: the first 8 bytes of the SHA-256 of the
    /// key, in hex. It tells keys apart and reveals nothing usable.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(&self.0);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mac = self.mac(id, timestamp, body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }

    /// The MAC over what the specification signs: `"{id}.{timestamp}.{body}"`.
    fn mac(&self, id: &str, timestamp: i64, body: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }
}

/// How far a request's `webhook-timestamp` may be from the receiver's clock,
/// either way, as the specification's libraries allow: 5 minutes.
pub const TOLERANCE_SECS: i64 = 5 * 60;

/// Why a receiver refuses a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing {0}")]
    Missing(&'static str),
    #[error("webhook-timestamp is not a number of seconds")]
    Timestamp,
    #[error("webhook-timestamp is {0} s away from now (more than 5 minutes)")]
    OutOfTolerance(i64),
    #[error("no signature in webhook-signature matches")]
    NoMatch,
}

impl SigningKey {
    /// Checks a request as a receiver does: the timestamp within
    /// [`TOLERANCE_SECS`] of `now`, and one of the `v1` signatures in
    /// `signatures` made with this key over `"{id}.{timestamp}.{body}"`.
    /// The comparison is the `hmac` crate's, in constant time.
    pub fn verify(
        &self,
        id: Option<&str>,
        timestamp: Option<&str>,
        signatures: Option<&str>,
        body: &[u8],
        now: i64,
    ) -> Result<(), VerifyError> {
        let id = id.ok_or(VerifyError::Missing("webhook-id"))?;
        let timestamp = timestamp.ok_or(VerifyError::Missing("webhook-timestamp"))?;
        let signatures = signatures.ok_or(VerifyError::Missing("webhook-signature"))?;
        let timestamp: i64 = timestamp
            .trim()
            .parse()
            .map_err(|_| VerifyError::Timestamp)?;
        let off = now.saturating_sub(timestamp);
        if off.abs() > TOLERANCE_SECS {
            return Err(VerifyError::OutOfTolerance(off));
        }
        let mac = self.mac(id, timestamp, body);
        let matches = signatures
            .split(' ')
            .filter_map(|one| one.strip_prefix("v1,"))
            .filter_map(|encoded| STANDARD.decode(encoded).ok())
            .any(|given| mac.clone().verify_slice(&given).is_ok());
        if matches {
            Ok(())
        } else {
            Err(VerifyError::NoMatch)
        }
    }
}

/// The `webhook-signature` header for `keys`: one signature each, in order,
/// separated by spaces. None without keys (the endpoint does not sign).
pub fn signature_header(
    keys: &[SigningKey],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> Option<String> {
    if keys.is_empty() {
        return None;
    }
    Some(
        keys.iter()
            .map(|key| key.sign(id, timestamp, body))
            .collect::<Vec<_>>()
            .join(" "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector the specification's reference libraries test against
    /// (libraries/go/webhook_test.go and the others in
    /// standard-webhooks/standard-webhooks).
    #[test]
    fn the_published_test_vector_signs_as_published() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert_eq!(
            key.sign(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn every_active_key_signs_in_turn_space_separated() {
        let old = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let (new, _) = SigningKey::generate().unwrap();
        let body = br#"{"test": 2432232314}"#;
        let header = signature_header(
            &[new.clone(), old.clone()],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
        )
        .unwrap();
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1], "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_eq!(
            parts[0],
            new.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
        );
        assert_eq!(signature_header(&[], "id", 1, body), None);
        // Another body, id or time: another signature.
        assert_ne!(
            old.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265331, body),
            parts[1]
        );
        assert_ne!(old.sign("msg_other", 1614265330, body), parts[1]);
        assert_ne!(
            old.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b"{}"),
            parts[1]
        );
    }

    #[test]
    fn a_receiver_accepts_what_was_signed_and_nothing_else() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let (other, _) = SigningKey::generate().unwrap();
        let (id, ts, body) = (
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        let both = signature_header(&[other.clone(), key.clone()], id, ts, body).unwrap();
        let ts_text = ts.to_string();
        let check = |sigs: &str, body: &[u8], now: i64| {
            key.verify(Some(id), Some(&ts_text), Some(sigs), body, now)
        };
        use VerifyError::*;
        // (signatures, body, the receiver's clock, verdict)
        type Case<'a> = (&'a str, &'a [u8], i64, Result<(), VerifyError>);
        let table: [Case; 7] = [
            (
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
                body,
                ts,
                Ok(()),
            ),
            (&both, body, ts + 299, Ok(())),
            (&both, body, ts - 300, Ok(())),
            (&both, b"{\"test\": 2432232315}", ts, Err(NoMatch)),
            (&both, body, ts + 301, Err(OutOfTolerance(301))),
            (
                "v1a,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
                body,
                ts,
                Err(NoMatch),
            ),
            ("v1,not base64", body, ts, Err(NoMatch)),
        ];
        for (sigs, body, now, want) in table {
            assert_eq!(check(sigs, body, now), want, "{sigs} at {now}");
        }
        assert_eq!(
            other.verify(
                Some(id),
                Some(&ts_text),
                Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="),
                body,
                ts
            ),
            Err(NoMatch)
        );
        assert_eq!(
            key.verify(None, Some("1"), Some("v1,x"), body, 1),
            Err(Missing("webhook-id"))
        );
        assert_eq!(
            key.verify(Some(id), Some("soon"), Some("v1,x"), body, 1),
            Err(Timestamp)
        );
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        let sixteen = format!("whsec_{}", STANDARD.encode([7u8; 16]));
        let sixty_five = format!("whsec_{}", STANDARD.encode([7u8; 65]));
        let table: [(&str, Result<usize, SecretError>); 7] = [
            ("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", Ok(24)),
            ("  whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n", Ok(24)),
            ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", Err(SecretError::Prefix)),
            ("whsec_not base64!", Err(SecretError::Base64)),
            ("whsec_", Err(SecretError::Length(0))),
            (&sixteen, Err(SecretError::Length(16))),
            (&sixty_five, Err(SecretError::Length(65))),
        ];
        for (text, want) in table {
            assert_eq!(SigningKey::parse(text).map(|k| k.0.len()), want, "{text:?}");
        }
        let (key, text) = SigningKey::generate().unwrap();
        assert_eq!(SigningKey::parse(&text).unwrap(), key);
        assert_eq!(key.0.len(), GENERATED_KEY_BYTES);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&text[SECRET_PREFIX.len()..]), "{shown}");
        assert_eq!(key.fingerprint().len(), 16);
        assert_ne!(
            key.fingerprint(),
            SigningKey::generate().unwrap().0.fingerprint()
        );
    }
}

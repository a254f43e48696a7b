//! Login tokens: issued by the app-server, verified by the gate, with a shared secret.
//!
//! ```text
//! offset size field
//!      0    1 version      1
//!      1    8 uid          u64 LE
//!      9    1 role         Role (1 driver, 2 passenger)
//!     10    8 expires_ms   u64 LE, ms since the Unix epoch
//!     18   32 mac          HMAC-SHA256(secret, "fleetgate-token-v1" || bytes 0..18)
//! ```
//! The uid and role a session gets come from here only, never from anything else the app sends.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Length of an encoded token.
pub const TOKEN_LEN: usize = 50;
const SIGNED_LEN: usize = 18;
const TOKEN_VERSION: u8 = 1;
const DOMAIN: &[u8] = b"fleetgate-token-v1";

/// What a verified token says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub uid: u64,
    /// `wire::Role` value: 1 driver, 2 passenger.
    pub role: u8,
    /// Expiry, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Wrong length, version or role.
    #[error("malformed token")]
    Malformed,
    /// The MAC did not verify under this gate's secret.
    #[error("token signature does not verify")]
    BadSignature,
    /// Signed correctly but past its expiry.
    #[error("token expired")]
    Expired,
}

fn mac(secret: &[u8], domain: &[u8], signed: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("hmac takes any key length");
    m.update(domain);
    m.update(signed);
    m
}

/// Issues a token (the app-server's side; the tests and loadgen use it too).
pub fn issue(secret: &[u8], claims: Claims) -> [u8; TOKEN_LEN] {
    let mut t = [0u8; TOKEN_LEN];
    t[0] = TOKEN_VERSION;
    t[1..9].copy_from_slice(&claims.uid.to_le_bytes());
    t[9] = claims.role;
    t[10..18].copy_from_slice(&claims.expires_ms.to_le_bytes());
    let tag = mac(secret, DOMAIN, &t[..SIGNED_LEN]).finalize().into_bytes();
    t[SIGNED_LEN..].copy_from_slice(&tag);
    t
}

/// Verifies a token at time `now_ms`. The MAC is checked in constant time, before expiry, so an
/// unsigned token learns nothing.
pub fn verify(secret: &[u8], token: &[u8], now_ms: u64) -> Result<Claims, TokenError> {
    if token.len() != TOKEN_LEN || token[0] != TOKEN_VERSION {
        return Err(TokenError::Malformed);
    }
    mac(secret, DOMAIN, &token[..SIGNED_LEN])
        .verify_slice(&token[SIGNED_LEN..])
        .map_err(|_| TokenError::BadSignature)?;
    let uid = u64::from_le_bytes(token[1..9].try_into().expect("8 bytes"));
    let role = token[9];
    let expires_ms = u64::from_le_bytes(token[10..18].try_into().expect("8 bytes"));
    if !(1..=2).contains(&role) {
        return Err(TokenError::Malformed);
    }
    if expires_ms <= now_ms {
        return Err(TokenError::Expired);
    }
    Ok(Claims { uid, role, expires_ms })
}

/// An HMAC-SHA256 tag over `parts` with a domain string; for other signed values (resume tokens).
pub fn sign_parts(secret: &[u8], domain: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = mac(secret, domain, &[]);
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Length of a resume token.
pub const RESUME_TOKEN_LEN: usize = 37;
const RESUME_SIGNED_LEN: usize = 21;
const RESUME_DOMAIN: &[u8] = b"fleetgate-resume-v1";

/// What a verified resume token says. Opaque to apps; issued by the gate in every Session.
///
/// ```text
/// offset size field
///      0    1 version   1
///      1    8 uid       u64 LE
///      9    8 epoch     u64 LE: the session it belongs to
///     17    4 resumes   u32 LE: valid only while the session has resumed this many times
///     21   16 mac       first 16 bytes of HMAC-SHA256(secret, "fleetgate-resume-v1" || 0..21)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeClaims {
    /// The user.
    pub uid: u64,
    /// The session's epoch.
    pub epoch: u64,
    /// The session's resume count when the token was issued (rotation: one use).
    pub resumes: u32,
}

/// Issues a resume token.
pub fn issue_resume(secret: &[u8], c: ResumeClaims) -> [u8; RESUME_TOKEN_LEN] {
    let mut t = [0u8; RESUME_TOKEN_LEN];
    t[0] = TOKEN_VERSION;
    t[1..9].copy_from_slice(&c.uid.to_le_bytes());
    t[9..17].copy_from_slice(&c.epoch.to_le_bytes());
    t[17..21].copy_from_slice(&c.resumes.to_le_bytes());
    let tag = mac(secret, RESUME_DOMAIN, &t[..RESUME_SIGNED_LEN]).finalize().into_bytes();
    t[RESUME_SIGNED_LEN..].copy_from_slice(&tag[..16]);
    t
}

/// Verifies a resume token's MAC (in constant time). Whether it is current is the session's
/// call: its epoch and resume count must match.
pub fn verify_resume(secret: &[u8], token: &[u8]) -> Result<ResumeClaims, TokenError> {
    if token.len() != RESUME_TOKEN_LEN || token[0] != TOKEN_VERSION {
        return Err(TokenError::Malformed);
    }
    mac(secret, RESUME_DOMAIN, &token[..RESUME_SIGNED_LEN])
        .verify_truncated_left(&token[RESUME_SIGNED_LEN..])
        .map_err(|_| TokenError::BadSignature)?;
    Ok(ResumeClaims {
        uid: u64::from_le_bytes(token[1..9].try_into().expect("8 bytes")),
        epoch: u64::from_le_bytes(token[9..17].try_into().expect("8 bytes")),
        resumes: u32::from_le_bytes(token[17..21].try_into().expect("4 bytes")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"test-secret";

    #[test]
    fn round_trip() {
        let c = Claims { uid: 42, role: 1, expires_ms: 2_000 };
        let t = issue(SECRET, c);
        assert_eq!(verify(SECRET, &t, 1_000), Ok(c));
    }

    #[test]
    fn refuses_forgery_expiry_and_garbage() {
        let c = Claims { uid: 42, role: 1, expires_ms: 2_000 };
        let mut t = issue(SECRET, c);
        assert_eq!(verify(b"other", &t, 1_000), Err(TokenError::BadSignature));
        assert_eq!(verify(SECRET, &t, 2_000), Err(TokenError::Expired));
        assert_eq!(verify(SECRET, &t[..49], 0), Err(TokenError::Malformed));
        t[1] ^= 1; // another uid, same MAC
        assert_eq!(verify(SECRET, &t, 1_000), Err(TokenError::BadSignature));
        let bad_role = issue(SECRET, Claims { role: 7, ..c });
        assert_eq!(verify(SECRET, &bad_role, 1_000), Err(TokenError::Malformed));
    }

    #[test]
    fn resume_tokens_verify_and_refuse_forgery() {
        let c = ResumeClaims { uid: 9, epoch: 77, resumes: 3 };
        let mut t = issue_resume(SECRET, c);
        assert_eq!(verify_resume(SECRET, &t), Ok(c));
        assert_eq!(verify_resume(b"other", &t), Err(TokenError::BadSignature));
        t[17] ^= 1; // claim another resume count
        assert_eq!(verify_resume(SECRET, &t), Err(TokenError::BadSignature));
        assert_eq!(verify_resume(SECRET, &t[..36]), Err(TokenError::Malformed));
        // A login token is not a resume token.
        let login = issue(SECRET, Claims { uid: 9, role: 1, expires_ms: 5 });
        assert!(verify_resume(SECRET, &login).is_err());
    }
}

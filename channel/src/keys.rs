//! Static X25519 keys: the gate's key pair, its rotation, key ids and key files
//! (docs/PROTOCOL.md §14.5).
//!
//! Key files are one line of text:
//!
//! ```text
//! fleetgate-key-v1 private <64 hex digits>     the gate's private key (keep it secret, mode 0600)
//! fleetgate-key-v1 public <64 hex digits>      the public key apps are built with
//! ```

use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use snow::params::DHChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver};
use thiserror::Error;

/// Length of an X25519 key, private or public.
pub const KEY_LEN: usize = 32;

/// An X25519 public key.
pub type PublicKey = [u8; KEY_LEN];

/// The first 8 bytes of SHA-256 of a public key: names the gate key a Hello was made for.
pub type KeyId = [u8; 8];

/// First word of every key file; a new format gets a new word.
pub const KEY_FILE_MAGIC: &str = "fleetgate-key-v1";

/// The development private key: the 32 ASCII bytes `fleetgate-dev-channel-key-public`.
///
/// **Public and insecure**: it is printed here, so anyone can decrypt and impersonate a gate that
/// uses it. It exists so that a gate and its apps work out of the box in development, like the
/// development token secret; never use it in production.
pub const DEV_PRIVATE_KEY: [u8; KEY_LEN] = *b"fleetgate-dev-channel-key-public";

/// The public half of [`DEV_PRIVATE_KEY`].
pub const DEV_PUBLIC_KEY: PublicKey = [
    0xde, 0x06, 0x8f, 0x06, 0xee, 0xd6, 0xc4, 0x8e, 0x6a, 0x54, 0x85, 0xb6, 0x90, 0xc3, 0x49, 0xed, 0x03,
    0x46, 0xbf, 0x54, 0x0c, 0xc2, 0xbc, 0x7f, 0xde, 0xe1, 0x4e, 0xd2, 0x5a, 0xf4, 0x73, 0x4d,
];

/// `key_id` of a public key: SHA-256(public)[..8].
pub fn key_id(public: &PublicKey) -> KeyId {
    let d = ring::digest::digest(&ring::digest::SHA256, public);
    let mut id = [0; 8];
    id.copy_from_slice(&d.as_ref()[..8]);
    id
}

/// An X25519 static key pair. `Debug` shows the public half only.
#[derive(Clone, PartialEq, Eq)]
pub struct Keypair {
    private: [u8; KEY_LEN],
    public: PublicKey,
}

impl fmt::Debug for Keypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keypair").field("public", &hex(&self.public)).field("private", &"<hidden>").finish()
    }
}

impl Keypair {
    /// A new random key pair (snow's `generate_keypair`, from the system's random source).
    pub fn generate() -> Keypair {
        let kp = snow::Builder::new(crate::handshake::ik_params())
            .generate_keypair()
            // Only a missing resolver or RNG fails here, and snow's default resolver has both.
            .expect("snow's resolver provides X25519 and a random source");
        let mut private = [0; KEY_LEN];
        private.copy_from_slice(&kp.private);
        let mut public = [0; KEY_LEN];
        public.copy_from_slice(&kp.public);
        Keypair { private, public }
    }

    /// The key pair of a private key (the public half is derived from it).
    pub fn from_private(private: [u8; KEY_LEN]) -> Keypair {
        let mut dh = DefaultResolver
            .resolve_dh(&DHChoice::Curve25519)
            .expect("snow's default resolver provides X25519");
        dh.set(&private);
        let mut public = [0; KEY_LEN];
        public.copy_from_slice(dh.pubkey());
        Keypair { private, public }
    }

    /// The development key pair ([`DEV_PRIVATE_KEY`]): public knowledge, insecure.
    pub fn dev() -> Keypair {
        Keypair { private: DEV_PRIVATE_KEY, public: DEV_PUBLIC_KEY }
    }

    /// True for the development key pair, so a gate can warn loudly.
    pub fn is_dev(&self) -> bool {
        self.public == DEV_PUBLIC_KEY
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    pub fn private(&self) -> &[u8; KEY_LEN] {
        &self.private
    }

    /// [`key_id`] of the public half.
    pub fn key_id(&self) -> KeyId {
        key_id(&self.public)
    }

    /// The private key file's text: `fleetgate-key-v1 private <hex>\n`.
    pub fn private_file_text(&self) -> String {
        format!("{KEY_FILE_MAGIC} private {}\n", hex(&self.private))
    }

    /// The public key file's text: `fleetgate-key-v1 public <hex>\n`.
    pub fn public_file_text(&self) -> String {
        public_file_text(&self.public)
    }

    /// Writes the private key file, readable by its owner only (mode 0600). Refuses to replace
    /// an existing file, so a key in use is never overwritten by accident.
    pub fn save_private(&self, path: &Path) -> Result<(), KeyError> {
        write_new(path, self.private_file_text().as_bytes(), 0o600)
    }

    /// Writes the public key file (mode 0644). Refuses to replace an existing file.
    pub fn save_public(&self, path: &Path) -> Result<(), KeyError> {
        write_new(path, self.public_file_text().as_bytes(), 0o644)
    }
}

/// The public key file's text for `public`.
pub fn public_file_text(public: &PublicKey) -> String {
    format!("{KEY_FILE_MAGIC} public {}\n", hex(public))
}

/// A key file could not be read or written, or is not a key file of the expected kind.
#[derive(Debug, Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("not a fleetgate key file: expected one line `{KEY_FILE_MAGIC} {expected} <64 hex digits>`")]
    Format { expected: &'static str },
    #[error("this is a {found} key file; a {expected} key file is needed here")]
    WrongKind { expected: &'static str, found: &'static str },
    #[error("the key must be 64 hex digits (32 bytes); found {0} characters")]
    BadLength(usize),
    #[error("the key has a character that is not a hex digit")]
    BadHex,
    #[error("{path}: {source}")]
    InFile { path: PathBuf, source: Box<KeyError> },
}

/// Parses the text of a private key file.
pub fn parse_private(text: &str) -> Result<Keypair, KeyError> {
    parse(text, "private").map(Keypair::from_private)
}

/// Parses the text of a public key file.
pub fn parse_public(text: &str) -> Result<PublicKey, KeyError> {
    parse(text, "public")
}

/// Reads and parses a private key file.
pub fn load_private(path: &Path) -> Result<Keypair, KeyError> {
    parse_private(&read(path)?).map_err(|e| in_file(path, e))
}

/// Reads and parses a public key file.
pub fn load_public(path: &Path) -> Result<PublicKey, KeyError> {
    parse_public(&read(path)?).map_err(|e| in_file(path, e))
}

fn in_file(path: &Path, e: KeyError) -> KeyError {
    KeyError::InFile { path: path.to_owned(), source: Box::new(e) }
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Io { path: path.to_owned(), source })
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeyError> {
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| KeyError::Io { path: path.to_owned(), source };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(io)?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io)
}

fn parse(text: &str, expected: &'static str) -> Result<[u8; KEY_LEN], KeyError> {
    let mut words = text.split_ascii_whitespace();
    let (Some(magic), Some(kind), Some(key), None) = (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(KeyError::Format { expected });
    };
    if magic != KEY_FILE_MAGIC || text.trim_end().contains('\n') {
        return Err(KeyError::Format { expected });
    }
    match kind {
        k if k == expected => {}
        "private" => return Err(KeyError::WrongKind { expected, found: "private" }),
        "public" => return Err(KeyError::WrongKind { expected, found: "public" }),
        _ => return Err(KeyError::Format { expected }),
    }
    unhex(key)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Result<[u8; KEY_LEN], KeyError> {
    if s.len() != 2 * KEY_LEN {
        return Err(KeyError::BadLength(s.chars().count()));
    }
    let digit = |c: u8| (c as char).to_digit(16).ok_or(KeyError::BadHex);
    let mut out = [0; KEY_LEN];
    for (o, pair) in out.iter_mut().zip(s.as_bytes().chunks_exact(2)) {
        *o = (digit(pair[0])? * 16 + digit(pair[1])?) as u8;
    }
    Ok(out)
}

/// The gate's static keys: the current pair, and during a rotation the previous one until it
/// expires. A Hello names its key by [`KeyId`]; one made for the previous key is still answered,
/// and the Accept tells the app the current public key (docs/PROTOCOL.md §14.5).
#[derive(Debug, Clone)]
pub struct KeyRing {
    current: Keypair,
    current_id: KeyId,
    previous: Option<PreviousKey>,
}

/// A key pair being retired: Hellos made for it are answered until `expires_ms`.
#[derive(Debug, Clone)]
pub struct PreviousKey {
    pub keypair: Keypair,
    pub id: KeyId,
    /// On the clock the caller passes as `now_ms` (the gate uses wall-clock milliseconds).
    pub expires_ms: u64,
}

/// Which key of a [`KeyRing`] a Hello was made for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhichKey {
    Current,
    Previous,
}

impl KeyRing {
    pub fn new(current: Keypair) -> KeyRing {
        KeyRing { current_id: current.key_id(), current, previous: None }
    }

    /// A ring that still answers Hellos for `previous` until `expires_ms`.
    pub fn with_previous(current: Keypair, previous: Keypair, expires_ms: u64) -> KeyRing {
        let mut ring = KeyRing::new(current);
        ring.previous = Some(PreviousKey { id: previous.key_id(), keypair: previous, expires_ms });
        ring
    }

    /// Makes `next` the current key; the current one becomes the previous until `expires_ms`
    /// (an older previous key is dropped).
    pub fn rotate(&mut self, next: Keypair, expires_ms: u64) {
        let old = std::mem::replace(self, KeyRing::new(next));
        self.previous = Some(PreviousKey { keypair: old.current, id: old.current_id, expires_ms });
    }

    pub fn current(&self) -> &Keypair {
        &self.current
    }

    pub fn previous(&self) -> Option<&PreviousKey> {
        self.previous.as_ref()
    }

    /// The key a Hello with this id was made for, if the ring still answers it at `now_ms`.
    pub fn find(&self, id: &KeyId, now_ms: u64) -> Option<(&Keypair, WhichKey)> {
        if *id == self.current_id {
            return Some((&self.current, WhichKey::Current));
        }
        match &self.previous {
            Some(p) if p.id == *id && now_ms < p.expires_ms => Some((&p.keypair, WhichKey::Previous)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_public_key_is_derived_from_the_dev_private_key() {
        assert_eq!(Keypair::from_private(DEV_PRIVATE_KEY).public, DEV_PUBLIC_KEY, "{}", hex(&DEV_PUBLIC_KEY));
        assert!(Keypair::dev().is_dev());
    }

    #[test]
    fn generated_pairs_are_consistent_and_distinct() {
        let a = Keypair::generate();
        let b = Keypair::generate();
        assert_ne!(a.public, b.public);
        assert_eq!(Keypair::from_private(a.private).public, a.public);
        assert!(!format!("{a:?}").contains(&hex(&a.private)));
    }

    #[test]
    fn key_files_round_trip() {
        let kp = Keypair::generate();
        assert_eq!(parse_private(&kp.private_file_text()).unwrap(), kp);
        assert_eq!(parse_public(&kp.public_file_text()).unwrap(), kp.public);
        // Upper-case hex, no newline, extra spaces: all fine.
        let text = format!("  {KEY_FILE_MAGIC}   public {}", hex(&kp.public).to_uppercase());
        assert_eq!(parse_public(&text).unwrap(), kp.public);
    }

    #[test]
    fn key_file_errors_say_what_is_wrong() {
        let kp = Keypair::dev();
        let e = parse_private(&kp.public_file_text()).unwrap_err();
        assert_eq!(e.to_string(), "this is a public key file; a private key file is needed here");
        assert!(matches!(parse_public(&kp.private_file_text()), Err(KeyError::WrongKind { .. })));
        assert!(matches!(parse_public(""), Err(KeyError::Format { .. })));
        assert!(matches!(parse_public("ssh-ed25519 AAAA x"), Err(KeyError::Format { .. })));
        assert!(matches!(
            parse_public(&format!("{KEY_FILE_MAGIC} public abcd")),
            Err(KeyError::BadLength(4))
        ));
        let bad = format!("{KEY_FILE_MAGIC} public {}", "zz".repeat(32));
        assert!(matches!(parse_public(&bad), Err(KeyError::BadHex)));
        let two = format!("{}{}", kp.public_file_text(), kp.public_file_text());
        assert!(matches!(parse_public(&two), Err(KeyError::Format { .. })));
        // Multi-byte characters count as characters, and never panic the slicing.
        let wide = format!("{KEY_FILE_MAGIC} public {}", "é".repeat(32));
        assert!(matches!(parse_public(&wide), Err(KeyError::BadHex)));
        let e = parse_public(&format!("{KEY_FILE_MAGIC} secret {}", "00".repeat(32))).unwrap_err();
        assert!(e.to_string().contains("fleetgate-key-v1 public <64 hex digits>"), "{e}");
    }

    #[test]
    fn key_files_on_disk() {
        let dir = std::env::temp_dir().join(format!("fleetgate-channel-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (private, public) = (dir.join("gate.key"), dir.join("gate.pub"));
        let _ = std::fs::remove_file(&private);
        let _ = std::fs::remove_file(&public);
        let kp = Keypair::generate();
        kp.save_private(&private).unwrap();
        kp.save_public(&public).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&private).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_private(&private).unwrap(), kp);
        assert_eq!(load_public(&public).unwrap(), kp.public);
        assert!(matches!(kp.save_private(&private), Err(KeyError::Io { .. })), "never overwrites");
        let e = load_private(&public).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!("{}: this is a public key file", public.display())),
            "{e}"
        );
        let e = load_public(&dir.join("missing.pub")).unwrap_err();
        assert!(e.to_string().contains("missing.pub"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn key_ring_finds_current_and_unexpired_previous() {
        let (old, new) = (Keypair::generate(), Keypair::generate());
        let mut ring = KeyRing::new(old.clone());
        assert_eq!(ring.find(&old.key_id(), 0).unwrap().1, WhichKey::Current);
        assert!(ring.find(&new.key_id(), 0).is_none());
        ring.rotate(new.clone(), 1_000);
        assert_eq!(ring.find(&new.key_id(), 0).unwrap().1, WhichKey::Current);
        let (k, which) = ring.find(&old.key_id(), 999).unwrap();
        assert_eq!((k, which), (&old, WhichKey::Previous));
        assert!(ring.find(&old.key_id(), 1_000).is_none(), "expired");
        assert_eq!(key_id(&DEV_PUBLIC_KEY), Keypair::dev().key_id());
    }
}

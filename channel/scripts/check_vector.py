#!/usr/bin/env python3
"""Recomputes the secure channel's test vector (docs/PROTOCOL.md §14.8) from the text of §14 and
the Noise specification alone: X25519, ChaCha20-Poly1305 and SHA-256 from Python's
`cryptography` package, no Noise library, no code shared with channel/.

    python3 channel/scripts/check_vector.py [docs/PROTOCOL.md]

Prints OK and exits 0 when every block matches; exits 1 on a mismatch, 2 when `cryptography`
is missing. channel's tests run it when python3 and `cryptography` are there.
"""

import hashlib
import hmac
import pathlib
import re
import struct
import sys

try:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives import serialization
except ImportError:
    print("python package `cryptography` missing", file=sys.stderr)
    sys.exit(2)

PROLOGUE = b"fleetgate-channel-v1"
RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def pub(private):
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(*RAW)


def dh(private, public):
    return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))


def sha256(b):
    return hashlib.sha256(b).digest()


def hmac256(k, b):
    return hmac.new(k, b, hashlib.sha256).digest()


def hkdf_noise(ck, ikm, n):
    """Noise's HKDF(chaining_key, input_key_material, num_outputs)."""
    t = hmac256(ck, ikm)
    out, prev = [], b""
    for i in range(1, n + 1):
        prev = hmac256(t, prev + bytes([i]))
        out.append(prev)
    return out


def nonce(n):
    return b"\0\0\0\0" + struct.pack("<Q", n)


class Symmetric:
    """Noise's SymmetricState and CipherState for ChaChaPoly and SHA256."""

    def __init__(self, name):
        name = name.encode()
        self.h = name.ljust(32, b"\0") if len(name) <= 32 else sha256(name)
        self.ck = self.h
        self.k, self.n = None, 0

    def mix_hash(self, b):
        self.h = sha256(self.h + b)

    def mix_key(self, ikm):
        self.ck, k = hkdf_noise(self.ck, ikm, 2)
        self.k, self.n = k, 0

    def mix_key_and_hash(self, ikm):
        self.ck, th, k = hkdf_noise(self.ck, ikm, 3)
        self.mix_hash(th)
        self.k, self.n = k, 0

    def encrypt_and_hash(self, pt):
        ct = pt if self.k is None else ChaCha20Poly1305(self.k).encrypt(nonce(self.n), pt, self.h)
        self.n += self.k is not None
        self.mix_hash(ct)
        return ct

    def split(self):
        return hkdf_noise(self.ck, b"", 2)


def record(kind, body):
    return bytes([kind]) + struct.pack(">H", len(body)) + body


def data(key, n, pt):
    return record(5, ChaCha20Poly1305(key).encrypt(nonce(n), pt, b""))


def resume_secret(h):
    prk = hmac256(b"", h)  # HKDF-Extract, empty salt
    return hmac256(prk, b"fleetgate resume v1" + b"\x01")  # HKDF-Expand, one block


def seq(start):
    return bytes(range(start, start + 32))


def login(gate_s, app_s, app_e, gate_e):
    gate_pub = pub(gate_s)
    # App: Noise_IK message 1 (-> e, es, s, ss).
    st = Symmetric("Noise_IK_25519_ChaChaPoly_SHA256")
    st.mix_hash(PROLOGUE)
    st.mix_hash(gate_pub)  # pre-message <- s
    msg = pub(app_e)
    st.mix_hash(pub(app_e))
    st.mix_key(dh(app_e, gate_pub))
    msg += st.encrypt_and_hash(pub(app_s))
    st.mix_key(dh(app_s, gate_pub))
    msg += st.encrypt_and_hash(b"login")
    hello = record(1, bytes([1]) + sha256(gate_pub)[:8] + msg)
    # Gate: message 2 (<- e, ee, se), computed from the app's side of the DH pairs.
    msg = pub(gate_e)
    st.mix_hash(pub(gate_e))
    st.mix_key(dh(app_e, pub(gate_e)))
    st.mix_key(dh(app_s, pub(gate_e)))
    msg += st.encrypt_and_hash(b"\x00" + b"session")
    accept = record(3, msg)
    k1, k2 = st.split()
    return hello, accept, k1, k2, resume_secret(st.h)


def resume(psk, app_e, gate_e):
    st = Symmetric("Noise_NNpsk0_25519_ChaChaPoly_SHA256")
    st.mix_hash(PROLOGUE)
    st.mix_key_and_hash(psk)  # psk0
    msg = pub(app_e)
    st.mix_hash(pub(app_e))
    st.mix_key(pub(app_e))  # psk handshakes: e also mixes the key
    msg += st.encrypt_and_hash(b"resume")
    rid = b"session-42"
    resume_hello = record(2, bytes([1, len(rid)]) + rid + msg)
    msg = pub(gate_e)
    st.mix_hash(pub(gate_e))
    st.mix_key(pub(gate_e))
    st.mix_key(dh(app_e, pub(gate_e)))
    msg += st.encrypt_and_hash(b"\x00" + b"session2")
    accept = record(3, msg)
    k1, k2 = st.split()
    return resume_hello, accept, k1, k2, resume_secret(st.h)


def blocks(doc):
    section = doc[doc.index("### 14.8") :]
    found = {}
    for m in re.finditer(r"\n([A-Za-z0-9 ]+) \(\d+ bytes[^\n]*\n```\n([0-9a-f \n]+)```", section):
        found[m.group(1)] = bytes.fromhex(m.group(2).replace("\n", " "))
    return found


def main():
    root = pathlib.Path(__file__).resolve().parents[2]
    doc = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else root / "docs" / "PROTOCOL.md").read_text()
    want = blocks(doc)
    gate_s = b"fleetgate-dev-channel-key-public"
    app_s = seq(0x20)
    hello, accept, k1, k2, secret1 = login(gate_s, app_s, seq(0x40), seq(0x60))
    resume_hello, resume_accept, r1, _, secret2 = resume(secret1, seq(0x80), seq(0xA0))
    got = {
        "gate static public": pub(gate_s),
        "app static public": pub(app_s),
        "Hello": hello,
        "Accept": accept,
        "confirm": data(k1, 0, b""),
        "app Data": data(k1, 1, b"gps"),
        "gate Data": data(k2, 0, b"push"),
        "secret1": secret1,
        "ResumeHello": resume_hello,
        "resume Accept": resume_accept,
        "resume confirm": data(r1, 0, b""),
        "secret2": secret2,
    }
    bad = [name for name in got if want.get(name) != got[name]]
    for name in bad:
        print(f"{name}: document {want.get(name, b'(missing)').hex()}\n{' ' * len(name)}  computed {got[name].hex()}")
    if bad:
        sys.exit(1)
    print(f"OK: {len(got)} blocks of §14.8 recomputed")


if __name__ == "__main__":
    main()

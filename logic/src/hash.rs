//! The hasher for the shard's maps keyed by uid (and by uid and sequence-id).
//!
//! std's default (SipHash with a random key) guards a map against keys an attacker chooses.
//! These keys are not chosen by anyone untrusted: a uid comes from a token the gate verified or
//! from the app-server, a sequence-id from the shard itself. So the maps on every GPS point,
//! delivery and ack take a multiplicative hash instead, several times cheaper.

/// A `BuildHasher` for uids: one multiplication by the golden-ratio constant (`shard_of` uses it
/// too), with the high half folded in before and after it.
#[derive(Clone, Copy, Debug, Default)]
pub struct UidHash;

/// The hasher of [`UidHash`]: a u64 (a uid), optionally followed by a u32 (a sequence-id).
#[derive(Clone, Copy, Debug, Default)]
pub struct UidHasher(u64);

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

impl std::hash::BuildHasher for UidHash {
    type Hasher = UidHasher;
    fn build_hasher(&self) -> UidHasher {
        UidHasher(0)
    }
}

impl std::hash::Hasher for UidHasher {
    fn finish(&self) -> u64 {
        // The high half folded in before and after the multiplication: the product's low bits
        // (which hashbrown indexes by) then depend on every bit of the key. `x * GOLDEN` folded
        // only after put uids that differ only above bit 40 in 16 buckets of 4,096.
        let x = self.0 ^ (self.0 >> 32);
        let h = x.wrapping_mul(GOLDEN);
        h ^ (h >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ b as u64;
        }
    }
    fn write_u64(&mut self, n: u64) {
        // A single u64 is the state itself; a later word is mixed in after a multiplication.
        self.0 = self.0.wrapping_mul(GOLDEN) ^ n;
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// Sequential uids, uids that differ only in their high bits (ids issued with a prefix per
    /// region or fleet), and one uid's sequential sequence-ids all spread over the buckets of a
    /// power-of-two table (hashbrown indexes by the low bits): a hash without the fold, or
    /// without the multiplication, puts one kind of them in a handful of buckets.
    #[test]
    fn keys_spread_over_buckets() {
        let buckets = 1u64 << 12;
        let spread = |hashes: Vec<u64>| {
            let mut seen = std::collections::HashSet::new();
            hashes.into_iter().filter(|h| seen.insert(h & (buckets - 1))).count()
        };
        // A random hash fills about 63 % of the buckets with as many keys as buckets.
        let enough = buckets as usize / 2;
        let sequential = spread((0..buckets).map(|u| UidHash.hash_one(u)).collect());
        let high_bits = [16, 32, 40, 52]
            .map(|shift| spread((0..buckets).map(|u| UidHash.hash_one(u << shift)).collect()))
            .into_iter()
            .min()
            .expect("four shifts");
        let pairs = spread((0..buckets as u32).map(|s| UidHash.hash_one((42u64, s))).collect());
        assert!(sequential > enough, "sequential uids over {sequential} of {buckets} buckets");
        assert!(high_bits > enough, "high-bit uids over {high_bits} of {buckets} buckets");
        assert!(pairs > enough, "one uid's sequence-ids over {pairs} of {buckets} buckets");
        assert_ne!(UidHash.hash_one((1u64, 2u32)), UidHash.hash_one((2u64, 1u32)));
    }
}

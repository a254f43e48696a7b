//! What lives in Redis, and the scripts that change it: key names, how an owner is stored, the
//! Lua sources, and the parsing of their replies. No I/O here.

use fred::types::Value;

use crate::Owner;

/// The set of node names, so a node can find the others' leases. Names whose lease lapsed are
/// removed by whoever notices; a live node adds itself back at every renewal.
pub const NODES_KEY: &str = "fg:nodes";

/// The directory entry of `uid`: a hash `{node, epoch, shard}`. The braces are a Redis Cluster
/// hash tag, so any later per-uid key (`fg:q:{uid}`, …) can share the entry's slot.
pub fn uid_key(uid: u64) -> String {
    format!("fg:u:{{{uid}}}")
}

/// The channel node `name` hears other nodes on (sharded pub/sub: on a Redis Cluster it lives
/// on the primary of its slot only, not broadcast to every primary).
pub fn node_channel(name: &str) -> String {
    format!("fg:n:{{{name}}}")
}

/// The lease of node `name`: its [`crate::NodeInfo`] as JSON, with a time-to-live of `lease_ms`.
pub fn lease_key(name: &str) -> String {
    format!("fg:node:{name}")
}

/// Width of a stored epoch: every epoch is written as exactly 20 decimal digits (zero-padded),
/// enough for any `u64`.
pub const EPOCH_DIGITS: usize = 20;

/// An epoch as it is stored: zero-padded to [`EPOCH_DIGITS`]. Lua compares two of them as two
/// 10-digit halves, each below 2^53, so the comparison is exact for the whole `u64` range.
pub fn epoch_text(epoch: u64) -> String {
    format!("{epoch:0width$}", width = EPOCH_DIGITS)
}

/// Shared by the scripts: `cmp(a, b)` of two stored epochs (-1, 0, 1), exact for 20-digit
/// strings (each half is at most 9,999,999,999 < 2^53, so `tonumber` holds it exactly); an
/// entry whose epoch is not 20 digits is refused rather than compared wrongly.
const LUA_PRELUDE: &str = r#"
local function cmp(a, b)
  local ah, bh = tonumber(string.sub(a, 1, 10)), tonumber(string.sub(b, 1, 10))
  if ah ~= bh then if ah < bh then return -1 else return 1 end end
  local al, bl = tonumber(string.sub(a, 11)), tonumber(string.sub(b, 11))
  if al ~= bl then if al < bl then return -1 else return 1 end end
  return 0
end
local function sane(e)
  if type(e) ~= 'string' or #e ~= 20 or not string.match(e, '^%d+$') then
    return redis.error_reply('fg: bad epoch in ' .. KEYS[1])
  end
end
local cur = redis.call('HMGET', KEYS[1], 'node', 'epoch', 'shard')
if cur[2] then local bad = sane(cur[2]); if bad then return bad end end
"#;

/// Claim: KEYS = [uid key]; ARGV = [node, epoch, shard]. Returns `{won, node, epoch, shard}`:
/// when won, the entry it replaced (all false when there was none, or when the entry already was
/// this very claim: a retry, or a re-registration after Redis came back); when lost, the
/// current owner. Wins iff the entry is absent or its epoch is smaller (an equal epoch of
/// another node loses).
const CLAIM_BODY: &str = r#"
if cur[1] and cur[2] then
  if cur[1] == ARGV[1] and cur[2] == ARGV[2] then
    if cur[3] ~= ARGV[3] then redis.call('HSET', KEYS[1], 'shard', ARGV[3]) end
    return {1, false, false, false}
  end
  if cmp(ARGV[2], cur[2]) <= 0 then
    return {0, cur[1], cur[2], cur[3]}
  end
end
redis.call('HSET', KEYS[1], 'node', ARGV[1], 'epoch', ARGV[2], 'shard', ARGV[3])
if cur[1] and cur[2] then return {1, cur[1], cur[2], cur[3]} end
return {1, false, false, false}
"#;

/// Move: KEYS = [uid key]; ARGV = [from node, from epoch, node, new epoch, shard]. Applies iff
/// the entry is exactly (from node, from epoch) and the new epoch is not smaller (a move never
/// lowers an epoch; a session taken over keeps its own). Returns `{ok, node, epoch, shard}` with the entry as it now stands. A
/// repeat of a move that already applied (the entry is (node, new epoch)) answers ok.
const MOVE_BODY: &str = r#"
if cur[1] == ARGV[3] and cur[2] == ARGV[4] then
  return {1, cur[1], cur[2], cur[3]}
end
if cur[1] == ARGV[1] and cur[2] == ARGV[2] and cmp(ARGV[4], ARGV[2]) >= 0 then
  redis.call('HSET', KEYS[1], 'node', ARGV[3], 'epoch', ARGV[4], 'shard', ARGV[5])
  return {1, ARGV[3], ARGV[4], ARGV[5]}
end
return {0, cur[1], cur[2], cur[3]}
"#;

/// Release: KEYS = [uid key]; ARGV = [node, epoch]. Deletes the entry iff it is exactly
/// (node, epoch). Returns 1 when deleted, else 0.
const RELEASE_BODY: &str = r#"
if cur[1] == ARGV[1] and cur[2] == ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// The three scripts' full sources (prelude + body).
pub fn claim_lua() -> String {
    format!("{LUA_PRELUDE}{CLAIM_BODY}")
}
/// See [`claim_lua`].
pub fn move_lua() -> String {
    format!("{LUA_PRELUDE}{MOVE_BODY}")
}
/// See [`claim_lua`].
pub fn release_lua() -> String {
    format!("{LUA_PRELUDE}{RELEASE_BODY}")
}

/// A reply did not have the shape the scripts return.
#[derive(Debug, PartialEq, Eq)]
pub struct BadReply(pub String);

fn text(v: &Value) -> Option<String> {
    if v.is_null() {
        None
    } else {
        v.as_str().map(|s| s.into_owned())
    }
}

/// Parses `[node, epoch, shard]` (each nil when absent) into an owner; all nil is `None`.
pub fn owner_from(fields: &[Value]) -> Result<Option<Owner>, BadReply> {
    let [node, epoch, shard] = fields else {
        return Err(BadReply(format!("expected 3 fields, got {}", fields.len())));
    };
    let (node, epoch, shard) = (text(node), text(epoch), text(shard));
    match (node, epoch) {
        (None, None) => Ok(None),
        (Some(node), Some(epoch)) => {
            let epoch = epoch.parse::<u64>().map_err(|_| BadReply(format!("bad epoch {epoch:?}")))?;
            // A missing shard (an entry written by hand) reads as shard 0 rather than failing.
            let shard = match shard {
                Some(s) => s.parse::<u16>().map_err(|_| BadReply(format!("bad shard {s:?}")))?,
                None => 0,
            };
            Ok(Some(Owner { node, epoch, shard }))
        }
        (node, epoch) => Err(BadReply(format!("half an entry: node {node:?}, epoch {epoch:?}"))),
    }
}

/// Parses a claim's or move's `{flag, node, epoch, shard}`.
pub fn flag_and_owner(v: Value) -> Result<(bool, Option<Owner>), BadReply> {
    let items = v.into_array();
    let Some((flag, rest)) = items.split_first() else {
        return Err(BadReply("empty reply".into()));
    };
    let flag = match flag.as_i64() {
        Some(1) => true,
        Some(0) => false,
        _ => return Err(BadReply(format!("bad flag {flag:?}"))),
    };
    Ok((flag, owner_from(rest)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_epochs_are_laid_out_as_documented() {
        assert_eq!(uid_key(42), "fg:u:{42}");
        assert_eq!(lease_key("gate-a"), "fg:node:gate-a");
        assert_eq!(epoch_text(7), "00000000000000000007");
        assert_eq!(epoch_text(u64::MAX).len(), EPOCH_DIGITS);
        // Fixed width keeps the digit halves aligned, which is what the Lua comparison needs.
        assert!(epoch_text(1 << 50) > epoch_text((1 << 50) - 1));
    }

    #[test]
    fn replies_parse_into_owners() {
        let v = Value::Array(vec![
            Value::Integer(0),
            Value::from("gate-a"),
            Value::from(epoch_text(1 << 49)),
            Value::from("3"),
        ]);
        let (flag, owner) = flag_and_owner(v).unwrap();
        assert!(!flag);
        assert_eq!(owner, Some(Owner { node: "gate-a".into(), epoch: 1 << 49, shard: 3 }));
        let none = Value::Array(vec![Value::Integer(1), Value::Null, Value::Null, Value::Null]);
        assert_eq!(flag_and_owner(none).unwrap(), (true, None));
        let half = [Value::from("gate-a"), Value::Null, Value::Null];
        assert!(owner_from(&half).is_err());
        assert!(flag_and_owner(Value::Array(vec![])).is_err());
    }
}

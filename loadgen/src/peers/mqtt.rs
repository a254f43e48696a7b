//! Just enough MQTT 3.1.1 for a benchmark client: CONNECT / CONNACK, PUBLISH at QoS 0,
//! SUBSCRIBE / SUBACK, PINGREQ / PINGRESP and DISCONNECT. No I/O: encoders append to a caller's
//! buffer, and [`parse`] reads one packet from the front of whatever bytes a broker sent.
//!
//! What a broker sends is network input and never trusted: the remaining length is checked
//! against its 4-byte limit and against [`MAX_PACKET`], every inner length against the packet,
//! and packets only a client may send are refused.

/// Largest packet accepted from a broker. Ours carry GPS points and pushes of at most 16 KiB;
/// anything much larger is a broker gone wrong, and bounding it bounds the read buffer.
pub const MAX_PACKET: usize = 64 * 1024;

/// MQTT's packet types (the high nibble of the first byte).
const CONNECT: u8 = 1;
const CONNACK: u8 = 2;
const PUBLISH: u8 = 3;
const PUBACK: u8 = 4;
const PUBREC: u8 = 5;
const PUBREL: u8 = 6;
const PUBCOMP: u8 = 7;
const SUBSCRIBE: u8 = 8;
const SUBACK: u8 = 9;
const UNSUBACK: u8 = 11;
const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
const DISCONNECT: u8 = 14;

/// One packet a broker sent, borrowing from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// The answer to CONNECT; `code` 0 is accepted.
    ConnAck {
        /// The broker kept an earlier session (never, with a clean session).
        session_present: bool,
        /// Return code: 0 accepted, 1–5 refused for the reason MQTT names.
        code: u8,
    },
    /// A message on a subscribed topic.
    Publish {
        /// The topic it was published to.
        topic: &'a [u8],
        /// Its QoS (0 for everything this client subscribes to).
        qos: u8,
        /// The packet id (QoS 1 and 2 only).
        packet_id: Option<u16>,
        /// The application payload.
        payload: &'a [u8],
    },
    /// The answer to SUBSCRIBE: one return code per filter (0x80: refused).
    SubAck {
        /// Echo of the SUBSCRIBE's packet id.
        packet_id: u16,
        /// Granted QoS per filter, or 0x80.
        codes: &'a [u8],
    },
    /// The answer to PINGREQ.
    PingResp,
    /// An acknowledgement this client never asks for (PUBACK, PUBREC, PUBREL, PUBCOMP,
    /// UNSUBACK): well formed, ignored.
    Other {
        /// Its packet type.
        kind: u8,
    },
}

/// Why bytes from a broker are not MQTT this client can read; the connection must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The remaining length used a fifth byte.
    #[error("remaining length longer than 4 bytes")]
    BadLength,
    /// The packet is larger than [`MAX_PACKET`].
    #[error("packet of {0} bytes is larger than {MAX_PACKET}")]
    TooLarge(usize),
    /// A length inside the packet, a flag or the packet type is wrong.
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
}

/// Appends the remaining-length varint (at most 4 bytes; callers stay far below its limit).
fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

/// Appends a length-prefixed string. Topics and client ids are built by loadgen and short.
fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    let len = u16::try_from(s.len()).expect("topics and client ids built here are under 64 KiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s);
}

/// CONNECT with a clean session, no will, no credentials.
pub fn connect(out: &mut Vec<u8>, client_id: &str, keepalive_s: u16) {
    // Protocol name (6), level (1), flags (1), keepalive (2), then the client id.
    let rem = 10 + 2 + client_id.len();
    out.push(CONNECT << 4);
    put_len(out, rem);
    put_str(out, b"MQTT");
    out.push(4); // protocol level 4 = MQTT 3.1.1
    out.push(0x02); // clean session
    out.extend_from_slice(&keepalive_s.to_be_bytes());
    put_str(out, client_id.as_bytes());
}

/// PUBLISH at QoS 0 (no packet id, no answer), not retained.
pub fn publish(out: &mut Vec<u8>, topic: &[u8], payload: &[u8]) {
    out.push(PUBLISH << 4);
    put_len(out, 2 + topic.len() + payload.len());
    put_str(out, topic);
    out.extend_from_slice(payload);
}

/// SUBSCRIBE to one filter at QoS 0.
pub fn subscribe(out: &mut Vec<u8>, packet_id: u16, filter: &[u8]) {
    // Fixed flags 0b0010 are required by the spec for SUBSCRIBE.
    out.push((SUBSCRIBE << 4) | 0x02);
    put_len(out, 2 + 2 + filter.len() + 1);
    out.extend_from_slice(&packet_id.to_be_bytes());
    put_str(out, filter);
    out.push(0); // requested QoS
}

/// PINGREQ.
pub fn pingreq(out: &mut Vec<u8>) {
    out.extend_from_slice(&[PINGREQ << 4, 0]);
}

/// DISCONNECT.
pub fn disconnect(out: &mut Vec<u8>) {
    out.extend_from_slice(&[DISCONNECT << 4, 0]);
}

/// Reads the remaining length at `buf[1..]`: `Ok(None)` until its bytes are all there, else
/// (length, bytes the varint took).
fn remaining_length(buf: &[u8]) -> Result<Option<(usize, usize)>, ParseError> {
    let mut n = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else { return Ok(None) };
        n |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((n, i + 1)));
        }
    }
    Err(ParseError::BadLength)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Reads one packet from the front of `buf`: `Ok(None)` when it is not all there yet (read
/// more), else the packet and the bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Packet<'_>, usize)>, ParseError> {
    let Some(&first) = buf.first() else { return Ok(None) };
    let Some((rem, len_bytes)) = remaining_length(buf)? else { return Ok(None) };
    let total = 1 + len_bytes + rem;
    if total > MAX_PACKET {
        return Err(ParseError::TooLarge(total));
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[1 + len_bytes..total];
    let (kind, flags) = (first >> 4, first & 0x0F);
    let packet = match kind {
        CONNACK => {
            if body.len() != 2 || flags != 0 {
                return Err(ParseError::Malformed("CONNACK must be 2 bytes"));
            }
            Packet::ConnAck { session_present: body[0] & 1 == 1, code: body[1] }
        }
        PUBLISH => {
            let qos = (flags >> 1) & 0x03;
            if qos == 3 {
                return Err(ParseError::Malformed("PUBLISH with QoS 3"));
            }
            let topic_len =
                usize::from(u16_at(body, 0).ok_or(ParseError::Malformed("PUBLISH without topic"))?);
            let mut at = 2 + topic_len;
            let topic = body.get(2..at).ok_or(ParseError::Malformed("PUBLISH topic past its end"))?;
            let packet_id = if qos > 0 {
                let id = u16_at(body, at).ok_or(ParseError::Malformed("PUBLISH without packet id"))?;
                at += 2;
                Some(id)
            } else {
                None
            };
            Packet::Publish { topic, qos, packet_id, payload: &body[at..] }
        }
        SUBACK => {
            if body.len() < 3 || flags != 0 {
                return Err(ParseError::Malformed("SUBACK without return codes"));
            }
            Packet::SubAck { packet_id: u16::from_be_bytes([body[0], body[1]]), codes: &body[2..] }
        }
        PINGRESP => {
            if !body.is_empty() {
                return Err(ParseError::Malformed("PINGRESP with a body"));
            }
            Packet::PingResp
        }
        PUBACK | PUBREC | PUBREL | PUBCOMP | UNSUBACK => {
            if body.len() != 2 {
                return Err(ParseError::Malformed("acknowledgement must be 2 bytes"));
            }
            Packet::Other { kind }
        }
        _ => return Err(ParseError::Malformed("packet type a broker does not send")),
    };
    Ok(Some((packet, total)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one(buf: &[u8]) -> Packet<'_> {
        let (p, used) = parse(buf).expect("valid").expect("whole");
        assert_eq!(used, buf.len());
        p
    }

    #[test]
    fn connect_bytes_match_the_spec() {
        let mut out = Vec::new();
        connect(&mut out, "ab", 60);
        assert_eq!(out, [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 2, b'a', b'b']);
    }

    #[test]
    fn subscribe_ping_disconnect_bytes() {
        let mut out = Vec::new();
        subscribe(&mut out, 7, b"gps/#");
        assert_eq!(out, [0x82, 10, 0, 7, 0, 5, b'g', b'p', b's', b'/', b'#', 0]);
        out.clear();
        pingreq(&mut out);
        disconnect(&mut out);
        assert_eq!(out, [0xC0, 0, 0xE0, 0]);
    }

    #[test]
    fn publish_round_trips_and_long_lengths_use_more_bytes() {
        let payload = vec![7u8; 300];
        let mut out = Vec::new();
        publish(&mut out, b"push/42", &payload);
        // 2 + 7 + 300 = 309 = 0b10_0110101: two length bytes.
        assert_eq!(&out[..3], &[0x30, 0xB5, 0x02]);
        assert_eq!(
            one(&out),
            Packet::Publish { topic: b"push/42", qos: 0, packet_id: None, payload: &payload }
        );
    }

    #[test]
    fn broker_answers() {
        assert_eq!(one(&[0x20, 2, 0, 0]), Packet::ConnAck { session_present: false, code: 0 });
        assert_eq!(one(&[0x20, 2, 1, 5]), Packet::ConnAck { session_present: true, code: 5 });
        assert_eq!(one(&[0x90, 3, 0, 7, 0]), Packet::SubAck { packet_id: 7, codes: &[0] });
        assert_eq!(one(&[0xD0, 0]), Packet::PingResp);
        assert_eq!(one(&[0x40, 2, 0, 1]), Packet::Other { kind: PUBACK });
        // QoS 1 publish carries a packet id after the topic.
        assert_eq!(
            one(&[0x32, 6, 0, 1, b't', 0, 9, b'x']),
            Packet::Publish { topic: b"t", qos: 1, packet_id: Some(9), payload: b"x" }
        );
    }

    #[test]
    fn incomplete_is_none_and_bad_is_an_error() {
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&[0x30]), Ok(None));
        assert_eq!(parse(&[0x30, 0x80]), Ok(None));
        assert_eq!(parse(&[0x30, 5, 0, 1]), Ok(None));
        assert_eq!(parse(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 1]), Err(ParseError::BadLength));
        assert_eq!(parse(&[0x30, 0xFF, 0xFF, 0x7F]), Err(ParseError::TooLarge(1 + 3 + 0x1F_FFFF)));
        assert!(parse(&[0x10, 0]).is_err(), "CONNECT comes from clients only");
        assert!(parse(&[0x36, 3, 0, 1, b't']).is_err(), "QoS 3");
        assert!(parse(&[0x30, 3, 0, 9, b't']).is_err(), "topic past the end");
        assert!(parse(&[0x20, 3, 0, 0, 0]).is_err(), "CONNACK of 3 bytes");
        assert!(parse(&[0xD0, 1, 0]).is_err(), "PINGRESP with a body");
    }

    proptest! {
        /// Whatever a broker sends, parse answers without panicking, never claims more bytes
        /// than it was given, and never claims more than MAX_PACKET.
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Some((_, used))) = parse(&buf) {
                prop_assert!(used <= buf.len() && (2..=MAX_PACKET).contains(&used));
            }
        }

        /// Every prefix of a valid packet is "need more", and the whole one parses back to
        /// what was encoded, followed by whatever comes next.
        #[test]
        fn publishes_round_trip_through_every_split(
            topic in proptest::collection::vec(any::<u8>(), 0..80),
            payload in proptest::collection::vec(any::<u8>(), 0..400),
            tail in proptest::collection::vec(any::<u8>(), 0..8),
        ) {
            let mut out = Vec::new();
            publish(&mut out, &topic, &payload);
            let len = out.len();
            for cut in 0..len {
                prop_assert_eq!(parse(&out[..cut]), Ok(None));
            }
            out.extend_from_slice(&tail);
            let (p, used) = parse(&out).expect("valid").expect("whole");
            prop_assert_eq!(used, len);
            prop_assert_eq!(p, Packet::Publish { topic: &topic, qos: 0, packet_id: None, payload: &payload });
        }

        /// A stream of answers cut into arbitrary reads parses to the same packets.
        #[test]
        fn streams_parse_the_same_in_any_chunks(
            payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..100), 1..10),
            chunk in 1usize..50,
        ) {
            let mut stream = vec![0x20, 2, 0, 0];
            for p in &payloads {
                publish(&mut stream, b"push/1", p);
                stream.extend_from_slice(&[0xD0, 0]);
            }
            let mut got = Vec::new();
            let mut pending: Vec<u8> = Vec::new();
            for piece in stream.chunks(chunk) {
                pending.extend_from_slice(piece);
                let mut at = 0;
                while let Some((p, used)) = parse(&pending[at..]).expect("valid") {
                    if let Packet::Publish { payload, .. } = p {
                        got.push(payload.to_vec());
                    }
                    at += used;
                }
                pending.drain(..at);
            }
            prop_assert!(pending.is_empty());
            prop_assert_eq!(got, payloads);
        }
    }
}

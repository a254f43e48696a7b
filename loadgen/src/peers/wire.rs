//! One peer connection's protocol state, without I/O: what to send first, how the handshake
//! ends, what to answer (NATS PING), and the messages it carries. Both the fleet's event loops
//! and the app-server's blocking threads drive it: they hand it the bytes they read and write
//! out what it appends.

use super::{mqtt, nats, Proto};

/// MQTT keepalive announced in CONNECT: the broker drops a client silent for 1.5 times this.
/// Clients ping every [`super::KEEPALIVE`] (15 s), well inside it.
pub const MQTT_KEEPALIVE_S: u16 = 60;
/// Packet id of the one SUBSCRIBE each connection sends.
const SUBSCRIBE_ID: u16 = 1;
/// NATS subscription id of that one SUB.
const SID: &[u8] = b"1";

/// Why a connection must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The bytes were not the protocol.
    #[error("mqtt: {0}")]
    Mqtt(#[from] mqtt::ParseError),
    /// The bytes were not the protocol.
    #[error("nats: {0}")]
    Nats(#[from] nats::ParseError),
    /// The server said no (CONNACK code, SUBACK refusal, -ERR).
    #[error("refused: {0}")]
    Refused(String),
    /// The server sent something out of order (a message before the handshake ended).
    #[error("unexpected: {0}")]
    Unexpected(&'static str),
}

/// A connection's handshake and subscription.
#[derive(Debug)]
pub struct PeerConn {
    /// The protocol spoken.
    proto: Proto,
    /// The client id (MQTT) or connection name (NATS).
    name: String,
    /// The topic or subject to subscribe to during the handshake, if any.
    subscribe: Option<Vec<u8>>,
    /// The handshake is done: publishes may flow and messages count.
    ready: bool,
    /// MQTT: CONNACK accepted. NATS: INFO seen and CONNECT sent.
    connected: bool,
}

impl PeerConn {
    /// A connection that will introduce itself as `name` and subscribe to `subscribe`.
    pub fn new(proto: Proto, name: String, subscribe: Option<Vec<u8>>) -> PeerConn {
        PeerConn { proto, name, subscribe, ready: proto == Proto::Ceiling, connected: false }
    }

    /// True once publishes may flow.
    pub fn ready(&self) -> bool {
        self.ready
    }

    /// What to send as soon as the TCP connection is up. MQTT pipelines CONNECT and SUBSCRIBE;
    /// NATS waits for the server's INFO first, as its clients do; the ceiling needs nothing.
    pub fn start(&mut self, out: &mut Vec<u8>) {
        if self.proto == Proto::Mqtt {
            mqtt::connect(out, &self.name, MQTT_KEEPALIVE_S);
            if let Some(topic) = &self.subscribe {
                mqtt::subscribe(out, SUBSCRIBE_ID, topic);
            }
        }
    }

    /// Appends a keepalive ping.
    pub fn ping(&self, out: &mut Vec<u8>) {
        match self.proto {
            Proto::Mqtt => mqtt::pingreq(out),
            Proto::Nats => nats::ping(out),
            Proto::Ceiling => {}
        }
    }

    /// Appends a goodbye, where the protocol has one.
    pub fn goodbye(&self, out: &mut Vec<u8>) {
        if self.proto == Proto::Mqtt && self.connected {
            mqtt::disconnect(out);
        }
    }

    /// Handles every whole packet in `buf`: answers go to `out`, messages to `on_msg(topic,
    /// payload)`. Returns the bytes used; the rest is an incomplete packet to keep.
    pub fn feed(
        &mut self,
        buf: &[u8],
        out: &mut Vec<u8>,
        mut on_msg: impl FnMut(&[u8], &[u8]),
    ) -> Result<usize, PeerError> {
        let mut at = 0;
        match self.proto {
            Proto::Mqtt => {
                while let Some((p, used)) = mqtt::parse(&buf[at..])? {
                    at += used;
                    self.on_mqtt(p, &mut on_msg)?;
                }
            }
            Proto::Nats => {
                while let Some((op, used)) = nats::parse(&buf[at..])? {
                    at += used;
                    self.on_nats(op, out, &mut on_msg)?;
                }
            }
            // The ceiling never writes; anything from it is ignored.
            Proto::Ceiling => at = buf.len(),
        }
        Ok(at)
    }

    fn on_mqtt(
        &mut self,
        p: mqtt::Packet<'_>,
        on_msg: &mut impl FnMut(&[u8], &[u8]),
    ) -> Result<(), PeerError> {
        match p {
            mqtt::Packet::ConnAck { code: 0, .. } if !self.connected => {
                self.connected = true;
                self.ready = self.subscribe.is_none();
            }
            mqtt::Packet::ConnAck { code, .. } => {
                return Err(PeerError::Refused(format!("CONNACK code {code}")));
            }
            mqtt::Packet::SubAck { codes, .. } => {
                if codes.iter().any(|c| *c >= 0x80) {
                    return Err(PeerError::Refused("SUBACK refused the subscription".into()));
                }
                if !self.connected {
                    return Err(PeerError::Unexpected("SUBACK before CONNACK"));
                }
                self.ready = true;
            }
            mqtt::Packet::Publish { topic, payload, .. } => {
                if !self.ready {
                    return Err(PeerError::Unexpected("PUBLISH before the handshake ended"));
                }
                on_msg(topic, payload);
            }
            mqtt::Packet::PingResp | mqtt::Packet::Other { .. } => {}
        }
        Ok(())
    }

    fn on_nats(
        &mut self,
        op: nats::Op<'_>,
        out: &mut Vec<u8>,
        on_msg: &mut impl FnMut(&[u8], &[u8]),
    ) -> Result<(), PeerError> {
        match op {
            nats::Op::Info(_) if !self.connected => {
                self.connected = true;
                nats::connect(out, &self.name);
                if let Some(subject) = &self.subscribe {
                    nats::sub(out, subject, SID);
                }
                // The PONG to this PING says CONNECT and SUB were taken.
                nats::ping(out);
            }
            // Later INFOs announce cluster changes.
            nats::Op::Info(_) | nats::Op::Ok => {}
            nats::Op::Pong => {
                if self.connected {
                    self.ready = true;
                }
            }
            nats::Op::Ping => nats::pong(out),
            nats::Op::Err(text) => {
                return Err(PeerError::Refused(String::from_utf8_lossy(text).into_owned()));
            }
            nats::Op::Msg { subject, payload, .. } => {
                if !self.ready {
                    return Err(PeerError::Unexpected("MSG before the handshake ended"));
                }
                on_msg(subject, payload);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(c: &mut PeerConn, buf: &[u8], out: &mut Vec<u8>) -> Result<Vec<Vec<u8>>, PeerError> {
        let mut got = Vec::new();
        let used = c.feed(buf, out, |_, p| got.push(p.to_vec()))?;
        assert_eq!(used, buf.len());
        Ok(got)
    }

    #[test]
    fn mqtt_handshake_then_messages() {
        let mut c = PeerConn::new(Proto::Mqtt, "fg-d1".into(), Some(b"push/1".to_vec()));
        let mut out = Vec::new();
        c.start(&mut out);
        assert_eq!((out[0], out[2 + 12 + 5]), (0x10, 0x82), "CONNECT, then SUBSCRIBE, pipelined");
        out.clear();
        feed_all(&mut c, &[0x20, 2, 0, 0], &mut out).expect("connack");
        assert!(!c.ready(), "waits for the SUBACK");
        feed_all(&mut c, &[0x90, 3, 0, 1, 0], &mut out).expect("suback");
        assert!(c.ready());
        let mut msg = Vec::new();
        mqtt::publish(&mut msg, b"push/1", b"xyz");
        assert_eq!(feed_all(&mut c, &msg, &mut out).expect("publish"), vec![b"xyz".to_vec()]);
        assert!(out.is_empty(), "nothing to answer");
    }

    #[test]
    fn mqtt_refusals_end_the_connection() {
        let mut c = PeerConn::new(Proto::Mqtt, "x".into(), Some(b"t".to_vec()));
        assert!(matches!(c.feed(&[0x20, 2, 0, 5], &mut Vec::new(), |_, _| {}), Err(PeerError::Refused(_))));
        let mut c = PeerConn::new(Proto::Mqtt, "x".into(), Some(b"t".to_vec()));
        c.feed(&[0x20, 2, 0, 0], &mut Vec::new(), |_, _| {}).expect("connack");
        assert!(c.feed(&[0x90, 3, 0, 1, 0x80], &mut Vec::new(), |_, _| {}).is_err());
        let mut c = PeerConn::new(Proto::Mqtt, "x".into(), None);
        let mut msg = Vec::new();
        mqtt::publish(&mut msg, b"t", b"early");
        assert!(c.feed(&msg, &mut Vec::new(), |_, _| {}).is_err(), "a message before CONNACK");
    }

    #[test]
    fn nats_waits_for_info_and_answers_pings() {
        let mut c = PeerConn::new(Proto::Nats, "fg-d1".into(), Some(b"push.1".to_vec()));
        let mut out = Vec::new();
        c.start(&mut out);
        assert!(out.is_empty(), "NATS clients speak after INFO");
        feed_all(&mut c, b"INFO {}\r\n", &mut out).expect("info");
        let text = String::from_utf8(out.clone()).expect("ascii");
        assert!(text.starts_with("CONNECT ") && text.ends_with("SUB push.1 1\r\nPING\r\n"), "{text}");
        assert!(!c.ready());
        out.clear();
        feed_all(&mut c, b"PONG\r\nPING\r\nMSG push.1 1 2\r\nhi\r\n", &mut out)
            .map(|m| assert_eq!(m, vec![b"hi".to_vec()]))
            .expect("pong, ping, msg");
        assert!(c.ready());
        assert_eq!(out, b"PONG\r\n");
        assert!(c.feed(b"-ERR 'Slow Consumer'\r\n", &mut out, |_, _| {}).is_err());
    }

    #[test]
    fn partial_packets_are_left_for_the_next_read() {
        let mut c = PeerConn::new(Proto::Nats, "x".into(), None);
        let mut out = Vec::new();
        let used = c.feed(b"INFO {}\r\nPO", &mut out, |_, _| {}).expect("info");
        assert_eq!(used, 9);
    }

    #[test]
    fn the_ceiling_is_ready_at_once_and_sends_nothing() {
        let mut c = PeerConn::new(Proto::Ceiling, "x".into(), None);
        let mut out = Vec::new();
        c.start(&mut out);
        c.ping(&mut out);
        c.goodbye(&mut out);
        assert!(c.ready() && out.is_empty());
    }
}

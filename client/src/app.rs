//! The app side of the protocol (drivers, passengers) over one blocking TCP connection: the raw,
//! low-level client that gate tests drive frame by frame.
//!
//! Requests are pipelined: send several, then wait for their answers in any order. Frames that
//! arrive while a call waits for its own answer (pushes, go-aways, other answers) are queued and
//! handed out later by [`AppConn::recv`] or [`AppConn::wait_response`], so nothing the gate sends
//! is lost to whoever happens to be reading.
//!
//! It stays a raw tool on purpose: it acks only when asked ([`AppConn::ack_push`]), shows
//! repeats, sends no keepalive, and never reconnects, so a test can do anything a broken app
//! might. The protocol's rules live in [`crate::proto::app`]: the frames this type writes for
//! them (Login, Resume, PushAck), the reading of a Session answer ([`SessionInfo`]), and its
//! sequence-ids and log-ids are that module's; [`crate::AppSession`] is the app that follows
//! every rule, a shell over [`crate::proto::app::AppProto`].

use crate::frame::{answers, write_raw_frame, FrameReader, OwnedFrame};
use crate::proto::app::{mix64, write_login, write_push_ack, write_resume, LogIds, SeqIds};
use crate::secure::SecureStream;
use crate::{now_ms, ClientError};
use schema::flatbuffers::{FlatBufferBuilder, WIPOffset};
use schema::wire;
use schema::{body_kind, Body, Cmd, Encoder, FrameType, Limits};
use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use crate::proto::app::SessionInfo;

/// Most frames held for later while a call waits for its own answer. Past it the app is not
/// reading what the gate sends, and growing without bound would only hide that.
pub const MAX_QUEUED: usize = 10_000;

impl SessionInfo {
    /// Reads a Login or Resume Response; an Error frame becomes `ClientError::Server`.
    pub fn from_frame(f: &OwnedFrame) -> Result<SessionInfo, ClientError> {
        if let Some(e) = f.server_error() {
            return Err(e);
        }
        match f.body() {
            Body::Session(s) if f.ty == FrameType::Response => Ok(SessionInfo::from_wire(&s)),
            _ => Err(unexpected("a Session response", f)),
        }
    }
}

/// A business answer (PlaceOrder, GrabOrder, OrderStatus, BusinessRequest), owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// 0 for success; otherwise the app-server's own code.
    pub code: u16,
    /// The app-server's message.
    pub message: String,
    /// The app-server's opaque answer.
    pub payload: Vec<u8>,
    /// The log-id the answer carried (the request's own).
    pub log_id: u64,
}

impl Reply {
    /// Reads a business Response; an Error frame becomes `ClientError::Server`.
    pub fn from_frame(f: &OwnedFrame) -> Result<Reply, ClientError> {
        if let Some(e) = f.server_error() {
            return Err(e);
        }
        match f.reply() {
            Some(r) if f.ty == FrameType::Response => Ok(Reply {
                code: r.code,
                message: r.message.to_owned(),
                payload: r.payload.to_vec(),
                log_id: f.header.log_id,
            }),
            _ => Err(unexpected("a Reply response", f)),
        }
    }
}

fn unexpected(wanted: &str, f: &OwnedFrame) -> ClientError {
    ClientError::Unexpected(format!("expected {wanted}, got {:?} {:?} (seq {})", f.cmd, f.ty, f.header.seq))
}

/// The socket, in plaintext or inside the secure channel.
enum Link {
    Plain(TcpStream),
    Secure(Box<SecureStream>),
}

impl Link {
    fn tcp(&self) -> &TcpStream {
        match self {
            Link::Plain(t) => t,
            Link::Secure(s) => s.tcp(),
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(t) => t.read(buf),
            Link::Secure(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(t) => t.write(buf),
            Link::Secure(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Link::Plain(t) => t.flush(),
            Link::Secure(s) => s.flush(),
        }
    }
}

/// One app connection to a gate.
pub struct AppConn {
    /// The socket; TCP_NODELAY is on, since every frame is small and latency-bound.
    stream: Link,
    /// Incoming bytes and frame decoding.
    reader: FrameReader,
    /// Reused FlatBuffers builder for outgoing bodies.
    enc: Encoder,
    /// Reused outgoing buffer: every call writes its frames here, then one `write_all`.
    out: Vec<u8>,
    /// Frames received while waiting for something else, oldest first.
    queue: VecDeque<OwnedFrame>,
    /// Sequence-ids (0 is never used, so a request never matches an event).
    seqs: SeqIds,
    /// Log-ids.
    logs: LogIds,
    /// The log-id of the last request sent by a typed helper.
    last_log_id: u64,
    /// Longest a call waits for its answer; also the socket's per-read timeout.
    read_timeout: Duration,
    /// The session from the last successful login or resume.
    session: Option<SessionInfo>,
}

impl AppConn {
    /// Connects to the gate at `addr` (each resolved address in turn), with `timeout` for the
    /// connect itself and as the read and write timeouts, so no call blocks forever.
    pub fn connect(addr: impl ToSocketAddrs, timeout: Duration) -> Result<AppConn, ClientError> {
        let mut last = None;
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(stream) => {
                    stream.set_write_timeout(Some(timeout))?;
                    let mut conn = AppConn::from_stream(stream)?;
                    conn.set_read_timeout(timeout)?;
                    return Ok(conn);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(match last {
            Some(e) => e.into(),
            None => ClientError::Unexpected("address resolved to nothing".to_owned()),
        })
    }

    /// Connects like [`AppConn::connect`], then speaks the secure channel (docs/PROTOCOL.md
    /// §14) with the gate whose public key is `server_key`: the first Login or Resume travels in
    /// the handshake, every frame after it in Data records.
    pub fn connect_secure(
        addr: impl ToSocketAddrs,
        timeout: Duration,
        server_key: channel::PublicKey,
    ) -> Result<AppConn, ClientError> {
        let mut conn = AppConn::connect(addr, timeout)?;
        let tcp = conn.stream.tcp().try_clone()?;
        conn.stream = Link::Secure(Box::new(SecureStream::new(tcp, server_key)));
        Ok(conn)
    }

    /// Connects like [`AppConn::connect`] for a connection whose secure channel an
    /// [`crate::proto::app::AppProto`] keeps (an [`crate::AppSession`]'s): the socket's bytes
    /// pass through as they are until the machine lends this connection its open channel
    /// ([`AppConn::lend_channel`]).
    pub(crate) fn connect_lendable(addr: SocketAddr, timeout: Duration) -> Result<AppConn, ClientError> {
        let conn = AppConn::connect(addr, timeout)?;
        Ok(match conn.stream {
            Link::Plain(tcp) => {
                AppConn { stream: Link::Secure(Box::new(SecureStream::lendable(tcp))), ..conn }
            }
            stream => AppConn { stream, ..conn },
        })
    }

    /// Wraps a connected stream, turning TCP_NODELAY on. The stream's own timeouts are kept;
    /// waits for answers are bounded by 30 s until [`AppConn::set_read_timeout`] says otherwise.
    pub fn from_stream(stream: TcpStream) -> Result<AppConn, ClientError> {
        stream.set_nodelay(true)?;
        Ok(AppConn {
            stream: Link::Plain(stream),
            reader: FrameReader::new(Limits::APP),
            enc: Encoder::new(),
            out: Vec::with_capacity(256),
            queue: VecDeque::new(),
            seqs: SeqIds::default(),
            logs: LogIds::new(log_seed()),
            last_log_id: 0,
            read_timeout: Duration::from_secs(30),
            session: None,
        })
    }

    /// Sets the socket's read timeout and the longest a call waits for its answer. Zero is
    /// refused by the socket (it would mean "forever").
    pub fn set_read_timeout(&mut self, timeout: Duration) -> Result<(), ClientError> {
        self.stream.tcp().set_read_timeout(Some(timeout))?;
        self.read_timeout = timeout;
        Ok(())
    }

    /// Logs in with a signed token; `device` is a free-form description for the gate's logs.
    pub fn login(&mut self, token: &[u8], device: &str) -> Result<SessionInfo, ClientError> {
        let (seq, log_id) = self.fresh_ids();
        self.out.clear();
        write_login(&mut self.enc, &mut self.out, seq, log_id, token, device);
        self.flush()?;
        self.session_answer(seq)
    }

    /// Resumes `s`: on the secure channel with its resumption secret (a ResumeHello, no static
    /// key exchange), in plaintext with its resume token alone.
    pub fn resume_session(&mut self, s: &SessionInfo) -> Result<SessionInfo, ClientError> {
        if let (Link::Secure(sec), Some(secret)) = (&mut self.stream, s.resume_secret) {
            if !sec.is_open() {
                sec.resume_with(&s.resume_token, channel::ResumeSecret(secret));
            }
        }
        self.resume(&s.resume_token)
    }

    /// Reads the Session answering `seq`; on the secure channel it takes the handshake's
    /// resumption secret with it.
    fn session_answer(&mut self, seq: u32) -> Result<SessionInfo, ClientError> {
        let mut info = SessionInfo::from_frame(&self.wait_response(seq)?)?;
        if let Link::Secure(sec) = &self.stream {
            info.resume_secret = sec.resume_secret().map(|s| s.0);
        }
        self.session = Some(info.clone());
        Ok(info)
    }

    /// The gate's new public key, when it said the one this connection used is being retired.
    pub fn new_server_key(&self) -> Option<channel::PublicKey> {
        match &self.stream {
            Link::Secure(s) => s.new_server_key().copied(),
            Link::Plain(_) => None,
        }
    }

    /// Resumes a held session with the resume token of its last Session answer (plaintext; on
    /// the secure channel see [`AppConn::resume_session`]).
    pub fn resume(&mut self, resume_token: &[u8]) -> Result<SessionInfo, ClientError> {
        let (seq, log_id) = self.fresh_ids();
        self.out.clear();
        write_resume(&mut self.enc, &mut self.out, seq, log_id, resume_token);
        self.flush()?;
        self.session_answer(seq)
    }

    /// Sends a keepalive stamped with the wall clock and waits for it; returns the echoed stamp.
    pub fn keepalive(&mut self) -> Result<u64, ClientError> {
        let ts_ms = now_ms();
        let seq =
            self.request(Cmd::Keepalive, |b| wire::Keepalive::create(b, &wire::KeepaliveArgs { ts_ms }))?;
        let f = self.wait_response(seq)?;
        if let Some(e) = f.server_error() {
            return Err(e);
        }
        match f.body() {
            Body::Keepalive(k) if f.ty == FrameType::Response => Ok(k.ts_ms()),
            _ => Err(unexpected("a Keepalive response", &f)),
        }
    }

    /// Logs out and waits for the gate's Logout answer; the session ends (no hold).
    pub fn logout(&mut self) -> Result<(), ClientError> {
        let seq =
            self.request(Cmd::Logout, |b| wire::Logout::create(b, &wire::LogoutArgs { reason: None }))?;
        let f = self.wait_response(seq)?;
        if let Some(e) = f.server_error() {
            return Err(e);
        }
        match f.body() {
            Body::Logout(_) if f.ty == FrameType::Response => {
                self.session = None;
                Ok(())
            }
            _ => Err(unexpected("a Logout response", &f)),
        }
    }

    /// Sends one GPS fix (an event: no answer).
    pub fn send_gps(&mut self, log_id: u64, p: &wire::GpsPoint) -> Result<(), ClientError> {
        self.out.clear();
        self.enc.gps_report(&mut self.out, log_id, p);
        self.flush()
    }

    /// Sends several GPS fixes, oldest first, in one frame (an event: no answer).
    pub fn send_gps_batch(&mut self, log_id: u64, points: &[wire::GpsPoint]) -> Result<(), ClientError> {
        self.out.clear();
        self.enc.gps_batch(&mut self.out, log_id, points);
        self.flush()
    }

    /// Sends a request whose body `build` makes, with a fresh sequence-id and log-id (see
    /// [`AppConn::last_log_id`]); returns the sequence-id to wait for. Refuses cmds that have
    /// no Request body (use [`AppConn::send_frame_raw`] to send those on purpose).
    pub fn request<T>(
        &mut self,
        cmd: Cmd,
        build: impl FnOnce(&mut FlatBufferBuilder<'static>) -> WIPOffset<T>,
    ) -> Result<u32, ClientError> {
        if body_kind(cmd, FrameType::Request).is_none() {
            return Err(ClientError::Unexpected(format!("{cmd:?} has no Request form")));
        }
        let (seq, log_id) = self.fresh_ids();
        self.out.clear();
        self.enc.frame(&mut self.out, FrameType::Request, cmd, seq, log_id, build);
        self.flush()?;
        Ok(seq)
    }

    /// Sends a Request of `cmd` with an already-built body and the caller's log-id; returns the
    /// fresh sequence-id. The body is sent as is, verified or not.
    pub fn send_request_raw(&mut self, cmd: Cmd, log_id: u64, body: &[u8]) -> Result<u32, ClientError> {
        let seq = self.next_seq();
        self.out.clear();
        write_raw_frame(&mut self.out, FrameType::Request as u8, cmd as u16, seq, log_id, body)?;
        self.flush()?;
        Ok(seq)
    }

    /// Passenger: asks for a ride from one point to another (1e-7 degrees); returns the seq.
    pub fn place_order(
        &mut self,
        from_lat_e7: i32,
        from_lon_e7: i32,
        to_lat_e7: i32,
        to_lon_e7: i32,
        payload: &[u8],
    ) -> Result<u32, ClientError> {
        self.request(Cmd::PlaceOrder, |b| {
            let payload = b.create_vector(payload);
            wire::PlaceOrder::create(
                b,
                &wire::PlaceOrderArgs {
                    from_lat_e7,
                    from_lon_e7,
                    to_lat_e7,
                    to_lon_e7,
                    payload: Some(payload),
                },
            )
        })
    }

    /// Driver: tries to take an offered order; returns the seq.
    pub fn grab_order(&mut self, order_id: u64, payload: &[u8]) -> Result<u32, ClientError> {
        self.request(Cmd::GrabOrder, |b| {
            let payload = b.create_vector(payload);
            wire::GrabOrder::create(b, &wire::GrabOrderArgs { order_id, payload: Some(payload) })
        })
    }

    /// Asks for an order's state (the Reply's payload is an `OrderStatus` table); returns the seq.
    pub fn order_status(&mut self, order_id: u64) -> Result<u32, ClientError> {
        self.request(Cmd::OrderStatus, |b| {
            wire::OrderStatusQuery::create(b, &wire::OrderStatusQueryArgs { order_id })
        })
    }

    /// Sends an app-server request named `kind` (e.g. "cancel_order"); returns the seq.
    pub fn business_request(&mut self, kind: &str, payload: &[u8]) -> Result<u32, ClientError> {
        self.request(Cmd::BusinessRequest, |b| {
            let kind = b.create_string(kind);
            let payload = b.create_vector(payload);
            wire::BusinessRequest::create(
                b,
                &wire::BusinessRequestArgs { kind: Some(kind), payload: Some(payload) },
            )
        })
    }

    /// Waits for the Response or Error answering the request `seq`, queuing whatever else
    /// arrives meanwhile. An Error frame is returned as a frame here (see
    /// [`OwnedFrame::server_error`]); [`AppConn::wait_reply`] turns it into an error.
    ///
    /// Gives up with `Timeout` once the read timeout has passed without the answer, even if
    /// other frames kept arriving. If the gate closes first (after a GoAway, say), the error is
    /// `Closed` and the frames it sent before closing stay readable with [`AppConn::recv`].
    pub fn wait_response(&mut self, seq: u32) -> Result<OwnedFrame, ClientError> {
        if let Some(f) = self.queue.iter().position(|f| answers(f, seq)).and_then(|i| self.queue.remove(i)) {
            return Ok(f);
        }
        let deadline = Instant::now() + self.read_timeout;
        loop {
            let f = self.reader.read_frame(&mut self.stream)?;
            if answers(&f, seq) {
                return Ok(f);
            }
            self.enqueue(f)?;
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout);
            }
        }
    }

    /// Waits for the business answer to `seq`; an Error frame becomes `ClientError::Server`.
    pub fn wait_reply(&mut self, seq: u32) -> Result<Reply, ClientError> {
        Reply::from_frame(&self.wait_response(seq)?)
    }

    /// The next frame: queued ones first, then from the socket.
    pub fn recv(&mut self) -> Result<OwnedFrame, ClientError> {
        match self.queue.pop_front() {
            Some(f) => Ok(f),
            None => self.reader.read_frame(&mut self.stream),
        }
    }

    /// Frames queued for [`AppConn::recv`].
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Acks a PushDelivery: an Ack of cmd PushAck with the delivery's sequence-id and log-id
    /// (the log-id follows the push's flow) and its message id.
    pub fn ack_push(&mut self, frame: &OwnedFrame) -> Result<(), ClientError> {
        let Some(d) = frame.delivery() else {
            return Err(unexpected("a PushDelivery to ack", frame));
        };
        let message_id = d.message_id;
        self.out.clear();
        write_push_ack(&mut self.enc, &mut self.out, frame.header.seq, frame.header.log_id, message_id);
        self.flush()
    }

    /// Writes `bytes` as they are (hostile-input tests); on the secure channel, inside it (use
    /// [`AppConn::send_wire`] for bytes past the channel).
    pub fn send_raw(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// Writes one frame with an arbitrary type byte, cmd number, sequence-id and body.
    pub fn send_frame_raw(
        &mut self,
        ty: u8,
        cmd: u16,
        seq: u32,
        log_id: u64,
        body: &[u8],
    ) -> Result<(), ClientError> {
        self.out.clear();
        write_raw_frame(&mut self.out, ty, cmd, seq, log_id, body)?;
        self.flush()
    }

    /// Shuts both directions of the socket down; the gate sees the connection drop (no logout).
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.stream.tcp().shutdown(Shutdown::Both)?;
        Ok(())
    }

    /// The connection's local address.
    pub fn local_addr(&self) -> Result<SocketAddr, ClientError> {
        Ok(self.stream.tcp().local_addr()?)
    }

    /// The gate's address.
    pub fn peer_addr(&self) -> Result<SocketAddr, ClientError> {
        Ok(self.stream.tcp().peer_addr()?)
    }

    /// The socket, for options this type does not cover. Reading from it directly bypasses the
    /// frame reader and loses framing.
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        match &mut self.stream {
            Link::Plain(t) => t,
            Link::Secure(s) => s.tcp_mut(),
        }
    }

    /// Writes `bytes` straight to the socket, past the secure channel if there is one
    /// (records forged, replayed or cut by hostile-input tests).
    pub fn send_wire(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        self.stream_mut().write_all(bytes)?;
        Ok(())
    }

    /// The session from the last successful login or resume (cleared by logout).
    pub fn session(&self) -> Option<&SessionInfo> {
        self.session.as_ref()
    }

    /// A fresh sequence-id (never 0), for frames built by hand.
    pub fn next_seq(&mut self) -> u32 {
        self.seqs.fresh()
    }

    /// A fresh nonzero log-id below 2^63 (§7). Seeded per connection from the clock, the
    /// process id and a process-wide counter, so ids from many connections and processes do not
    /// collide in logs.
    pub fn new_log_id(&mut self) -> u64 {
        self.logs.fresh()
    }

    /// A fresh sequence-id and log-id for a request; the log-id is remembered for
    /// [`AppConn::last_log_id`].
    fn fresh_ids(&mut self) -> (u32, u64) {
        let seq = self.next_seq();
        self.last_log_id = self.new_log_id();
        (seq, self.last_log_id)
    }

    /// The sequence-id counter, handed to another sender of this connection (an
    /// [`crate::AppSession`]'s machine) so the two never use one id twice.
    pub(crate) fn seq_ids(&self) -> SeqIds {
        self.seqs
    }

    /// Takes the sequence-id counter back from another sender of this connection.
    pub(crate) fn set_seq_ids(&mut self, seqs: SeqIds) {
        self.seqs = seqs;
    }

    /// Moves what was received and not handed out (queued frames, then bytes read but not yet
    /// decoded, then frame bytes the secure channel opened and the reader did not take yet) to
    /// `into`, in arrival order, for another reader of this connection.
    pub(crate) fn take_unread(&mut self, into: &mut Vec<u8>) {
        for f in self.queue.drain(..) {
            f.write_to(into);
        }
        self.reader.take_buffered(into);
        if let Link::Secure(s) = &mut self.stream {
            s.take_plain(into);
        }
    }

    /// A connection made with [`AppConn::connect_lendable`] takes its machine's open channel and
    /// the bytes received on it and not yet opened: its calls speak the secure channel until
    /// [`AppConn::take_channel`].
    pub(crate) fn lend_channel(&mut self, chan: channel::ClientChannel, raw: Vec<u8>) {
        if let Link::Secure(s) = &mut self.stream {
            s.lend(chan, raw);
        }
    }

    /// Gives the channel lent with [`AppConn::lend_channel`] back, with the bytes received on it
    /// and not yet opened; take the frames read and not handed out with `take_unread` first.
    pub(crate) fn take_channel(&mut self) -> Option<(channel::ClientChannel, Vec<u8>)> {
        match &mut self.stream {
            Link::Secure(s) => s.take_lent(),
            Link::Plain(_) => None,
        }
    }

    /// Gives back bytes another reader took from this connection and did not use; they are read
    /// before anything still in the socket.
    pub(crate) fn give_unread(&mut self, bytes: &[u8]) {
        self.reader.feed(bytes);
    }

    /// The log-id of the last request sent by [`AppConn::request`] or a typed helper.
    pub fn last_log_id(&self) -> u64 {
        self.last_log_id
    }

    /// Writes the outgoing buffer in one call.
    fn flush(&mut self) -> Result<(), ClientError> {
        self.stream.write_all(&self.out)?;
        Ok(())
    }

    /// Holds a frame for later, refusing past `MAX_QUEUED`.
    fn enqueue(&mut self, f: OwnedFrame) -> Result<(), ClientError> {
        if self.queue.len() >= MAX_QUEUED {
            return Err(ClientError::QueueFull);
        }
        self.queue.push_back(f);
        Ok(())
    }
}

/// A per-connection seed for log-ids.
fn log_seed() -> u64 {
    static CONNS: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let n = CONNS.fetch_add(1, Ordering::Relaxed);
    mix64(nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    const T: Duration = Duration::from_secs(5);

    /// A one-connection fake gate: runs `script` on the accepted socket in a thread.
    fn fake_gate(
        script: impl FnOnce(TcpStream, FrameReader) + Send + 'static,
    ) -> (SocketAddr, thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let h = thread::spawn(move || {
            let (s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(T)).expect("timeout");
            script(s, FrameReader::new(Limits::APP));
        });
        (addr, h)
    }

    fn session_answer(e: &mut Encoder, out: &mut Vec<u8>, ty: Cmd, seq: u32, log_id: u64) {
        e.frame(out, FrameType::Response, ty, seq, log_id, |b| {
            let resume_token = b.create_vector(&[9u8; 16]);
            let node = b.create_string("127.0.0.1:7100");
            wire::Session::create(
                b,
                &wire::SessionArgs {
                    uid: 42,
                    role: wire::Role::Driver,
                    heartbeat_ms: 30_000,
                    idle_timeout_ms: 90_000,
                    session_epoch: 3,
                    resume_token: Some(resume_token),
                    node: Some(node),
                    hold_ms: 60_000,
                },
            )
        });
    }

    fn reply(e: &mut Encoder, out: &mut Vec<u8>, req: &OwnedFrame, code: u16, msg: &str) {
        e.frame(out, FrameType::Response, req.cmd, req.seq(), req.log_id(), |b| {
            let message = b.create_string(msg);
            let payload = b.create_vector(msg.as_bytes());
            wire::Reply::create(b, &wire::ReplyArgs { code, message: Some(message), payload: Some(payload) })
        });
    }

    #[test]
    fn login_queues_a_push_that_arrives_first_then_pipelines() {
        let (addr, gate) = fake_gate(|mut s, mut r| {
            let mut e = Encoder::new();
            let mut out = Vec::new();
            let login = r.read_frame(&mut s).expect("login");
            assert_eq!((login.cmd, login.ty), (Cmd::Login, FrameType::Request));
            assert_ne!(login.log_id(), 0);
            let Body::Login(l) = login.body() else { panic!("not a login body") };
            assert_eq!(l.token().map(|t| t.bytes().to_vec()), Some(vec![7u8; 50]));
            assert_eq!(l.device(), Some("pixel-7"));
            // A push (with the same seq as the login, as a trap) before the answer, in one write.
            e.frame(&mut out, FrameType::Push, Cmd::PushDelivery, login.seq(), 0xDD, |b| {
                let payload = b.create_vector(b"order 77");
                wire::PushDelivery::create(
                    b,
                    &wire::PushDeliveryArgs {
                        message_id: 5,
                        payload: Some(payload),
                        sent_at_us: 1,
                        kind: 1,
                        deadline_ms: 0,
                    },
                )
            });
            session_answer(&mut e, &mut out, Cmd::Login, login.seq(), login.log_id());
            s.write_all(&out).expect("write");

            let ack = r.read_frame(&mut s).expect("ack");
            assert_eq!(
                (ack.cmd, ack.ty, ack.seq(), ack.log_id()),
                (Cmd::PushAck, FrameType::Ack, login.seq(), 0xDD)
            );
            assert!(matches!(ack.body(), Body::PushAck(a) if a.message_id() == 5));

            // Three pipelined requests, answered in reverse order, one with an error.
            let a = r.read_frame(&mut s).expect("a");
            let b = r.read_frame(&mut s).expect("b");
            let c = r.read_frame(&mut s).expect("c");
            assert_eq!((a.cmd, b.cmd, c.cmd), (Cmd::PlaceOrder, Cmd::GrabOrder, Cmd::BusinessRequest));
            assert!(matches!(b.body(), Body::GrabOrder(g) if g.order_id() == 77));
            out.clear();
            reply(&mut e, &mut out, &c, 0, "c");
            e.error(
                &mut out,
                b.seq(),
                b.log_id(),
                wire::ErrorCode::Timeout,
                wire::Hop::AppServer,
                b.cmd as u16,
                "slow",
                0,
            );
            reply(&mut e, &mut out, &a, 0, "a");
            s.write_all(&out).expect("write");

            let k = r.read_frame(&mut s).expect("keepalive");
            let Body::Keepalive(kb) = k.body() else { panic!("not a keepalive") };
            out.clear();
            e.keepalive(&mut out, FrameType::Response, k.seq(), k.log_id(), kb.ts_ms());
            s.write_all(&out).expect("write");

            let gps = r.read_frame(&mut s).expect("gps");
            assert_eq!(
                (gps.cmd, gps.ty, gps.seq(), gps.log_id()),
                (Cmd::GpsReport, FrameType::Event, 0, 0x77)
            );

            let lo = r.read_frame(&mut s).expect("logout");
            out.clear();
            e.frame(&mut out, FrameType::Response, Cmd::Logout, lo.seq(), lo.log_id(), |b| {
                wire::Logout::create(b, &wire::LogoutArgs { reason: None })
            });
            e.go_away(&mut out, lo.log_id(), wire::GoAwayReason::LoggedOut, "bye", "", 0);
            s.write_all(&out).expect("write");
            assert!(matches!(r.read_frame(&mut s), Err(ClientError::Closed)));
        });

        let mut app = AppConn::connect(addr, T).expect("connect");
        let info = app.login(&[7u8; 50], "pixel-7").expect("login");
        assert_eq!(
            info,
            SessionInfo {
                uid: 42,
                role: 1,
                heartbeat_ms: 30_000,
                idle_timeout_ms: 90_000,
                session_epoch: 3,
                resume_token: vec![9; 16],
                node: "127.0.0.1:7100".into(),
                hold_ms: 60_000,
                resume_secret: None,
            }
        );
        assert_eq!(app.session(), Some(&info));
        assert_eq!(app.queued(), 1);
        let push = app.recv().expect("queued push");
        assert_eq!(push.delivery().map(|d| (d.message_id, d.payload)), Some((5, &b"order 77"[..])));
        app.ack_push(&push).expect("ack");

        let a = app.place_order(1, 2, 3, 4, b"{}").expect("a");
        let a_log = app.last_log_id();
        let b = app.grab_order(77, b"").expect("b");
        let c = app.business_request("cancel_order", &[1, 2, 3]).expect("c");
        assert!(a < b && b < c);
        match app.wait_reply(b) {
            Err(ClientError::Server {
                code: wire::ErrorCode::Timeout,
                origin: wire::Hop::AppServer,
                message,
                ..
            }) => {
                assert_eq!(message, "slow")
            }
            other => panic!("expected the app-server timeout, got {other:?}"),
        }
        let ra = app.wait_reply(a).expect("a's reply");
        assert_eq!(
            (ra.code, ra.message.as_str(), ra.payload.as_slice(), ra.log_id),
            (0, "a", &b"a"[..], a_log)
        );
        assert_eq!(app.wait_reply(c).expect("c's reply").message, "c");
        assert_eq!(app.queued(), 0);

        let before = now_ms();
        let echoed = app.keepalive().expect("keepalive");
        assert!(echoed >= before && echoed <= now_ms());

        app.send_gps(0x77, &wire::GpsPoint::new(1, 2, 3, 4, 5, 6, 0)).expect("gps");
        app.logout().expect("logout");
        assert_eq!(app.session(), None);
        let bye = app.recv().expect("go-away");
        assert_eq!(bye.go_away().map(|g| g.reason()), Some(wire::GoAwayReason::LoggedOut));
        drop(app);
        gate.join().expect("fake gate");
    }

    #[test]
    fn refused_login_is_a_server_error() {
        let (addr, gate) = fake_gate(|mut s, mut r| {
            let login = r.read_frame(&mut s).expect("login");
            let mut out = Vec::new();
            Encoder::new().error(
                &mut out,
                login.seq(),
                login.log_id(),
                wire::ErrorCode::BadToken,
                wire::Hop::Gate,
                Cmd::Login as u16,
                "token signature does not verify",
                0,
            );
            s.write_all(&out).expect("write");
        });
        let mut app = AppConn::connect(addr, T).expect("connect");
        match app.login(b"forged", "test") {
            Err(ClientError::Server { code, origin, log_id, .. }) => {
                assert_eq!((code, origin), (wire::ErrorCode::BadToken, wire::Hop::Gate));
                assert_ne!(log_id, 0);
            }
            other => panic!("expected BadToken, got {other:?}"),
        }
        gate.join().expect("fake gate");
        assert!(matches!(app.recv(), Err(ClientError::Closed)));
    }

    #[test]
    fn silence_is_a_timeout_and_go_away_then_close_is_closed() {
        let (addr, gate) = fake_gate(|mut s, mut r| {
            let k1 = r.read_frame(&mut s).expect("first keepalive");
            // Say nothing until the client has given up on it, then answer its second try.
            let k2 = r.read_frame(&mut s).expect("second keepalive");
            let mut out = Vec::new();
            let mut e = Encoder::new();
            e.keepalive(&mut out, FrameType::Response, k1.seq(), k1.log_id(), 1);
            e.keepalive(&mut out, FrameType::Response, k2.seq(), k2.log_id(), 2);
            s.write_all(&out).expect("write");
            let k3 = r.read_frame(&mut s).expect("third keepalive");
            out.clear();
            e.go_away(&mut out, k3.log_id(), wire::GoAwayReason::Shutdown, "draining", "", 1500);
            s.write_all(&out).expect("write");
        });
        let mut app = AppConn::connect(addr, T).expect("connect");
        app.set_read_timeout(Duration::from_millis(200)).expect("timeout");
        assert!(matches!(app.keepalive(), Err(ClientError::Timeout)));
        app.set_read_timeout(T).expect("timeout");
        // The late answer to the first keepalive is queued, not mistaken for the second's.
        assert_eq!(app.keepalive().expect("second keepalive"), 2);
        assert_eq!(app.queued(), 1);
        assert!(matches!(app.keepalive(), Err(ClientError::Closed)));
        let late = app.recv().expect("late answer");
        assert!(matches!(late.body(), Body::Keepalive(k) if k.ts_ms() == 1));
        let bye = app.recv().expect("go-away");
        let g = bye.go_away().expect("go-away body");
        assert_eq!(
            (g.reason(), g.message(), g.retry_after_ms()),
            (wire::GoAwayReason::Shutdown, Some("draining"), 1500)
        );
        assert!(matches!(app.recv(), Err(ClientError::Closed)));
        gate.join().expect("fake gate");
    }

    #[test]
    fn raw_sends_and_refused_request_cmds() {
        let (addr, gate) = fake_gate(|mut s, mut r| {
            let f = r.read_frame(&mut s).expect("raw keepalive");
            assert_eq!((f.cmd, f.seq(), f.log_id()), (Cmd::Keepalive, 9, 0x42));
            let f = r.read_frame(&mut s).expect("raw request");
            assert_eq!((f.cmd, f.ty, f.log_id()), (Cmd::OrderStatus, FrameType::Request, 0x43));
            assert!(matches!(f.body(), Body::OrderStatusQuery(q) if q.order_id() == 0));
            let err = r.read_frame(&mut s);
            assert!(matches!(err, Err(ClientError::Protocol(schema::StreamError::BadMagic(0)))), "{err:?}");
        });
        let mut app = AppConn::connect(addr, T).expect("connect");
        assert!(matches!(
            app.request(Cmd::GoAway, |b| wire::Logout::create(b, &wire::LogoutArgs { reason: None })),
            Err(ClientError::Unexpected(_))
        ));
        app.send_frame_raw(FrameType::Request as u8, Cmd::Keepalive as u16, 9, 0x42, &[]).expect("raw frame");
        app.send_request_raw(Cmd::OrderStatus, 0x43, &[]).expect("raw request");
        app.send_raw(&[0, 1, 2]).expect("garbage");
        gate.join().expect("fake gate");
        assert!(app.local_addr().is_ok() && app.peer_addr().is_ok());
        app.shutdown().expect("shutdown");
    }

    #[test]
    fn ids_are_fresh_and_nonzero() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let mut a = AppConn::from_stream(s.try_clone().expect("clone")).expect("wrap");
        let mut b = AppConn::from_stream(s).expect("wrap");
        assert_ne!(a.new_log_id(), b.new_log_id());
        a.seqs = SeqIds::after(u32::MAX);
        assert_eq!(a.next_seq(), 1);
        let ids: std::collections::HashSet<u64> = (0..1000).map(|_| a.new_log_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(!ids.contains(&0));
    }
}

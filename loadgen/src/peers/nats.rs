//! Just enough of the NATS client protocol for a benchmark client: CONNECT, PUB, SUB, PING and
//! PONG out; INFO, MSG (and HMSG), PING, PONG, +OK and -ERR in. No I/O: encoders append to a
//! caller's buffer, and [`parse`] reads one operation from the front of what a server sent.
//!
//! Server input is never trusted: a control line longer than [`MAX_CONTROL_LINE`] without its
//! CRLF, a payload larger than [`MAX_PAYLOAD`], a size that is not a number, or a payload not
//! followed by CRLF ends the connection. Operation names are matched without regard to case,
//! as the protocol allows.

/// Longest control line read (nats-server's own default limit is 4 KiB).
pub const MAX_CONTROL_LINE: usize = 4096;
/// Largest message payload read. Ours are at most 16 KiB; nats-server's default limit is 1 MiB.
pub const MAX_PAYLOAD: usize = 1024 * 1024;

/// One operation a server sent, borrowing from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op<'a> {
    /// The server's INFO, with its JSON.
    Info(&'a [u8]),
    /// A message on a subscription (HMSG's headers are skipped).
    Msg {
        /// The subject it was published to.
        subject: &'a [u8],
        /// The subscription id it matched.
        sid: &'a [u8],
        /// The reply subject, if any.
        reply: Option<&'a [u8]>,
        /// The payload.
        payload: &'a [u8],
    },
    /// The server asks whether the client is alive: answer PONG.
    Ping,
    /// The answer to the client's PING.
    Pong,
    /// `+OK` (verbose mode only; this client turns it off).
    Ok,
    /// `-ERR`, with the server's text.
    Err(&'a [u8]),
}

/// Why bytes from a server are not NATS this client can read; the connection must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// No CRLF within [`MAX_CONTROL_LINE`] bytes.
    #[error("control line longer than {MAX_CONTROL_LINE} bytes")]
    LineTooLong,
    /// A payload size past [`MAX_PAYLOAD`].
    #[error("payload of {0} bytes is larger than {MAX_PAYLOAD}")]
    TooLarge(usize),
    /// An operation or its arguments are wrong.
    #[error("malformed operation: {0}")]
    Malformed(&'static str),
}

/// CONNECT without verbose acks, echo or headers, then nothing else.
pub fn connect(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"echo\":false,\"name\":\"");
    // Names are built by loadgen from digits and letters; anything else would break the JSON.
    out.extend(name.bytes().filter(|b| b.is_ascii_alphanumeric() || *b == b'-'));
    out.extend_from_slice(b"\",\"lang\":\"rust\",\"version\":\"");
    out.extend_from_slice(env!("CARGO_PKG_VERSION").as_bytes());
    out.extend_from_slice(b"\",\"protocol\":1}\r\n");
}

/// `SUB <subject> <sid>`.
pub fn sub(out: &mut Vec<u8>, subject: &[u8], sid: &[u8]) {
    out.extend_from_slice(b"SUB ");
    out.extend_from_slice(subject);
    out.push(b' ');
    out.extend_from_slice(sid);
    out.extend_from_slice(b"\r\n");
}

/// `PUB <subject> <size>` and the payload.
pub fn publish(out: &mut Vec<u8>, subject: &[u8], payload: &[u8]) {
    out.extend_from_slice(b"PUB ");
    out.extend_from_slice(subject);
    out.push(b' ');
    push_decimal(out, payload.len());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(payload);
    out.extend_from_slice(b"\r\n");
}

/// `PING`.
pub fn ping(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PING\r\n");
}

/// `PONG`.
pub fn pong(out: &mut Vec<u8>) {
    out.extend_from_slice(b"PONG\r\n");
}

/// Appends `n` in decimal without going through a formatter (it is on the publish path).
fn push_decimal(out: &mut Vec<u8>, mut n: usize) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// A decimal size, bounded by [`MAX_PAYLOAD`].
fn size(s: &[u8]) -> Result<usize, ParseError> {
    if s.is_empty() || s.len() > 9 || !s.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::Malformed("size is not a number"));
    }
    let n = s.iter().fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
    if n > MAX_PAYLOAD {
        return Err(ParseError::TooLarge(n));
    }
    Ok(n)
}

/// Reads one operation from the front of `buf`: `Ok(None)` when it is not all there yet (read
/// more), else the operation and the bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Op<'_>, usize)>, ParseError> {
    let window = &buf[..buf.len().min(MAX_CONTROL_LINE)];
    let Some(eol) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= MAX_CONTROL_LINE { Err(ParseError::LineTooLong) } else { Ok(None) };
    };
    let line = &buf[..eol];
    let after_line = eol + 2;
    let (name, rest) = match line.iter().position(|b| *b == b' ' || *b == b'\t') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[][..]),
    };
    let is = |op: &str| name.eq_ignore_ascii_case(op.as_bytes());
    let op = if is("MSG") || is("HMSG") {
        let args: Vec<&[u8]> = rest.split(|b| *b == b' ' || *b == b'\t').filter(|a| !a.is_empty()).collect();
        // MSG subject sid [reply] size; HMSG subject sid [reply] header_size total_size.
        let sizes = if is("HMSG") { 2 } else { 1 };
        if args.len() != 2 + sizes && args.len() != 3 + sizes {
            return Err(ParseError::Malformed("MSG needs subject, sid, optional reply and size"));
        }
        let reply = (args.len() == 3 + sizes).then(|| args[2]);
        let total = size(args[args.len() - 1])?;
        let headers = if sizes == 2 { size(args[args.len() - 2])? } else { 0 };
        if headers > total {
            return Err(ParseError::Malformed("HMSG headers larger than the message"));
        }
        let end = after_line + total;
        if buf.len() < end + 2 {
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ParseError::Malformed("payload not followed by CRLF"));
        }
        let op = Op::Msg { subject: args[0], sid: args[1], reply, payload: &buf[after_line + headers..end] };
        return Ok(Some((op, end + 2)));
    } else if is("PING") {
        Op::Ping
    } else if is("PONG") {
        Op::Pong
    } else if is("+OK") {
        Op::Ok
    } else if is("-ERR") {
        Op::Err(rest)
    } else if is("INFO") {
        Op::Info(rest)
    } else {
        return Err(ParseError::Malformed("unknown operation"));
    };
    Ok(Some((op, after_line)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one(buf: &[u8]) -> Op<'_> {
        let (op, used) = parse(buf).expect("valid").expect("whole");
        assert_eq!(used, buf.len());
        op
    }

    #[test]
    fn client_operations() {
        let mut out = Vec::new();
        sub(&mut out, b"gps.>", b"1");
        publish(&mut out, b"gps.42", b"hello");
        ping(&mut out);
        pong(&mut out);
        assert_eq!(out, b"SUB gps.> 1\r\nPUB gps.42 5\r\nhello\r\nPING\r\nPONG\r\n");
        out.clear();
        connect(&mut out, "fg-d1 \"x\"");
        let text = String::from_utf8(out).expect("ascii");
        assert!(text.starts_with("CONNECT {") && text.ends_with("}\r\n"), "{text}");
        assert!(text.contains("\"verbose\":false") && text.contains("\"name\":\"fg-d1x\""), "{text}");
    }

    #[test]
    fn server_operations() {
        assert_eq!(one(b"INFO {\"server_id\":\"x\"}\r\n"), Op::Info(b"{\"server_id\":\"x\"}"));
        assert_eq!(one(b"PING\r\n"), Op::Ping);
        assert_eq!(one(b"pong\r\n"), Op::Pong);
        assert_eq!(one(b"+OK\r\n"), Op::Ok);
        assert_eq!(one(b"-ERR 'Unknown Protocol Operation'\r\n"), Op::Err(b"'Unknown Protocol Operation'"));
        assert_eq!(
            one(b"MSG push.7 1 3\r\nabc\r\n"),
            Op::Msg { subject: b"push.7", sid: b"1", reply: None, payload: b"abc" }
        );
        assert_eq!(
            one(b"MSG a 9 r.1 0\r\n\r\n"),
            Op::Msg { subject: b"a", sid: b"9", reply: Some(b"r.1"), payload: b"" }
        );
        assert_eq!(
            one(b"HMSG a 1 12 14\r\nNATS/1.0\r\n\r\nhi\r\n"),
            Op::Msg { subject: b"a", sid: b"1", reply: None, payload: b"hi" }
        );
    }

    #[test]
    fn incomplete_is_none_and_bad_is_an_error() {
        assert_eq!(parse(b""), Ok(None));
        assert_eq!(parse(b"PIN"), Ok(None));
        assert_eq!(parse(b"MSG a 1 3\r\nab"), Ok(None));
        assert_eq!(parse(b"MSG a 1 3\r\nabc\r"), Ok(None));
        assert!(parse(b"MSG a 1 3\r\nabcde").is_err(), "payload longer than its size");
        assert!(parse(b"MSG a 1 x\r\n").is_err());
        assert!(parse(b"MSG a 3\r\n").is_err());
        assert!(parse(b"HELLO\r\n").is_err());
        assert_eq!(parse(b"MSG a 1 99999999\r\n"), Err(ParseError::TooLarge(99_999_999)));
        assert!(parse(b"HMSG a 1 9 3\r\n").is_err(), "headers larger than the message");
        assert_eq!(parse(&vec![b'A'; MAX_CONTROL_LINE]), Err(ParseError::LineTooLong));
    }

    proptest! {
        /// Whatever a server sends, parse answers without panicking and never claims more bytes
        /// than it was given.
        #[test]
        fn arbitrary_bytes_never_panic(buf in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(Some((_, used))) = parse(&buf) {
                prop_assert!(used <= buf.len() && used >= 2);
            }
        }

        /// Lines that look like operations, with arbitrary arguments, never panic either.
        #[test]
        fn operation_shaped_lines_never_panic(
            name in prop::sample::select(vec!["MSG", "HMSG", "msg", "INFO", "-ERR", "PING"]),
            args in "[ a-z0-9.>*]{0,40}",
            body in proptest::collection::vec(any::<u8>(), 0..40),
        ) {
            let mut buf = format!("{name} {args}\r\n").into_bytes();
            buf.extend_from_slice(&body);
            if let Ok(Some((_, used))) = parse(&buf) {
                prop_assert!(used <= buf.len());
            }
        }

        /// A published message comes back, as the server would deliver it, through any split.
        #[test]
        fn messages_round_trip_through_every_split(
            subject in "[a-z0-9.]{1,40}",
            payload in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let mut out = Vec::new();
            publish(&mut out, subject.as_bytes(), &payload);
            // The server's MSG is the client's PUB with a sid: rewrite the head.
            let head = format!("MSG {subject} 1 {}\r\n", payload.len());
            let mut msg = head.into_bytes();
            msg.extend_from_slice(&payload);
            msg.extend_from_slice(b"\r\n");
            for cut in 0..msg.len() {
                prop_assert_eq!(parse(&msg[..cut]), Ok(None));
            }
            let op = Op::Msg { subject: subject.as_bytes(), sid: b"1", reply: None, payload: &payload };
            prop_assert_eq!(parse(&msg), Ok(Some((op, msg.len()))));
            prop_assert!(out.ends_with(&msg[msg.len() - payload.len() - 2..]));
        }
    }
}

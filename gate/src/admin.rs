//! The admin HTTP port (shard 0): `/metrics` (Prometheus text), `/healthz`, `/debug/gps` (the
//! newest forwarded GPS points, one `uid ts_ms lat_e7 lon_e7` line each) and `GET /log` (the log
//! filter in force), open to whoever reaches the port; and two control commands that need the
//! token of `admin.secret_file` as `Authorization: Bearer <token>`: `POST /log?level=FILTER`
//! changes the log filter without a restart, `POST /drain` starts the graceful shutdown SIGTERM
//! starts (go-away to every app, receipts, exit 0). Without a configured token they are refused
//! with 403, a wrong or missing one with 401. docs/OPERATIONS.md shows their use.
//!
//! A deliberately tiny HTTP/1.0-style server: one request per connection, request head bounded
//! at 8 KiB and 5 s, `Connection: close`, no body read. It serves operators and tests, not
//! traffic.

use crate::mesh::Mesh;
use crate::metrics::{self, ShardMetrics};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use schema::wire;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest request head read.
const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Admin connections served at once; more wait in the backlog.
const MAX_CONCURRENT: usize = 16;

/// What the admin endpoint reads.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Every shard's metrics.
    pub metrics: Arc<Vec<ShardMetrics>>,
    /// Inbox depths.
    pub mesh: Arc<Mesh>,
    /// Newest forwarded GPS points.
    pub gps_recent: Arc<Mutex<VecDeque<wire::UidGpsPoint>>>,
    /// Cluster mode: the directory's state, for `/healthz` and `/metrics`.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The control commands' token and what they act on.
    pub control: Control,
}

/// Changes the process's log filter: given tracing directives, installs them; either way returns
/// the filter in force. `main` makes it, since it owns the subscriber.
#[derive(Clone)]
pub struct LogControl(Arc<LogFn>);

/// Reloads (`Some(directives)`) or reads (`None`) the filter; the filter in force, or why not.
type LogFn = dyn Fn(Option<&str>) -> Result<String, String> + Send + Sync;

impl LogControl {
    /// Wraps the function that reloads (`Some`) or reads (`None`) the filter.
    pub fn new(f: impl Fn(Option<&str>) -> Result<String, String> + Send + Sync + 'static) -> LogControl {
        LogControl(Arc::new(f))
    }
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LogControl")
    }
}

/// What the control commands need: the token (`None`: the commands are off) and the log filter.
#[derive(Clone)]
pub struct Control {
    secret: Option<Vec<u8>>,
    log: Option<LogControl>,
}

impl Control {
    /// Commands authorised by `secret` (none: refused), acting on `log` when given.
    pub fn new(secret: Option<Vec<u8>>, log: Option<LogControl>) -> Control {
        Control { secret, log }
    }
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("Control").field("secret", &self.secret.as_ref().map(|_| "<set>")).finish()
    }
}

/// Levels `POST /log?level=` takes alone; anything else must be tracing directives (with `=`),
/// so a misspelt level is refused instead of being read as a target name.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Serves the admin port until `stop` resolves.
pub async fn run(listener: TcpListener, state: AdminState, stop: impl std::future::Future<Output = ()>) {
    let state = Rc::new(state);
    let active = Rc::new(std::cell::Cell::new(0usize));
    let serve = async {
        loop {
            let Ok(stream) = listener.accept().await else {
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            };
            if active.get() >= MAX_CONCURRENT {
                continue; // dropped: the client retries; admin is not worth unbounded tasks
            }
            active.set(active.get() + 1);
            let (state, active) = (state.clone(), active.clone());
            glommio::spawn_local(async move {
                let _ = futures_lite::future::or(handle(stream, &state), async {
                    glommio::timer::sleep(HEAD_TIMEOUT).await;
                    Ok(())
                })
                .await;
                active.set(active.get() - 1);
            })
            .detach();
        }
    };
    futures_lite::future::or(serve, stop).await;
}

async fn handle(mut stream: TcpStream, state: &AdminState) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head);
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => {
            let mut m = metrics::render(&state.metrics, |i| state.mesh.depth(i));
            if let Some(c) = &state.cluster {
                m.push_str(&crate::cluster::render_metrics(c));
            }
            ("200 OK", "text/plain; version=0.0.4", m)
        }
        // Local sessions go on while Redis is away, so the node stays up (200) and says which
        // part is degraded; a load balancer keeps sending apps here.
        ("GET", "/healthz") => match &state.cluster {
            None => ("200 OK", "text/plain", "ok\n".to_string()),
            Some(c) => ("200 OK", "text/plain", crate::cluster::health(c)),
        },
        ("GET", "/debug/gps") => {
            let mut s = String::new();
            if let Ok(recent) = state.gps_recent.lock() {
                for p in recent.iter() {
                    let q = p.point();
                    let _ = writeln!(s, "{} {} {} {}", p.uid(), q.ts_ms(), q.lat_e7(), q.lon_e7());
                }
            }
            ("200 OK", "text/plain", s)
        }
        ("GET", "/log") => match &state.control.log {
            Some(log) => match (log.0)(None) {
                Ok(f) => ("200 OK", "text/plain", format!("{f}\n")),
                Err(e) => ("500 Internal Server Error", "text/plain", format!("{e}\n")),
            },
            None => ("404 Not Found", "text/plain", "this gate's log filter cannot be read\n".to_string()),
        },
        ("POST", "/log" | "/drain") => {
            let peer = stream.peer_addr().map_or_else(|_| "?".to_string(), |a| a.to_string());
            // Headers end at the first empty line; what follows is a body, never a header.
            match authorise(&state.control, lines.take_while(|l| !l.is_empty())) {
                Err((status, why)) => {
                    tracing::warn!(peer = %peer, command = path, "admin: control command refused: {}", why.trim_end());
                    (status, "text/plain", why)
                }
                Ok(()) if path == "/drain" => {
                    // warn, like every control command: an operator's action stays in a log kept at warn.
                    tracing::warn!(peer = %peer, "admin: drain requested: graceful shutdown, as on SIGTERM");
                    state.mesh.shutdown_all();
                    (
                        "202 Accepted",
                        "text/plain",
                        "draining: every app is told to go away (GoAway Shutdown); the gate exits 0 once done\n"
                            .to_string(),
                    )
                }
                Ok(()) => set_log(&state.control, query, &peer),
            }
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /healthz, /debug/gps or /log (POST /log?level=, POST /drain with the admin token)\n"
                .to_string(),
        ),
        ("POST", _) => ("404 Not Found", "text/plain", "POST /log?level=LEVEL or POST /drain\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "GET, or POST for /log and /drain\n".to_string()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(resp.as_bytes()).await?;
    stream.close().await
}

/// Checks the request's `Authorization: Bearer <token>` header against the configured token, in
/// constant time; the refusal's status and a message saying what to do.
fn authorise<'a>(
    control: &Control,
    headers: impl Iterator<Item = &'a str>,
) -> Result<(), (&'static str, String)> {
    let Some(secret) = &control.secret else {
        return Err((
            "403 Forbidden",
            "admin control is off: this gate has no admin.secret_file (FLEETGATE_ADMIN_SECRET_FILE); \
             set one and restart to use POST /log and POST /drain\n"
                .to_string(),
        ));
    };
    let given = headers
        .filter_map(|h| h.split_once(':'))
        .find_map(|(name, value)| name.trim().eq_ignore_ascii_case("authorization").then(|| value.trim()));
    let token = given.and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    match token {
        None => Err((
            "401 Unauthorized",
            "missing header: Authorization: Bearer <the token in admin.secret_file>\n".to_string(),
        )),
        Some(t) if crate::sidecar::constant_time_eq(t.as_bytes(), secret) => Ok(()),
        Some(_) => Err(("401 Unauthorized", "wrong admin token\n".to_string())),
    }
}

/// `POST /log?level=FILTER`: a level alone, or tracing directives (`info,gate::sidecar=debug`).
fn set_log(control: &Control, query: &str, peer: &str) -> (&'static str, &'static str, String) {
    let Some(log) = &control.log else {
        return ("404 Not Found", "text/plain", "this gate's log filter cannot be changed\n".to_string());
    };
    let level = query.split('&').find_map(|kv| kv.strip_prefix("level=")).map(percent_decode);
    let bad = |why: String| ("400 Bad Request", "text/plain", why);
    let level = match level {
        Some(Some(l)) if !l.trim().is_empty() => l.trim().to_string(),
        Some(None) => return bad("level: bad %-escape\n".to_string()),
        _ => return bad("give the filter as ?level=LEVEL (error, warn, info, debug, trace, off) or ?level=DIRECTIVES (info,gate::sidecar=debug)\n".to_string()),
    };
    if !level.contains('=') && !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
        return bad(format!(
            "level {level:?} is not one of error, warn, info, debug, trace, off, nor directives like info,gate::sidecar=debug\n"
        ));
    }
    let before = (log.0)(None).unwrap_or_default();
    match (log.0)(Some(&level)) {
        Ok(now) => {
            tracing::warn!(peer = %peer, from = %before, to = %now, "admin: log filter changed");
            ("200 OK", "text/plain", format!("log filter: {now} (was {before})\n"))
        }
        Err(e) => bad(format!("level {level:?}: {e}\n")),
    }
}

/// `%XX` escapes and `+` (a space) of a query value; `None` for a broken escape.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                out.push(u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?);
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn control(secret: Option<&str>) -> Control {
        Control::new(secret.map(|s| s.as_bytes().to_vec()), None)
    }

    #[test]
    fn the_token_is_checked_and_its_absence_said() {
        let on = control(Some("0123456789abcdef"));
        assert!(authorise(&on, ["Authorization: Bearer 0123456789abcdef"].into_iter()).is_ok());
        assert!(authorise(&on, ["authorization:bearer   0123456789abcdef  "].into_iter()).is_ok());
        assert!(authorise(&on, ["AUTHORIZATION: bearer 0123456789abcdef"].into_iter()).is_ok());
        let wrong = authorise(&on, ["Authorization: Bearer 0123456789abcdeX"].into_iter()).unwrap_err();
        assert_eq!(wrong.0, "401 Unauthorized");
        let missing = authorise(&on, ["Host: x"].into_iter()).unwrap_err();
        assert!(missing.1.contains("Authorization: Bearer"), "{}", missing.1);
        let off =
            authorise(&control(None), ["Authorization: Bearer 0123456789abcdef"].into_iter()).unwrap_err();
        assert_eq!(off.0, "403 Forbidden");
        assert!(off.1.contains("admin.secret_file"), "{}", off.1);
    }

    #[test]
    fn levels_are_checked_before_the_filter_changes() {
        let log = LogControl::new(|d| Ok(d.unwrap_or("info").to_string()));
        let c = Control::new(None, Some(log));
        assert_eq!(set_log(&c, "level=debug", "t").0, "200 OK");
        assert_eq!(set_log(&c, "level=info%2Cgate%3A%3Asidecar%3Ddebug", "t").0, "200 OK");
        assert_eq!(set_log(&c, "level=debugg", "t").0, "400 Bad Request");
        assert_eq!(set_log(&c, "level=%zz", "t").0, "400 Bad Request");
        assert_eq!(set_log(&c, "", "t").0, "400 Bad Request");
    }

    proptest! {
        /// Escapes round-trip, and any input decodes or is refused without panicking.
        #[test]
        fn percent_decoding(s in ".{0,40}", raw in "[%+a-zA-Z0-9]{0,20}") {
            let encoded: String = s.bytes().map(|b| format!("%{b:02X}")).collect();
            prop_assert_eq!(percent_decode(&encoded), Some(s));
            let _ = percent_decode(&raw);
        }
    }
}

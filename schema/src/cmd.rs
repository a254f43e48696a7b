//! The command registry: every `cmd` number, and which body table each (cmd, type) carries.

use crate::header::FrameType;

/// Defines `Cmd` with its wire numbers in one place, so the number, the name and the parser
/// cannot drift apart.
macro_rules! commands {
    ($($(#[$doc:meta])* $name:ident = $num:expr,)*) => {
        /// A command number. Values are stable forever; new commands take new numbers.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(u16)]
        pub enum Cmd { $($(#[$doc])* $name = $num,)* }

        impl Cmd {
            /// Every command, in registry order.
            pub const ALL: &'static [Cmd] = &[$(Cmd::$name,)*];

            /// Parses a command number; `None` for numbers this build does not know.
            #[inline]
            pub const fn from_u16(v: u16) -> Option<Cmd> {
                match v { $($num => Some(Cmd::$name),)* _ => None }
            }

            /// The command's name as written in docs/PROTOCOL.md and in metrics labels.
            pub const fn name(self) -> &'static str {
                match self { $(Cmd::$name => stringify!($name),)* }
            }
        }
    };
}

commands! {
    // --- app <-> gate: session ---
    /// Request: `Login` → Response: `Session`.
    Login = 0x0001,
    /// Request: `Resume` → Response: `Session`.
    Resume = 0x0002,
    /// Request: `Keepalive` → Response: `Keepalive`.
    Keepalive = 0x0003,
    /// Request: `Logout` → Response: `Logout`.
    Logout = 0x0004,
    /// Push (gate → app): `GoAway`; the gate then closes.
    GoAway = 0x0005,
    /// Error (either way): `Error`.
    Error = 0x000F,
    // --- app -> gate: GPS ---
    /// Event: `GpsReport` (one point).
    GpsReport = 0x0010,
    /// Event: `GpsBatch` (several points, oldest first).
    GpsBatch = 0x0011,
    // --- app -> gate -> app-server: business requests ---
    /// Request: `PlaceOrder` → Response: `Reply`.
    PlaceOrder = 0x0020,
    /// Request: `GrabOrder` → Response: `Reply`.
    GrabOrder = 0x0021,
    /// Request: `OrderStatusQuery` → Response: `Reply` (payload: `OrderStatus`).
    OrderStatus = 0x0022,
    /// Request: `BusinessRequest` → Response: `Reply`.
    BusinessRequest = 0x0023,
    // --- gate -> app: pushes ---
    /// Push: `PushDelivery`; the app answers with `PushAck` of the same sequence-id.
    PushDelivery = 0x0030,
    /// Ack: `PushAck`.
    PushAck = 0x0031,
    // --- sidecar: app-server <-> gate ---
    /// Request: `AppServerHello` → Response: `AppServerWelcome`.
    AppServerHello = 0x0100,
    /// Request: `Push` → Response: `PushAccepted`.
    Push = 0x0101,
    /// Push (gate → app-server): `Receipts`; acked with `ReceiptsAck`.
    Receipts = 0x0102,
    /// Ack (app-server → gate): `ReceiptsAck`.
    ReceiptsAck = 0x0103,
    /// Event (gate → app-server): `GpsForward`.
    GpsForward = 0x0104,
    /// Request (gate → app-server): `Upstream` → Response: `UpstreamReply`.
    Upstream = 0x0105,
    /// Event (gate → app-server): `Unreachable`.
    Unreachable = 0x0106,
    /// Request (app-server → gate): `EndSession` → Response: `SessionEnded`.
    EndSession = 0x0107,
    /// Request (app-server -> gate): `GeoPush` → Response: `GeoChosen`.
    GeoPush = 0x0108,
    /// Request (app-server -> gate): `GeoQuery` → Response: `GeoChosen`.
    GeoQuery = 0x0109,
}

impl Cmd {
    /// Number of dense slots `slot()` maps into.
    pub const SLOTS: usize = 0x60;

    /// A dense index below `SLOTS`, for per-cmd counters without a lookup.
    #[inline]
    pub const fn slot(self) -> usize {
        let v = self as u16 as usize;
        // App commands are below 0x40, sidecar commands 0x100..0x120.
        if v < 0x100 {
            v
        } else {
            0x40 + (v - 0x100)
        }
    }

    /// True for commands of the sidecar port (app-server side).
    pub const fn is_sidecar(self) -> bool {
        (self as u16) >= 0x0100
    }

    /// True for app requests the gate forwards to an app-server.
    pub const fn is_upstream_request(self) -> bool {
        matches!(self, Cmd::PlaceOrder | Cmd::GrabOrder | Cmd::OrderStatus | Cmd::BusinessRequest)
    }
}

// `BodyKind` is defined with `Body` from one list of the tables, in `decode.rs`.
pub use crate::decode::BodyKind;

/// The body table a (cmd, type) pair carries, or `None` when the pair is not in the protocol.
pub const fn body_kind(cmd: Cmd, ty: FrameType) -> Option<BodyKind> {
    use FrameType::*;
    Some(match (cmd, ty) {
        (Cmd::Login, Request) => BodyKind::Login,
        (Cmd::Login | Cmd::Resume, Response) => BodyKind::Session,
        (Cmd::Resume, Request) => BodyKind::Resume,
        (Cmd::Keepalive, Request | Response) => BodyKind::Keepalive,
        (Cmd::Logout, Request | Response) => BodyKind::Logout,
        (Cmd::GoAway, Push) => BodyKind::GoAway,
        (Cmd::Error, Error) => BodyKind::Error,
        (Cmd::GpsReport, Event) => BodyKind::GpsReport,
        (Cmd::GpsBatch, Event) => BodyKind::GpsBatch,
        (Cmd::PlaceOrder, Request) => BodyKind::PlaceOrder,
        (Cmd::GrabOrder, Request) => BodyKind::GrabOrder,
        (Cmd::OrderStatus, Request) => BodyKind::OrderStatusQuery,
        (Cmd::BusinessRequest, Request) => BodyKind::BusinessRequest,
        (Cmd::PlaceOrder | Cmd::GrabOrder | Cmd::OrderStatus | Cmd::BusinessRequest, Response) => {
            BodyKind::Reply
        }
        (Cmd::PushDelivery, Push) => BodyKind::PushDelivery,
        (Cmd::PushAck, Ack) => BodyKind::PushAck,
        (Cmd::AppServerHello, Request) => BodyKind::AppServerHello,
        (Cmd::AppServerHello, Response) => BodyKind::AppServerWelcome,
        (Cmd::Push, Request) => BodyKind::Push,
        (Cmd::Push, Response) => BodyKind::PushAccepted,
        (Cmd::Receipts, Push) => BodyKind::Receipts,
        (Cmd::ReceiptsAck, Ack) => BodyKind::ReceiptsAck,
        (Cmd::GpsForward, Event) => BodyKind::GpsForward,
        (Cmd::Upstream, Request) => BodyKind::Upstream,
        (Cmd::Upstream, Response) => BodyKind::UpstreamReply,
        (Cmd::Unreachable, Event) => BodyKind::Unreachable,
        (Cmd::EndSession, Request) => BodyKind::EndSession,
        (Cmd::EndSession, Response) => BodyKind::SessionEnded,
        (Cmd::GeoPush, Request) => BodyKind::GeoPush,
        (Cmd::GeoQuery, Request) => BodyKind::GeoQuery,
        (Cmd::GeoPush | Cmd::GeoQuery, Response) => BodyKind::GeoChosen,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_dense_and_distinct() {
        let mut seen = [false; Cmd::SLOTS];
        for c in Cmd::ALL {
            assert!(c.slot() < Cmd::SLOTS, "{c:?}");
            assert!(!seen[c.slot()], "{c:?} shares a slot");
            seen[c.slot()] = true;
            assert_eq!(Cmd::from_u16(*c as u16), Some(*c));
        }
    }
}

//! Delivery to the app-server, with no socket and no clock of its own: what waits for an
//! app-server connection (receipts, upstream requests, GPS, unreachable events), the receipt
//! batching window, receipt batches sent and not acked per connection (resent on another when
//! one drops), the upstream requests each connection carries, sequence-ids, and round robin
//! over a shard's app-server connections. The shard's loop feeds it `now` (monotonic ms) and
//! the frames' answers, and writes what [`Delivery::poll`] returns.

use logic::{ConnRef, Receipt};
use schema::wire::UidGpsPoint;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};

/// Which shards hold ready app-server connections, shared by all executors.
#[derive(Debug)]
pub struct Registry {
    per_shard: Vec<AtomicU32>,
    next: AtomicUsize,
}

impl Registry {
    /// A registry for `shards` shards.
    pub fn new(shards: usize) -> Registry {
        Registry { per_shard: (0..shards).map(|_| AtomicU32::new(0)).collect(), next: AtomicUsize::new(0) }
    }

    /// True when any shard holds an app-server connection.
    pub fn any(&self) -> bool {
        self.per_shard.iter().any(|c| c.load(Relaxed) > 0)
    }

    /// Ready connections on `shard`.
    pub fn on(&self, shard: usize) -> u32 {
        self.per_shard[shard].load(Relaxed)
    }

    /// One more (`up`) or one fewer ready connection on `shard`.
    pub fn count(&self, shard: usize, up: bool) {
        if up {
            self.per_shard[shard].fetch_add(1, Relaxed);
        } else {
            self.per_shard[shard].fetch_sub(1, Relaxed);
        }
    }

    /// Another shard with a connection, round robin.
    pub fn pick_other(&self, me: usize) -> Option<usize> {
        let n = self.per_shard.len();
        let start = self.next.fetch_add(1, Relaxed);
        (0..n).map(|i| (start + i) % n).find(|&s| s != me && self.per_shard[s].load(Relaxed) > 0)
    }
}

/// Receipts per Receipts frame.
pub const RECEIPTS_PER_FRAME: usize = 4096;
/// How long a receipt may wait for others to share its frame: acks arrive one by one, and a
/// frame (and an app-server ack) per receipt would cost a syscall pair per delivery.
pub const RECEIPT_WINDOW_MS: u64 = 2;
/// GPS points per GpsForward frame (32 bytes each: 128 KiB).
pub const GPS_PER_FRAME: usize = 4096;
/// Receipt batches a connection may have unacked before it gets no more.
pub const MAX_UNACKED_BATCHES: usize = 1024;
/// Receipts kept while no app-server is connected anywhere; past it the oldest are dropped.
pub const MAX_RECEIPT_BACKLOG: usize = 1 << 20;
/// Upstream requests one connection remembers unanswered; past it the oldest are forgotten
/// (their requests still end at the logic shard's deadline).
pub const MAX_UPSTREAM_PER_CONN: usize = 1 << 17;

/// An app request on its way to an app-server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamOut {
    /// The gate's id for it.
    pub request_id: u64,
    /// The app.
    pub uid: u64,
    /// Its `wire::Role` value.
    pub role: u8,
    /// The app's cmd.
    pub cmd: u16,
    /// The app's body.
    pub body: Vec<u8>,
    /// The app's log-id.
    pub log_id: u64,
}

/// What one executor sends another for its app-server connections.
#[derive(Debug)]
pub enum AppServerMsg {
    /// Final receipts.
    Receipts(Vec<Receipt>),
    /// A request from an app.
    Upstream(UpstreamOut),
    /// Coalesced GPS.
    Gps(Vec<UidGpsPoint>),
    /// Sessions that ended without logout: (uid, outcome).
    Unreachable(Vec<(u64, u8)>),
    /// An app-server connected somewhere: send what waited.
    Available,
}

/// A frame to write to one app-server connection.
#[derive(Debug, PartialEq)]
pub enum Out {
    /// A batch of receipts, acked by `batch_id`.
    Receipts {
        /// The connection.
        conn: ConnRef,
        /// Its sequence-id on that connection (never 0).
        seq: u32,
        /// The batch's id, the same when resent.
        batch_id: u64,
        /// The receipts.
        receipts: Vec<Receipt>,
    },
    /// An app request.
    Upstream {
        /// The connection.
        conn: ConnRef,
        /// Its sequence-id on that connection.
        seq: u32,
        /// The request.
        request: UpstreamOut,
    },
    /// Coalesced GPS.
    Gps {
        /// The connection.
        conn: ConnRef,
        /// The points (at most `GPS_PER_FRAME`).
        points: Vec<UidGpsPoint>,
    },
    /// A session ended without logout.
    Unreachable {
        /// The connection.
        conn: ConnRef,
        /// The user.
        uid: u64,
        /// `wire::Outcome` value.
        outcome: u8,
    },
}

/// What no connection of this shard could take, for the shard to pass on.
#[derive(Debug, Default, PartialEq)]
pub struct Elsewhere {
    /// Receipts for a shard that has an app-server connection.
    pub receipts: Vec<Receipt>,
    /// Requests for it.
    pub upstream: Vec<UpstreamOut>,
    /// GPS for it.
    pub gps: Vec<UidGpsPoint>,
    /// Unreachable events for it.
    pub unreachable: Vec<(u64, u8)>,
}

/// What one `poll` decided.
#[derive(Debug, Default, PartialEq)]
pub struct Polled {
    /// Frames for this shard's connections.
    pub out: Vec<Out>,
    /// With no connection here: what goes to another shard that has one.
    pub elsewhere: Elsewhere,
    /// With no connection anywhere: requests that fail (NoAppServer).
    pub failed: Vec<u64>,
    /// With no connection anywhere: GPS points dropped (it is soon stale).
    pub gps_dropped: usize,
    /// Receipts dropped because the backlog was full (counted, logged).
    pub receipts_dropped: usize,
}

/// One ready app-server connection.
#[derive(Debug)]
struct Link {
    conn: ConnRef,
    next_seq: u32,
    /// Receipt batches sent and not acked, by batch id.
    unacked: BTreeMap<u64, Vec<Receipt>>,
    /// Upstream requests sent and not answered: sequence-id → request id.
    upstream: BTreeMap<u32, u64>,
}

impl Link {
    fn take_seq(&mut self) -> u32 {
        self.next_seq = self.next_seq.wrapping_add(1).max(1);
        self.next_seq
    }
}

/// What a dropped connection leaves behind.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    /// Receipts it had not acked (they went back to the front of the queue).
    pub unacked_receipts: usize,
    /// Requests it carried unanswered: they fail now (NoAppServer).
    pub failed_requests: Vec<u64>,
}

/// One shard's delivery toward app-servers.
#[derive(Debug)]
pub struct Delivery {
    shard: u16,
    receipts: Vec<Receipt>,
    receipts_due: Option<u64>,
    upstream: Vec<UpstreamOut>,
    gps: Vec<UidGpsPoint>,
    unreachable: Vec<(u64, u8)>,
    links: Vec<Link>,
    rr: usize,
    next_batch: u64,
}

impl Delivery {
    /// Nothing waiting, no connection, for gate shard `shard`.
    pub fn new(shard: u16) -> Delivery {
        Delivery {
            shard,
            receipts: Vec::new(),
            receipts_due: None,
            upstream: Vec::new(),
            gps: Vec::new(),
            unreachable: Vec::new(),
            links: Vec::new(),
            rr: 0,
            next_batch: 0,
        }
    }

    /// A receipt produced at `now`: it waits up to `RECEIPT_WINDOW_MS` for company.
    pub fn receipt(&mut self, now: u64, r: Receipt) {
        if self.receipts.is_empty() {
            self.receipts_due = Some(now + RECEIPT_WINDOW_MS);
        }
        self.receipts.push(r);
    }

    /// Receipts passed on by another shard (their window already ran there).
    pub fn receipts_from_elsewhere(&mut self, now: u64, rs: Vec<Receipt>) {
        if rs.is_empty() {
            return;
        }
        self.receipts_due = Some(self.receipts_due.map_or(now, |d| d.min(now)));
        self.receipts.extend(rs);
    }

    /// An app request for the app-server.
    pub fn upstream(&mut self, u: UpstreamOut) {
        self.upstream.push(u);
    }

    /// GPS for the app-server.
    pub fn gps(&mut self, points: &[UidGpsPoint]) {
        self.gps.extend_from_slice(points);
    }

    /// A session ended without logout.
    pub fn unreachable(&mut self, uid: u64, outcome: u8) {
        self.unreachable.push((uid, outcome));
    }

    /// True when nothing waits.
    pub fn is_idle(&self) -> bool {
        self.receipts.is_empty()
            && self.upstream.is_empty()
            && self.gps.is_empty()
            && self.unreachable.is_empty()
    }

    /// Receipts waiting here.
    pub fn receipts_waiting(&self) -> usize {
        self.receipts.len()
    }

    /// Receipt batches sent on this shard's connections and not acked.
    pub fn unacked_batches(&self) -> usize {
        self.links.iter().map(|l| l.unacked.len()).sum()
    }

    /// This shard's ready connections.
    pub fn links(&self) -> usize {
        self.links.len()
    }

    /// When `poll` next has work that waits for time (the receipt window).
    pub fn next_deadline(&self) -> Option<u64> {
        if self.receipts.is_empty() {
            None
        } else {
            self.receipts_due
        }
    }

    /// An app-server connection passed its hello.
    pub fn link_up(&mut self, conn: ConnRef) {
        self.links.push(Link { conn, next_seq: 0, unacked: BTreeMap::new(), upstream: BTreeMap::new() });
    }

    /// An app-server connection ended: its unacked receipts go back to the front of the queue,
    /// due at once, and the requests it carried fail.
    pub fn link_down(&mut self, now: u64, conn: ConnRef) -> Dropped {
        let Some(i) = self.links.iter().position(|l| l.conn == conn) else { return Dropped::default() };
        let link = self.links.remove(i);
        let mut back: Vec<Receipt> = link.unacked.into_values().flatten().collect();
        let unacked_receipts = back.len();
        if !back.is_empty() {
            back.append(&mut self.receipts);
            self.receipts = back;
            self.receipts_due = Some(now);
        }
        Dropped { unacked_receipts, failed_requests: link.upstream.into_values().collect() }
    }

    /// The app-server acked a receipt batch.
    pub fn acked(&mut self, conn: ConnRef, batch_id: u64) {
        if let Some(l) = self.links.iter_mut().find(|l| l.conn == conn) {
            l.unacked.remove(&batch_id);
        }
    }

    /// An answer (a Response or an Error) came on `conn` with sequence-id `seq`: the request it
    /// answers, if that connection carried one.
    pub fn answered(&mut self, conn: ConnRef, seq: u32) -> Option<u64> {
        self.links.iter_mut().find(|l| l.conn == conn).and_then(|l| l.upstream.remove(&seq))
    }

    /// Decides what goes where now. `shutting_down` sends receipts without waiting out their
    /// window; `other` finds another shard with an app-server connection when this one has none.
    pub fn poll(
        &mut self,
        now: u64,
        shutting_down: bool,
        other: impl FnOnce() -> Option<usize>,
    ) -> (Polled, Option<usize>) {
        let mut p = Polled::default();
        if self.is_idle() {
            return (p, None);
        }
        let receipts_ready = self.receipts.len() >= RECEIPTS_PER_FRAME
            || shutting_down
            || self.receipts_due.is_none_or(|due| due <= now);
        let receipts = if receipts_ready {
            self.receipts_due = None;
            std::mem::take(&mut self.receipts)
        } else {
            Vec::new()
        };
        let upstream = std::mem::take(&mut self.upstream);
        let gps = std::mem::take(&mut self.gps);
        let unreachable = std::mem::take(&mut self.unreachable);
        if !self.links.is_empty() {
            self.send_local(&mut p, receipts, upstream, gps, unreachable, now);
            return (p, None);
        }
        match other() {
            Some(dest) => {
                p.elsewhere = Elsewhere { receipts, upstream, gps, unreachable };
                (p, Some(dest))
            }
            None => {
                p.failed = upstream.into_iter().map(|u| u.request_id).collect();
                p.gps_dropped = gps.len();
                // Unreachable events wait like receipts (they are few), bounded the same way.
                if unreachable.len() < MAX_RECEIPT_BACKLOG {
                    self.unreachable.splice(0..0, unreachable);
                }
                p.receipts_dropped = self.keep_receipts(now, receipts);
                (p, None)
            }
        }
    }

    /// Puts receipts back at the front, due on the next poll, bounded by the backlog.
    fn keep_receipts(&mut self, now: u64, mut receipts: Vec<Receipt>) -> usize {
        receipts.append(&mut self.receipts);
        if !receipts.is_empty() && self.receipts_due.is_none() {
            self.receipts_due = Some(now);
        }
        let excess = receipts.len().saturating_sub(MAX_RECEIPT_BACKLOG);
        receipts.drain(..excess);
        self.receipts = receipts;
        excess
    }

    fn next_link(&mut self) -> usize {
        self.rr = self.rr.wrapping_add(1);
        self.rr % self.links.len()
    }

    fn send_local(
        &mut self,
        p: &mut Polled,
        receipts: Vec<Receipt>,
        upstream: Vec<UpstreamOut>,
        gps: Vec<UidGpsPoint>,
        unreachable: Vec<(u64, u8)>,
        now: u64,
    ) {
        for (uid, outcome) in unreachable {
            let i = self.next_link();
            p.out.push(Out::Unreachable { conn: self.links[i].conn, uid, outcome });
        }
        for request in upstream {
            let i = self.next_link();
            let link = &mut self.links[i];
            let seq = link.take_seq();
            link.upstream.insert(seq, request.request_id);
            if link.upstream.len() > MAX_UPSTREAM_PER_CONN {
                link.upstream.pop_first();
            }
            p.out.push(Out::Upstream { conn: link.conn, seq, request });
        }
        for chunk in gps.chunks(GPS_PER_FRAME) {
            let i = self.next_link();
            p.out.push(Out::Gps { conn: self.links[i].conn, points: chunk.to_vec() });
        }
        // Receipts: in batches the app-server acks; a connection with too many unacked batches
        // gets no more until it catches up, and what no connection takes waits here.
        let mut start = 0;
        let mut refusals = 0;
        while start < receipts.len() && refusals < self.links.len() {
            let i = self.next_link();
            let end = (start + RECEIPTS_PER_FRAME).min(receipts.len());
            if self.links[i].unacked.len() >= MAX_UNACKED_BATCHES {
                refusals += 1;
                continue;
            }
            self.next_batch += 1;
            let batch_id = ((self.shard as u64) << 48) | (self.next_batch & ((1 << 48) - 1));
            let link = &mut self.links[i];
            let batch = receipts[start..end].to_vec();
            // A resent batch is not measured again: its ack times were observed once.
            link.unacked.insert(batch_id, batch.iter().map(|r| Receipt { acked_us: 0, ..*r }).collect());
            let seq = link.take_seq();
            p.out.push(Out::Receipts { conn: link.conn, seq, batch_id, receipts: batch });
            start = end;
        }
        if start < receipts.len() {
            p.receipts_dropped += self.keep_receipts(now, receipts[start..].to_vec());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn c(slot: u32) -> ConnRef {
        ConnRef { shard: 0, slot, gen: 1 }
    }

    fn r(message_id: u64) -> Receipt {
        Receipt { message_id, uid: 1, outcome: 1, log_id: 0, origin: logic::LOCAL, acked_us: 0 }
    }

    fn up(request_id: u64) -> UpstreamOut {
        UpstreamOut { request_id, uid: 1, role: 1, cmd: 0x20, body: vec![], log_id: 9 }
    }

    #[test]
    fn receipts_wait_out_their_window_then_go_in_one_batch() {
        let mut d = Delivery::new(0);
        d.link_up(c(1));
        d.receipt(100, r(1));
        d.receipt(101, r(2));
        assert_eq!(d.next_deadline(), Some(102));
        assert!(d.poll(101, false, || None).0.out.is_empty());
        let (p, _) = d.poll(102, false, || None);
        match &p.out[..] {
            [Out::Receipts { seq: 1, receipts, .. }] => assert_eq!(receipts.len(), 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(d.unacked_batches(), 1);
    }

    #[test]
    fn a_dropped_connection_resends_its_batches_elsewhere_with_the_same_ids_and_fails_its_requests() {
        let mut d = Delivery::new(0);
        d.link_up(c(1));
        d.receipt(0, r(1));
        d.upstream(up(77));
        let (p, _) = d.poll(10, false, || None);
        let batch = p.out.iter().find_map(|o| match o {
            Out::Receipts { batch_id, .. } => Some(*batch_id),
            _ => None,
        });
        let dropped = d.link_down(20, c(1));
        assert_eq!(dropped, Dropped { unacked_receipts: 1, failed_requests: vec![77] });
        d.link_up(c(2));
        let (p, _) = d.poll(20, false, || None);
        match &p.out[..] {
            [Out::Receipts { conn, batch_id, .. }] => {
                assert_eq!(*conn, c(2));
                // A new batch id is fine: the app-server matches receipts by (message_id, uid).
                assert!(batch.is_some() && *batch_id != 0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn answers_find_their_requests_once() {
        let mut d = Delivery::new(0);
        d.link_up(c(1));
        d.upstream(up(5));
        let (p, _) = d.poll(0, false, || None);
        let seq = match &p.out[..] {
            [Out::Upstream { seq, .. }] => *seq,
            other => panic!("{other:?}"),
        };
        assert_eq!(d.answered(c(2), seq), None, "another connection's sequence space");
        assert_eq!(d.answered(c(1), seq), Some(5));
        assert_eq!(d.answered(c(1), seq), None);
    }

    #[test]
    fn with_no_connection_anywhere_requests_fail_gps_drops_and_receipts_wait() {
        let mut d = Delivery::new(0);
        d.receipt(0, r(1));
        d.upstream(up(3));
        d.gps(&[UidGpsPoint::default()]);
        d.unreachable(4, 8);
        let (p, dest) = d.poll(5, false, || None);
        assert_eq!((p.failed, p.gps_dropped, dest), (vec![3], 1, None));
        assert_eq!(d.receipts_waiting(), 1);
        let (p, dest) = d.poll(6, false, || Some(1));
        assert_eq!(dest, Some(1));
        assert_eq!(p.elsewhere.receipts.len(), 1);
        assert_eq!(p.elsewhere.unreachable, vec![(4, 8)]);
    }

    #[test]
    fn a_connection_with_too_many_unacked_batches_gets_no_more() {
        let mut d = Delivery::new(0);
        d.link_up(c(1));
        for i in 0..MAX_UNACKED_BATCHES as u64 + 1 {
            d.receipts_from_elsewhere(i, vec![r(i)]);
            d.poll(i, false, || None);
        }
        assert_eq!(d.unacked_batches(), MAX_UNACKED_BATCHES);
        assert_eq!(d.receipts_waiting(), 1);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Receipt,
        Up(u8),
        Down(u8),
        Ack(u8),
        Time(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => Just(Step::Receipt),
            1 => (0u8..3).prop_map(Step::Up),
            1 => (0u8..3).prop_map(Step::Down),
            3 => (0u8..3).prop_map(Step::Ack),
            2 => (0u8..5).prop_map(Step::Time),
        ]
    }

    proptest! {
        /// Whatever connections come, go and ack, every receipt is acked exactly once in the
        /// end, and none is lost while it waits or travels.
        #[test]
        fn every_receipt_is_acked_once(steps in proptest::collection::vec(step(), 1..200)) {
            let mut d = Delivery::new(0);
            let mut now = 0;
            let mut next_id = 0;
            let mut up_links = std::collections::BTreeSet::new();
            // batch id → (conn, receipts) as written to the wire, not acked yet.
            let mut in_flight: HashMap<u64, (ConnRef, Vec<u64>)> = HashMap::new();
            let mut acked: HashMap<u64, u32> = HashMap::new();
            let run = |d: &mut Delivery, now: u64, in_flight: &mut HashMap<u64, (ConnRef, Vec<u64>)>| {
                let (p, _) = d.poll(now, false, || None);
                prop_assert_eq!(p.receipts_dropped, 0);
                for o in p.out {
                    if let Out::Receipts { conn, batch_id, receipts, .. } = o {
                        in_flight.insert(batch_id, (conn, receipts.iter().map(|r| r.message_id).collect()));
                    }
                }
                Ok(())
            };
            for s in steps {
                match s {
                    Step::Receipt => { d.receipt(now, r(next_id)); next_id += 1; }
                    Step::Up(i) => if up_links.insert(i) { d.link_up(c(i as u32)); },
                    Step::Down(i) => if up_links.remove(&i) {
                        d.link_down(now, c(i as u32));
                        in_flight.retain(|_, (conn, _)| *conn != c(i as u32));
                    },
                    Step::Ack(i) => {
                        let batch = in_flight.iter().find(|(_, (conn, _))| *conn == c(i as u32)).map(|(b, _)| *b);
                        if let Some(b) = batch {
                            let (conn, ids) = in_flight.remove(&b).unwrap();
                            d.acked(conn, b);
                            for id in ids { *acked.entry(id).or_default() += 1; }
                        }
                    }
                    Step::Time(t) => now += t as u64,
                }
                run(&mut d, now, &mut in_flight)?;
            }
            // Then a connection stays up and acks everything.
            d.link_up(c(9));
            for _ in 0..10 {
                now += RECEIPT_WINDOW_MS;
                run(&mut d, now, &mut in_flight)?;
                for (b, (conn, ids)) in std::mem::take(&mut in_flight) {
                    d.acked(conn, b);
                    for id in ids { *acked.entry(id).or_default() += 1; }
                }
                for i in 0..3u8 { if up_links.remove(&i) { d.link_down(now, c(i as u32)); } }
            }
            prop_assert_eq!(acked.len() as u64, next_id, "every receipt acked");
            prop_assert!(acked.values().all(|&n| n == 1), "none acked twice");
            prop_assert_eq!(d.unacked_batches(), 0);
        }
    }
}

//! Services: one server endpoint serving many clients, each over its own
//! two-party channel (fan-in of channels, never a shared multi-writer ring).
//!
//! Fairness and isolation come from the structure: each client owns its own
//! request ring, so a client that floods, stalls, stops reading its replies,
//! corrupts its segment or dies only affects its own channel. Per round the
//! server takes at most `quota` requests from each client.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use crate::bytes::{ShmSlice, SlotWriter};
use crate::channel::{ChannelError, HandlerResult, ServerChannel, ServerEnd, WaitStrategy};
use crate::doorbell;

/// Identifies one client of a [`Server`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u64);

/// Why a client left the server.
#[derive(Debug)]
pub enum ClientGone {
    /// It closed its end or died.
    Disconnected(ClientId),
    /// It broke the protocol; its channel was dropped.
    Misbehaved(ClientId, ChannelError),
}

/// A fan-in server over many channels.
#[derive(Debug)]
pub struct Server {
    clients: Vec<(ClientId, ServerChannel)>,
    next_id: u64,
    quota: u32,
    wait: WaitStrategy,
    /// Set by [`Server::set_draining`]: channels added later are marked too.
    draining: bool,
    /// Moving average of idle periods, in ns.
    avg_idle_ns: u64,
}

impl Default for Server {
    fn default() -> Self {
        Self::new()
    }
}

impl Server {
    /// A server with no clients, a quota of 8 requests per client per
    /// round, and the default wait strategy.
    pub fn new() -> Self {
        Self {
            clients: Vec::new(),
            next_id: 1,
            quota: 8,
            wait: WaitStrategy::default(),
            draining: false,
            avg_idle_ns: 0,
        }
    }

    /// Sets the most requests one client gets served per round (at least 1).
    pub fn set_quota(&mut self, quota: u32) {
        self.quota = quota.max(1);
    }

    /// Sets how long to spin before parking: at least `wait.spin`, and,
    /// while requests come at most `wait.adaptive_max / 2` apart on
    /// average, twice that average (an idle server parks after `spin`).
    pub fn set_wait(&mut self, wait: WaitStrategy) {
        self.wait = wait;
    }

    /// Opens and adds a client's channel.
    pub fn add(&mut self, end: ServerEnd) -> Result<ClientId, ChannelError> {
        Ok(self.add_channel(ServerChannel::open(end)?))
    }

    /// Adds an open channel.
    pub fn add_channel(&mut self, channel: ServerChannel) -> ClientId {
        if self.draining {
            channel.set_draining();
        }
        let id = ClientId(self.next_id);
        self.next_id += 1;
        self.clients.push((id, channel));
        id
    }

    /// Tells every client, and every client added from now on, that this
    /// server is draining ([`ServerChannel::set_draining`]): a client with
    /// another server moves there. The server goes on serving.
    pub fn set_draining(&mut self) {
        self.draining = true;
        for (_, ch) in &self.clients {
            ch.set_draining();
        }
    }

    /// Number of connected clients.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether no client is connected.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Serves up to `quota` pending requests of each client, once around.
    /// Clients that are gone or misbehaved are removed and reported.
    pub fn serve_round(
        &mut self,
        handler: &mut impl FnMut(ClientId, ShmSlice<'_>, &mut SlotWriter<'_>) -> HandlerResult,
        gone: &mut Vec<ClientGone>,
    ) -> usize {
        let mut served = 0;
        let quota = self.quota;
        self.clients.retain_mut(|(id, ch)| {
            let id = *id;
            for _ in 0..quota {
                match ch.serve_one(&mut |req, w| handler(id, req, w)) {
                    Ok(true) => served += 1,
                    Ok(false) => break,
                    Err(e) => {
                        gone.push(ClientGone::Misbehaved(id, e));
                        return false;
                    }
                }
            }
            if ch.peer_gone() {
                gone.push(ClientGone::Disconnected(id));
                return false;
            }
            true
        });
        served
    }

    /// Serves until `deadline` or until no client is left, spinning
    /// briefly when idle and then parking on every client's doorbell.
    /// Returns the clients that left.
    pub fn run(
        &mut self,
        deadline: Option<Instant>,
        mut handler: impl FnMut(ClientId, ShmSlice<'_>, &mut SlotWriter<'_>) -> HandlerResult,
    ) -> Result<Vec<ClientGone>, ChannelError> {
        let mut gone = Vec::new();
        loop {
            gone.extend(self.run_or_wake(deadline, &[], &mut handler)?);
            if self.clients.is_empty() || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(gone);
            }
        }
    }

    /// As [`Server::run`], but also returns as soon as a client left (so the
    /// caller learns of it while other clients keep it busy), and (after
    /// serving what is pending) as soon as one of `wake` becomes readable
    /// while parked: descriptors that say new clients wait to be
    /// [`add`](Server::add)ed, or that the caller should stop, so it acts at
    /// once rather than at a deadline (an idle server parked with no
    /// deadline wakes for nothing else). `wake` is only polled, never read:
    /// the caller clears it.
    pub fn run_or_wake(
        &mut self,
        deadline: Option<Instant>,
        wake: &[BorrowedFd<'_>],
        mut handler: impl FnMut(ClientId, ShmSlice<'_>, &mut SlotWriter<'_>) -> HandlerResult,
    ) -> Result<Vec<ClientGone>, ChannelError> {
        let mut gone = Vec::new();
        // While idle: when it began, how many empty rounds since, and how
        // long to spin before parking.
        let mut idle: Option<(Instant, u32, Duration)> = None;
        loop {
            if self.clients.is_empty() {
                return Ok(gone);
            }
            let served = self.serve_round(&mut handler, &mut gone);
            if !gone.is_empty() {
                return Ok(gone);
            }
            if served > 0 {
                if let Some((since, _, _)) = idle.take() {
                    self.note_idle(since.elapsed());
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(gone);
                }
                continue;
            }
            let (since, rounds, budget) = idle.get_or_insert_with(|| {
                let budget = self.wait.budget(Duration::from_nanos(self.avg_idle_ns));
                (Instant::now(), 0, budget)
            });
            *rounds += 1;
            // The clock is read every few rounds only: an idle round is a
            // few loads, a clock read costs as much as several.
            if *rounds % 16 != 0 {
                if *rounds % crate::channel::POLLS_PER_PAUSE == 0 {
                    std::hint::spin_loop();
                }
                continue;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return Ok(gone);
            }
            if now.duration_since(*since) < *budget {
                continue;
            }
            let since = *since;
            let woken = self.park(deadline, wake, &mut gone)?;
            self.note_idle(since.elapsed());
            idle = None;
            if woken {
                // Serve what rang with it, then let the caller adopt.
                self.serve_round(&mut handler, &mut gone);
                return Ok(gone);
            }
            if !gone.is_empty() {
                return Ok(gone);
            }
        }
    }

    /// Keeps the moving average (1/8 weight) of how long the server stays
    /// idle between requests, which sets how long it spins (see
    /// [`WaitStrategy::adaptive_max`]).
    fn note_idle(&mut self, took: Duration) {
        let took = took.as_nanos().min(u64::MAX as u128) as u64;
        self.avg_idle_ns = self.avg_idle_ns - self.avg_idle_ns / 8 + took / 8;
    }

    /// Parks until some client rings, one of `wake` is readable or
    /// `deadline` passes; true if one of `wake` is readable.
    fn park(
        &mut self,
        deadline: Option<Instant>,
        wake: &[BorrowedFd<'_>],
        gone: &mut Vec<ClientGone>,
    ) -> Result<bool, ChannelError> {
        let mut work = false;
        let mut bad = Vec::new();
        for (i, (_, ch)) in self.clients.iter_mut().enumerate() {
            match ch.prepare_park() {
                Ok(true) => work = true,
                Ok(false) => {}
                Err(e) => bad.push((i, e)),
            }
        }
        let mut woken = false;
        let rang = if work || !bad.is_empty() {
            vec![false; self.clients.len()]
        } else if let ([(_, only)], None, []) = (self.clients.as_mut_slice(), deadline, wake) {
            // One client, no deadline, nothing else to watch: a blocking
            // read is the whole wait.
            only.park_blocking()?;
            vec![false]
        } else {
            let mut socks: Vec<BorrowedFd<'_>> =
                self.clients.iter().map(|(_, ch)| ch.sock()).collect();
            socks.extend_from_slice(wake);
            let mut rang = doorbell::wait_any(&socks, deadline).map_err(|e| ChannelError::Os {
                op: "poll(doorbells)",
                source: e,
            })?;
            woken = rang.split_off(self.clients.len()).contains(&true);
            rang
        };
        for (i, (_, ch)) in self.clients.iter_mut().enumerate() {
            if let Err(e) = ch.unpark(rang[i]) {
                bad.push((i, e));
            }
        }
        bad.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        bad.dedup_by_key(|(i, _)| *i);
        for (i, e) in bad {
            let (id, _) = self.clients.remove(i);
            gone.push(ClientGone::Misbehaved(id, e));
        }
        Ok(woken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{channel_pair, ChannelConfig, Client};
    use std::os::fd::AsFd;
    use std::time::Duration;

    #[test]
    fn stuck_client_does_not_block_others() {
        let cfg = ChannelConfig {
            slots: 2,
            slot_capacity: 64,
        };
        let mut server = Server::new();
        let (stuck_end, s1) = channel_pair(&cfg).unwrap();
        let (good_end, s2) = channel_pair(&cfg).unwrap();
        server.add(s1).unwrap();
        server.add(s2).unwrap();
        // The stuck client fills its ring and never reads replies.
        let mut stuck = Client::open(stuck_end).unwrap();
        for _ in 0..2 {
            stuck.send_with(None, |w| w.write(b"x")).unwrap();
        }
        let mut good = Client::open(good_end).unwrap();
        let mut gone = Vec::new();
        for round in 0..4 {
            let id = good.send_with(None, |w| w.write(&[round])).unwrap();
            server.serve_round(
                &mut |_, req, w| w.write(&req.to_vec()).map_err(|e| e.to_string()),
                &mut gone,
            );
            assert_eq!(
                good.recv_reply(id, None, |r| r.to_vec()).unwrap(),
                vec![round]
            );
        }
        assert!(gone.is_empty());
    }

    #[test]
    fn a_parked_server_returns_when_any_wake_descriptor_is_readable() {
        for which in 0..2 {
            let mut server = Server::new();
            let (c, s) = channel_pair(&ChannelConfig::default()).unwrap();
            server.add(s).unwrap();
            // Keep the client end open: a client that left would end `run`.
            let _client = Client::open(c).unwrap();
            // Say, "new clients to adopt" and "shutdown requested".
            let pipes = [nix::unistd::pipe().unwrap(), nix::unistd::pipe().unwrap()];
            let readers: Vec<_> = pipes.iter().map(|(r, _)| r.try_clone().unwrap()).collect();
            let (tx, rx) = std::sync::mpsc::channel();
            let t = std::thread::spawn(move || {
                let wake: Vec<_> = readers.iter().map(|r| r.as_fd()).collect();
                // No deadline: only a wake can end this park.
                let gone = server.run_or_wake(None, &wake, |_, _, _| Ok(())).unwrap();
                tx.send(gone.len()).unwrap();
            });
            nix::unistd::write(&pipes[which].1, b"w").unwrap();
            let gone = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("run_or_wake returned on its wake descriptor");
            assert_eq!(gone, 0);
            t.join().unwrap();
        }
    }

    #[test]
    fn a_busy_server_without_deadline_returns_once_a_client_misbehaved() {
        let mut server = Server::new();
        let (bad_end, s1) = channel_pair(&ChannelConfig::default()).unwrap();
        let (good_end, s2) = channel_pair(&ChannelConfig::default()).unwrap();
        server.add(s1).unwrap();
        server.add(s2).unwrap();
        // The bad client publishes a head no correct client could.
        let (memfd, _sock) = bad_end.into_fds();
        let region = crate::region::Region::map_rw(&memfd, 4096).unwrap();
        region
            .u32_at(128)
            .store(1000, std::sync::atomic::Ordering::Release);
        // The good client keeps calling meanwhile.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let caller = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut good = Client::open(good_end).unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let d = Instant::now() + Duration::from_secs(5);
                    if good.call_deadline(b"hi", d).is_err() {
                        break;
                    }
                }
            })
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            // No deadline, no wake descriptor.
            let gone = server
                .run_or_wake(None, &[], |_, req, w| {
                    w.write(&req.to_vec()).map_err(|e| e.to_string())
                })
                .unwrap();
            tx.send(format!("{gone:?}")).unwrap();
            server
        });
        let gone = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("run_or_wake returned once a client misbehaved");
        assert!(gone.contains("Misbehaved(ClientId(1)"), "{gone}");
        let server = t.join().unwrap();
        assert_eq!(server.len(), 1);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(server);
        caller.join().unwrap();
    }

    #[test]
    fn a_draining_server_marks_every_client_and_those_added_later() {
        let mut server = Server::new();
        let (c1, s1) = channel_pair(&ChannelConfig::default()).unwrap();
        server.add(s1).unwrap();
        let c1 = Client::open(c1).unwrap();
        server.set_draining();
        assert!(c1.draining());
        let (c2, s2) = channel_pair(&ChannelConfig::default()).unwrap();
        server.add(s2).unwrap();
        assert!(Client::open(c2).unwrap().draining());
    }

    #[test]
    fn departed_client_is_reported() {
        let mut server = Server::new();
        let (c, s) = channel_pair(&ChannelConfig::default()).unwrap();
        server.add(s).unwrap();
        drop(c);
        let gone = server
            .run(Some(Instant::now() + Duration::from_secs(5)), |_, _, _| {
                Ok(())
            })
            .unwrap();
        assert!(
            matches!(gone.as_slice(), [ClientGone::Disconnected(ClientId(1))]),
            "{gone:?}"
        );
        assert!(server.is_empty());
    }
}

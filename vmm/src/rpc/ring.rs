//! Exitless I/O rings (`rtvm_abi::ring`, which has the protocol): a guest
//! registers a ring area with `NetRingSetup`, posts socket sends and receives
//! there, and the VM's I/O poller ([`IoPoller`], a host thread of its own)
//! serves them with no VM exit. The poller polls for a window after its
//! last work, then sleeps on its kick eventfd and the sockets it waits for;
//! `NetRingKick` wakes it, `NetRingWait` parks the calling vCPU until a
//! completion is published.
//!
//! The guest is untrusted and writes the rings while the poller reads them:
//! every index and entry is read once and copied before it is looked at;
//! indices that cannot be (more pending than the ring holds) mark the ring
//! broken (a warning; that ring stops, nothing else does); every buffer
//! must lie in guest RAM; the poller writes only its own indices and
//! completion slots, masked into the area. A guest that stops consuming
//! completions stalls its own ring: nothing is taken that could not be
//! completed, so nothing acknowledged is ever lost.

use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use rtvm_abi::ring::{self, field, host_flags, op, Cqe, Sqe};
use rtvm_abi::vmrpc::{buffer_in_ram, Status};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::net::{HeldSocket, NetService, MAX_TRANSFER};
use super::park::{Park, Parked};
use crate::memory::GuestRam;

/// Most rings one VM may register.
pub const MAX_RINGS: usize = 64;

/// What the rings of a VM served, for its statistics.
#[derive(Debug, Default)]
pub struct RingStats {
    pub submissions: AtomicU64,
    pub completions: AtomicU64,
    /// `NetRingKick` calls: the guest found the poller asleep.
    pub kicks: AtomicU64,
    /// Times the poller went to sleep.
    pub sleeps: AtomicU64,
    /// Time the poller spent polling without work, ns.
    pub spin_ns: AtomicU64,
    /// Its polling window now, ns (it adapts: see `poll_loop`).
    pub window_ns: AtomicU64,
    /// Passes a vCPU parked in `NetRingWait` served itself (a receive's data
    /// came while it waited) that published completions.
    pub by_vcpu: AtomicU64,
}

impl RingStats {
    /// Counts a polling spell that began at `since` (if one did) and
    /// ended at `now`.
    fn spun(&self, since: Option<Instant>, now: Instant) {
        if let Some(since) = since {
            self.spin_ns.fetch_add(
                now.duration_since(since).as_nanos() as u64,
                Ordering::Relaxed,
            );
        }
    }
}

/// A snapshot of [`RingStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingCounts {
    pub rings: u64,
    pub submissions: u64,
    pub completions: u64,
    pub kicks: u64,
    pub sleeps: u64,
    pub spin_ns: u64,
    pub window_ns: u64,
    pub by_vcpu: u64,
}

/// The rings of one VM and what its poller and vCPUs share about them.
pub struct Rings {
    rings: RwLock<Vec<Arc<Ring>>>,
    /// Wakes the poller: a kick, a new ring, a stop, a pause or resume.
    kick: EventFd,
    stats: RingStats,
    stopping: AtomicBool,
    paused: AtomicBool,
    /// The poller sleeps (set before its last look at the rings, so a
    /// submission taken by a vCPU after that look always wakes it).
    poller_asleep: AtomicBool,
    /// The poller's answer to a pause: it touches no guest memory until
    /// resumed.
    pause_seen: AtomicBool,
}

/// One registered ring.
pub struct Ring {
    base: u64,
    sq_entries: u32,
    cq_entries: u32,
    /// Written by the poller for a vCPU parked in `NetRingWait`.
    completion: EventFd,
    waiting: AtomicBool,
    broken: AtomicBool,
    state: Mutex<RingState>,
}

/// The poller's side of a ring: its own indices (never read back from the
/// guest) and the work it holds.
#[derive(Default)]
struct RingState {
    sq_head: u32,
    cq_tail: u32,
    /// Receives waiting for data, oldest first.
    posted: Vec<(Sqe, HeldSocket)>,
    /// A send its socket could not take yet: retried before anything else
    /// of this ring, so sends leave in order.
    blocked: Option<(Sqe, HeldSocket, Vec<u8>)>,
}

/// What one pass over a ring came to.
#[derive(Default)]
struct Pass {
    worked: bool,
    /// It took new submissions.
    took: bool,
    /// It published completions.
    published: bool,
    /// Its completion ring was full: look again soon.
    stalled: bool,
    /// Descriptors whose readiness would give it work.
    fds: Vec<libc::pollfd>,
}

impl Rings {
    pub fn new() -> crate::error::Result<Rings> {
        Ok(Rings {
            rings: RwLock::default(),
            kick: EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| {
                crate::error::Error::Host {
                    what: "making the I/O poller's eventfd".into(),
                    source: e,
                }
            })?,
            stats: RingStats::default(),
            stopping: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            poller_asleep: AtomicBool::new(false),
            pause_seen: AtomicBool::new(false),
        })
    }
}

impl Rings {
    fn ring(&self, id: u64) -> Result<Arc<Ring>, Status> {
        let index = id.checked_sub(1).ok_or(Status::BadHandle)? as usize;
        self.rings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(index)
            .cloned()
            .ok_or(Status::BadHandle)
    }

    fn wake_poller(&self) {
        let _ = self.kick.write(1);
    }

    pub fn counts(&self) -> RingCounts {
        let s = &self.stats;
        RingCounts {
            rings: self.rings.read().unwrap_or_else(|e| e.into_inner()).len() as u64,
            submissions: s.submissions.load(Ordering::Relaxed),
            completions: s.completions.load(Ordering::Relaxed),
            kicks: s.kicks.load(Ordering::Relaxed),
            sleeps: s.sleeps.load(Ordering::Relaxed),
            spin_ns: s.spin_ns.load(Ordering::Relaxed),
            window_ns: s.window_ns.load(Ordering::Relaxed),
            by_vcpu: s.by_vcpu.load(Ordering::Relaxed),
        }
    }

    /// `NetRingSetup`: registers the ring area at `addr`; its id.
    pub fn setup(
        &self,
        ram: &GuestRam,
        addr: u64,
        sq_entries: u64,
        cq_entries: u64,
    ) -> Result<[u64; 4], Status> {
        let (sq, cq) = match (u32::try_from(sq_entries), u32::try_from(cq_entries)) {
            (Ok(sq), Ok(cq)) if ring::valid_entries(sq) && ring::valid_entries(cq) => (sq, cq),
            _ => return Err(Status::BadArgument),
        };
        if addr % 4096 != 0 || !buffer_in_ram(addr, ring::area_size(sq, cq), ram.size()) {
            return Err(Status::BadAddress);
        }
        let mut header = [0u8; 16];
        ram.mem()
            .read_slice(&mut header, GuestAddress(addr))
            .map_err(|_| Status::BadAddress)?;
        let word = |at: usize| u32::from_le_bytes(header[at..at + 4].try_into().expect("4 bytes"));
        if word(field::MAGIC) != ring::MAGIC || word(field::VERSION) != ring::VERSION {
            return Err(Status::BadAbiVersion);
        }
        if word(field::SQ_ENTRIES) != sq || word(field::CQ_ENTRIES) != cq {
            return Err(Status::BadArgument);
        }
        let mut rings = self.rings.write().unwrap_or_else(|e| e.into_inner());
        if rings.len() >= MAX_RINGS {
            return Err(Status::NoResources);
        }
        let completion =
            EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|_| Status::NoResources)?;
        // The indices start where the guest left them (0 for a new area).
        let load = |at: usize| -> Result<u32, Status> {
            ram.mem()
                .load::<u32>(GuestAddress(addr + at as u64), Ordering::Acquire)
                .map_err(|_| Status::BadAddress)
        };
        let (sq_tail, cq_head) = (load(field::SQ_TAIL)?, load(field::CQ_HEAD)?);
        if sq_tail != 0 || cq_head != 0 {
            return Err(Status::BadArgument);
        }
        rings.push(Arc::new(Ring {
            base: addr,
            sq_entries: sq,
            cq_entries: cq,
            completion,
            waiting: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            state: Mutex::default(),
        }));
        let id = rings.len() as u64;
        drop(rings);
        self.wake_poller();
        Ok([id, 0, 0, 0])
    }

    /// `NetRingKick`: wakes the poller.
    pub fn kick(&self, id: u64) -> Result<[u64; 4], Status> {
        self.ring(id)?;
        self.stats.kicks.fetch_add(1, Ordering::Relaxed);
        self.wake_poller();
        Ok([0; 4])
    }

    /// `NetRingWait`: parks until ring `id` has a completion or `deadline`.
    ///
    /// The parked vCPU also waits on the sockets of the ring's posted
    /// receives, and completes a receive itself when its data comes: one
    /// host wake-up on a receive's path, the vCPU's, instead of the
    /// poller's and then the vCPU's. It then kicks the poller, which polls
    /// for the guest's answer meanwhile.
    pub fn wait(
        &self,
        net: &NetService,
        ram: &GuestRam,
        id: u64,
        deadline: u64,
        park: &mut dyn Park,
    ) -> Result<[u64; 4], Status> {
        let ring = self.ring(id)?;
        // What the guest posted before waiting is taken here, by the vCPU
        // already in the host: its sends leave now, and it owed no kick.
        // A sleeping poller is woken: it must watch the new receives too.
        if ring.has_submissions(ram)
            && ring.serve(net, ram, &self.stats).took
            && self.poller_asleep.load(Ordering::SeqCst)
        {
            self.wake_poller();
        }
        let outcome = loop {
            if ring.broken.load(Ordering::Relaxed) {
                break Err(Status::BadArgument);
            }
            // Registered before the check: a completion published after
            // the check finds the waiter and writes the eventfd.
            ring.waiting.store(true, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if ring.has_completions(ram) {
                break Ok([0; 4]);
            }
            // Held for the park: a receive the poller completes meanwhile
            // cannot close a descriptor this park still polls.
            let sockets = ring.posted_sockets();
            let mut fds: Vec<libc::pollfd> = sockets
                .iter()
                .map(|s| poll_fd(s.fd(), libc::POLLIN))
                .collect();
            fds.push(poll_fd(ring.completion.as_raw_fd(), libc::POLLIN));
            match park.park(&mut fds, deadline) {
                Ok(Parked::Ready) => {}
                Ok(Parked::Deadline) => break Err(Status::TimedOut),
                Err(e) => break Err(e.into()),
            }
            let _ = ring.completion.read();
            if fds[..sockets.len()].iter().any(|p| p.revents != 0) {
                let pass = ring.serve(net, ram, &self.stats);
                if pass.published {
                    self.stats.by_vcpu.fetch_add(1, Ordering::Relaxed);
                    self.wake_poller();
                }
            }
        };
        ring.waiting.store(false, Ordering::SeqCst);
        let _ = ring.completion.read();
        outcome
    }

    /// One pass of the poller over every ring, without its thread (tests
    /// and fuzzing); whether it did any work.
    pub fn serve_all(&self, net: &NetService, ram: &GuestRam) -> bool {
        let snapshot: Vec<Arc<Ring>> = self.rings.read().unwrap_or_else(|e| e.into_inner()).clone();
        // Every ring, whatever the first ones did.
        let mut worked = false;
        for ring in &snapshot {
            worked |= ring.serve(net, ram, &self.stats).worked;
        }
        worked
    }

    /// Stops the poller (the VM is ending).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.wake_poller();
    }

    /// Pauses the poller and waits until it says it is paused (or
    /// `timeout`); false if it did not.
    pub fn pause(&self, timeout: Duration) -> bool {
        self.paused.store(true, Ordering::SeqCst);
        self.wake_poller();
        let until = Instant::now() + timeout;
        while !self.pause_seen.load(Ordering::SeqCst) {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
        self.wake_poller();
    }
}

impl Ring {
    fn addr(&self, at: usize) -> GuestAddress {
        GuestAddress(self.base + at as u64)
    }

    fn load(&self, ram: &GuestRam, at: usize) -> Option<u32> {
        ram.mem().load::<u32>(self.addr(at), Ordering::SeqCst).ok()
    }

    fn store(&self, ram: &GuestRam, at: usize, value: u32) {
        // Inside the area, checked at setup: cannot fail.
        let _ = ram.mem().store(value, self.addr(at), Ordering::SeqCst);
    }

    fn lock(&self) -> MutexGuard<'_, RingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What would give this ring work: its posted receives' sockets
    /// readable, its blocked send's writable.
    fn watched_fds(&self) -> Vec<libc::pollfd> {
        let st = self.lock();
        let mut fds: Vec<libc::pollfd> = st
            .posted
            .iter()
            .map(|(_, s)| poll_fd(s.fd(), libc::POLLIN))
            .collect();
        if let Some((_, socket, _)) = &st.blocked {
            fds.push(poll_fd(socket.fd(), libc::POLLOUT));
        }
        fds
    }

    /// The sockets of the receives posted and not yet completed.
    fn posted_sockets(&self) -> Vec<HeldSocket> {
        self.lock().posted.iter().map(|(_, s)| s.clone()).collect()
    }

    /// Whether completions wait for the guest.
    fn has_completions(&self, ram: &GuestRam) -> bool {
        let tail = self.lock().cq_tail;
        self.load(ram, field::CQ_HEAD)
            .is_some_and(|head| head != tail)
    }

    fn set_broken(&self, what: &str) {
        if !self.broken.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "I/O ring at {:#x}: {what}: the guest broke its ring, which is no longer served",
                self.base
            );
        }
    }

    /// Completions the ring has room for now; `None`: its indices are broken.
    fn cq_room(&self, ram: &GuestRam, st: &RingState) -> Option<u32> {
        let head = self.load(ram, field::CQ_HEAD)?;
        let used = ring::pending(head, st.cq_tail, self.cq_entries)?;
        Some(self.cq_entries - used)
    }

    fn complete(&self, ram: &GuestRam, st: &mut RingState, stats: &RingStats, mut cqe: Cqe) {
        // When, for a guest that learns its traffic's rhythm from it.
        cqe.time = crate::clock::now_ns();
        let slot = u64::from(st.cq_tail & (self.cq_entries - 1));
        let at = self.base + ring::cq_offset(self.sq_entries) + slot * ring::ENTRY_SIZE;
        let _ = ram.mem().write_slice(&cqe.to_bytes(), GuestAddress(at));
        st.cq_tail = st.cq_tail.wrapping_add(1);
        self.store(ram, field::CQ_TAIL, st.cq_tail);
        stats.completions.fetch_add(1, Ordering::Relaxed);
    }

    fn done(sqe: &Sqe, status: Status, len: u64, addr: [u64; 3]) -> Cqe {
        Cqe {
            user: sqe.user,
            status: status as u32,
            op: sqe.op,
            len,
            addr,
            time: 0,
            _pad: 0,
        }
    }

    /// Serves what the ring holds: the blocked send, posted receives with
    /// data, then new submissions while completions have room.
    fn serve(&self, net: &NetService, ram: &GuestRam, stats: &RingStats) -> Pass {
        let mut pass = Pass::default();
        if self.broken.load(Ordering::Relaxed) {
            return pass;
        }
        let mut st = self.lock();
        let (published, taken) = (st.cq_tail, st.sq_head);
        self.serve_locked(net, ram, stats, &mut st, &mut pass);
        let wake = st.cq_tail != published;
        pass.published = wake;
        pass.took = st.sq_head != taken;
        drop(st);
        if wake {
            fence(Ordering::SeqCst);
            if self.waiting.load(Ordering::SeqCst) {
                let _ = self.completion.write(1);
            }
        }
        pass
    }

    fn serve_locked(
        &self,
        net: &NetService,
        ram: &GuestRam,
        stats: &RingStats,
        st: &mut RingState,
        pass: &mut Pass,
    ) {
        let Some(mut room) = self.cq_room(ram, st) else {
            return self.set_broken("its completion indices are impossible");
        };
        // Every receive posted and every send blocked will need a
        // completion: what is taken always has room for its answer.
        let mut owed = st.posted.len() as u32 + u32::from(st.blocked.is_some());
        if let Some((sqe, socket, data)) = st.blocked.take() {
            match net.try_send(&socket, &data, sqe.addr) {
                Ok(None) => {
                    pass.fds.push(poll_fd(socket.fd(), libc::POLLOUT));
                    st.blocked = Some((sqe, socket, data));
                }
                done => {
                    let cqe = match done {
                        Ok(Some(n)) => Self::done(&sqe, Status::Ok, n as u64, [0; 3]),
                        Err(status) => Self::done(&sqe, status, 0, [0; 3]),
                        Ok(None) => unreachable!("matched above"),
                    };
                    self.complete(ram, st, stats, cqe);
                    pass.worked = true;
                    room -= 1;
                    owed -= 1;
                }
            }
        }
        self.serve_receives(net, ram, stats, st, pass, &mut room, &mut owed);
        let Some(tail) = self.load(ram, field::SQ_TAIL) else {
            return;
        };
        if ring::pending(st.sq_head, tail, self.sq_entries).is_none() {
            return self.set_broken("its submission indices are impossible");
        }
        while st.sq_head != tail && st.blocked.is_none() {
            if owed >= room {
                pass.stalled = true;
                break;
            }
            let slot = u64::from(st.sq_head & (self.sq_entries - 1));
            let mut bytes = [0u8; 64];
            let at = self.base + ring::SQ_OFFSET + slot * ring::ENTRY_SIZE;
            if ram.mem().read_slice(&mut bytes, GuestAddress(at)).is_err() {
                return self.set_broken("a submission outside guest RAM");
            }
            st.sq_head = st.sq_head.wrapping_add(1);
            self.store(ram, field::SQ_HEAD, st.sq_head);
            stats.submissions.fetch_add(1, Ordering::Relaxed);
            pass.worked = true;
            // The copy is what counts from here.
            let sqe = Sqe::from_bytes(&bytes);
            match self.take(net, ram, &sqe) {
                Err(status) => {
                    self.complete(ram, st, stats, Self::done(&sqe, status, 0, [0; 3]));
                    room -= 1;
                }
                Ok(Taken::Send(socket, data)) => match net.try_send(&socket, &data, sqe.addr) {
                    Ok(Some(n)) => {
                        self.complete(
                            ram,
                            st,
                            stats,
                            Self::done(&sqe, Status::Ok, n as u64, [0; 3]),
                        );
                        room -= 1;
                    }
                    Ok(None) => {
                        pass.fds.push(poll_fd(socket.fd(), libc::POLLOUT));
                        st.blocked = Some((sqe, socket, data));
                        owed += 1;
                    }
                    Err(status) => {
                        self.complete(ram, st, stats, Self::done(&sqe, status, 0, [0; 3]));
                        room -= 1;
                    }
                },
                Ok(Taken::Recv(socket)) => {
                    st.posted.push((sqe, socket));
                    owed += 1;
                    self.serve_receives(net, ram, stats, st, pass, &mut room, &mut owed);
                }
            }
        }
        pass.fds
            .extend(st.posted.iter().map(|(_, s)| poll_fd(s.fd(), libc::POLLIN)));
    }

    /// Completes the posted receives that have data, oldest first per
    /// socket.
    #[allow(clippy::too_many_arguments)]
    fn serve_receives(
        &self,
        net: &NetService,
        ram: &GuestRam,
        stats: &RingStats,
        st: &mut RingState,
        pass: &mut Pass,
        room: &mut u32,
        owed: &mut u32,
    ) {
        let mut i = 0;
        while i < st.posted.len() && *room > 0 {
            let (sqe, socket) = &st.posted[i];
            // A later receive on the same socket waits for this one.
            if st.posted[..i].iter().any(|(_, s)| s.fd() == socket.fd()) {
                i += 1;
                continue;
            }
            // A handle closed meanwhile cancels what was posted on it.
            let result = match net.held(sqe.handle) {
                Ok(_) => net.try_recv(socket, u64::from(sqe.len)),
                Err(status) => Err(status),
            };
            let sqe = *sqe;
            let cqe = match result {
                Ok(None) => {
                    i += 1;
                    continue;
                }
                Ok(Some((data, from))) => {
                    // Checked when posted; RAM does not shrink.
                    match ram.mem().write_slice(&data, GuestAddress(sqe.buf)) {
                        Ok(()) => Self::done(&sqe, Status::Ok, data.len() as u64, from),
                        Err(_) => Self::done(&sqe, Status::BadAddress, 0, [0; 3]),
                    }
                }
                Err(status) => Self::done(&sqe, status, 0, [0; 3]),
            };
            st.posted.remove(i);
            self.complete(ram, st, stats, cqe);
            *room -= 1;
            *owed -= 1;
            pass.worked = true;
        }
    }

    /// A submission's checks: its flags, operation, buffer and handle.
    fn take(&self, net: &NetService, ram: &GuestRam, sqe: &Sqe) -> Result<Taken, Status> {
        if sqe.flags != 0 {
            return Err(Status::BadFlags);
        }
        if !matches!(sqe.op, op::SEND | op::RECV) {
            return Err(Status::UnsupportedCall);
        }
        let len = u64::from(sqe.len);
        if len > MAX_TRANSFER {
            return Err(Status::TooLarge);
        }
        if !buffer_in_ram(sqe.buf, len, ram.size()) {
            return Err(Status::BadAddress);
        }
        let socket = net.held(sqe.handle)?;
        if sqe.op == op::RECV {
            return Ok(Taken::Recv(socket));
        }
        let mut data = vec![0u8; len as usize];
        ram.mem()
            .read_slice(&mut data, GuestAddress(sqe.buf))
            .map_err(|_| Status::BadAddress)?;
        Ok(Taken::Send(socket, data))
    }

    /// Whether the guest posted what the poller has not taken.
    fn has_submissions(&self, ram: &GuestRam) -> bool {
        let head = self.lock().sq_head;
        self.load(ram, field::SQ_TAIL)
            .is_some_and(|tail| tail != head)
    }

    /// Whether a pass would take new submissions now: some are posted and
    /// no blocked send holds them back (it is watched for room instead).
    fn would_take(&self, ram: &GuestRam) -> bool {
        let st = self.lock();
        st.blocked.is_none()
            && self
                .load(ram, field::SQ_TAIL)
                .is_some_and(|tail| tail != st.sq_head)
    }

    fn set_asleep(&self, ram: &GuestRam, asleep: bool) {
        self.store(
            ram,
            field::HOST_FLAGS,
            if asleep { host_flags::ASLEEP } else { 0 },
        );
    }
}

enum Taken {
    Send(HeldSocket, Vec<u8>),
    Recv(HeldSocket),
}

fn poll_fd(fd: i32, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// The VM's I/O poller thread.
pub struct IoPoller {
    thread: Option<std::thread::JoinHandle<()>>,
    services: Arc<super::Services>,
    cpu_clock: Option<libc::clockid_t>,
}

impl IoPoller {
    /// Starts the poller of a VM; it sleeps until a ring is set up.
    pub fn spawn(
        services: Arc<super::Services>,
        ram: Arc<GuestRam>,
        spin: Duration,
        setup: impl FnOnce() + Send + 'static,
    ) -> crate::error::Result<IoPoller> {
        let (clock_tx, clock_rx) = std::sync::mpsc::channel();
        let run_services = services.clone();
        let thread = std::thread::Builder::new()
            .name("rtvm-io".into())
            .spawn(move || {
                setup();
                let mut clock: libc::clockid_t = 0;
                // SAFETY: this thread's own CPU clock id into a local.
                let ok = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
                let _ = clock_tx.send((ok == 0).then_some(clock));
                poll_loop(&run_services, &ram, spin);
            })
            .map_err(|e| crate::error::Error::Host {
                what: "starting the I/O poller thread".into(),
                source: e,
            })?;
        let cpu_clock = clock_rx.recv().ok().flatten();
        Ok(IoPoller {
            thread: Some(thread),
            services,
            cpu_clock,
        })
    }

    /// CPU time the poller used so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        let clock = self.cpu_clock?;
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: a live timespec; the clock is the poller thread's, which
        // lives until `stop` joins it.
        (unsafe { libc::clock_gettime(clock, &mut ts) } == 0)
            .then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    /// Stops the poller and joins it; its CPU time.
    pub fn stop(mut self) -> Option<Duration> {
        let cpu = self.cpu_time();
        self.services.sockets.rings().stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        cpu
    }
}

impl Drop for IoPoller {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.services.sockets.rings().stop();
            let _ = t.join();
        }
    }
}

/// Longest polling window the adaptation may reach.
const MAX_WINDOW: Duration = Duration::from_millis(1);

/// The poller's window: `spin` at least, and four times the usual gap
/// between a completion it published and the next submission (a guest
/// answering a request: its VM entry, its work, its post), up to
/// [`MAX_WINDOW`], so a guest that answers within the window never has to
/// kick. `spin` 0: never poll.
fn window(spin: Duration, gap: Option<Duration>) -> Duration {
    if spin.is_zero() {
        return spin;
    }
    gap.map_or(spin, |g| spin.max((g * 4).min(MAX_WINDOW)))
}

fn poll_loop(services: &super::Services, ram: &GuestRam, spin: Duration) {
    let net = &services.sockets;
    let rings = net.rings();
    let mut seen_completions = rings.stats.completions.load(Ordering::Relaxed);
    let mut spinning_since: Option<Instant> = None;
    // The gap from a completion to the submission that followed it (an
    // average over the last few), and when the last completions went out.
    let mut gap: Option<Duration> = None;
    let mut published_at: Option<Instant> = None;
    rings
        .stats
        .window_ns
        .store(window(spin, gap).as_nanos() as u64, Ordering::Relaxed);
    loop {
        if rings.stopping.load(Ordering::SeqCst) {
            return;
        }
        if rings.paused.load(Ordering::SeqCst) {
            rings.pause_seen.store(true, Ordering::SeqCst);
            sleep_on(
                &rings.kick,
                &mut Vec::new(),
                Some(Duration::from_millis(100)),
            );
            continue;
        }
        rings.pause_seen.store(false, Ordering::SeqCst);
        let snapshot: Vec<Arc<Ring>> = rings
            .rings
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (mut worked, mut took) = (false, false);
        let mut stalled = Vec::with_capacity(snapshot.len());
        let mut fds = Vec::new();
        for ring in &snapshot {
            let pass = ring.serve(net, ram, &rings.stats);
            worked |= pass.worked;
            took |= pass.took;
            stalled.push(pass.stalled);
            fds.extend(pass.fds);
        }
        let now = Instant::now();
        // Completions published by anyone: a vCPU parked in `NetRingWait`
        // publishes the receives it completes itself, and wakes the poller
        // to wait for the answer.
        let completions = rings.stats.completions.load(Ordering::Relaxed);
        let published = completions != seen_completions;
        seen_completions = completions;
        if took {
            if let Some(at) = published_at.take() {
                let sample = now.duration_since(at);
                if sample <= MAX_WINDOW {
                    gap = Some(gap.map_or(sample, |g| (g * 7 + sample) / 8));
                    rings
                        .stats
                        .window_ns
                        .store(window(spin, gap).as_nanos() as u64, Ordering::Relaxed);
                }
            }
        }
        if published {
            published_at = Some(now);
        }
        if worked {
            rings.stats.spun(spinning_since.take(), now);
            continue;
        }
        // Polling pays only while the guest owes an answer: from a
        // completion until its next submission, for the window. Once it
        // has answered, the poller sleeps on the sockets at once.
        if published_at.is_some_and(|at| now.duration_since(at) < window(spin, gap)) {
            spinning_since.get_or_insert(now);
            std::hint::spin_loop();
            continue;
        }
        rings.stats.spun(spinning_since.take(), now);
        // To sleep: say so in every ring, then look once more, so a guest
        // that posted meanwhile is either seen here or sees the flag.
        snapshot.iter().for_each(|r| r.set_asleep(ram, true));
        rings.poller_asleep.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        // A stalled ring's untaken submissions wait for completion room
        // (looked at on the timeout below), those behind a blocked send
        // for socket room (watched): neither is work for now.
        let posted_meanwhile = snapshot
            .iter()
            .zip(&stalled)
            .any(|(r, &stalled)| !stalled && r.would_take(ram));
        if posted_meanwhile {
            snapshot.iter().for_each(|r| r.set_asleep(ram, false));
            rings.poller_asleep.store(false, Ordering::SeqCst);
            continue;
        }
        // What a vCPU took in `NetRingWait` before that last look is
        // watched too (its receives, its blocked send); what it takes
        // after, it wakes the poller for.
        for ring in &snapshot {
            fds.extend(ring.watched_fds());
        }
        rings.stats.sleeps.fetch_add(1, Ordering::Relaxed);
        // A stalled ring is looked at again soon: its guest frees room
        // without telling anyone.
        let timeout = stalled.contains(&true).then_some(Duration::from_millis(1));
        sleep_on(&rings.kick, &mut fds, timeout);
        rings.poller_asleep.store(false, Ordering::SeqCst);
        snapshot.iter().for_each(|r| r.set_asleep(ram, false));
    }
}

/// Sleeps until `kick` or one of `fds` is ready, or `timeout`.
fn sleep_on(kick: &EventFd, fds: &mut Vec<libc::pollfd>, timeout: Option<Duration>) {
    fds.push(poll_fd(kick.as_raw_fd(), libc::POLLIN));
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let ts_ptr: *const libc::timespec = ts.as_ref().map_or(std::ptr::null(), |t| t);
    // SAFETY: `fds` and the timespec live through the call; no mask.
    unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            ts_ptr,
            std::ptr::null(),
        )
    };
    let _ = kick.read();
    fds.pop();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_follows_the_guests_answers_within_its_bounds() {
        let us = Duration::from_micros;
        assert_eq!(window(us(50), None), us(50));
        assert_eq!(
            window(us(50), Some(us(5))),
            us(50),
            "never below the setting"
        );
        assert_eq!(window(us(50), Some(us(60))), us(240));
        assert_eq!(window(us(50), Some(us(900))), MAX_WINDOW);
        assert_eq!(
            window(Duration::ZERO, Some(us(60))),
            Duration::ZERO,
            "0: never poll"
        );
    }
}

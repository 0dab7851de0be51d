//! The guest's side of the exitless I/O rings (`rtvm_abi::ring`): a ring
//! area in `.bss`, registered with `NetRingSetup` when the VMM offers rings,
//! socket sends and receives posted there with no exit, and completions
//! found by spinning at CPL3 for a window (`Wait::Spin`) or by the
//! `NetRingWait` long poll (`Wait::Park`, and after a spin that found
//! nothing).
//!
//! One area per vCPU that uses rings, taken once ([`IoRing::setup`]).

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use rtvm_abi::ring::{self, op, Cqe, GuestRing, Sqe};
use rtvm_abi::vmrpc::{Call, Status};

use crate::net::Addr;
use crate::vmrpc::{Error, Rpc};

/// Entries of each ring of an area.
pub const ENTRIES: u32 = 32;
const AREA: usize = ring::area_size(ENTRIES, ENTRIES) as usize;

#[repr(C, align(4096))]
struct Area(UnsafeCell<[u8; AREA]>);

/// The areas, one per vCPU that may use rings (the built-in guest's RT
/// workloads use one vCPU).
struct Areas {
    areas: [Area; 2],
    taken: [AtomicBool; 2],
}

// SAFETY: each area is handed out once (its flag), so no two references to
// one exist.
unsafe impl Sync for Areas {}

static AREAS: Areas = Areas {
    areas: [
        Area(UnsafeCell::new([0; AREA])),
        Area(UnsafeCell::new([0; AREA])),
    ],
    taken: [AtomicBool::new(false), AtomicBool::new(false)],
};

/// How to wait for a completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// `NetRingWait` at once: the vCPU parks in the host until one comes.
    Park,
    /// Spin on the completion ring for a window of this many host ns, then
    /// park. The window is placed where a completion is due: at once while
    /// sends are in flight (their completions follow within microseconds),
    /// else around the next receive the rhythm of the last ones predicts
    /// (parked until half a window before it). Periodic traffic, the kind
    /// real-time work sees, then finds the vCPU spinning in the guest when
    /// it comes: no VM transition on its path, at one window of CPU per
    /// request.
    Spin(u64),
}

/// How a park in `NetRingWait` ended.
enum Parked {
    Completion(Cqe),
    Deadline,
    /// Woken with nothing to take (a completion another wait took).
    Woken,
}

/// Receive completions' rhythm, for [`Wait::Spin`]: when the last came,
/// and the usual gap between two (ns).
#[derive(Clone, Copy, Debug, Default)]
struct Rhythm {
    last: Option<u64>,
    gap: Option<u64>,
}

impl Rhythm {
    fn arrived(&mut self, now: u64) {
        if let Some(last) = self.last {
            let sample = now.saturating_sub(last);
            // A gap far off the usual (a burst, a pause) restarts the
            // estimate rather than bending it.
            self.gap = match self.gap {
                Some(g) if sample < g * 2 && sample > g / 2 => Some((g * 7 + sample) / 8),
                _ => Some(sample),
            };
        }
        self.last = Some(now);
    }

    /// When the next receive is due, if the rhythm says.
    fn due(&self) -> Option<u64> {
        Some(self.last? + self.gap?)
    }
}

/// A registered ring.
pub struct IoRing {
    id: u64,
    ring: GuestRing,
    /// Submissions posted whose completion has not been taken, and the
    /// sends among them.
    in_flight: u32,
    sends: u32,
    rhythm: Rhythm,
    /// The poller slept when something was posted: it must be kicked
    /// before the guest spins, or a `NetRingWait` takes the post itself.
    kick_owed: bool,
    /// `NetRingKick` calls made (the poller was asleep).
    pub kicks: u64,
    /// Completions found by spinning, and by parking.
    pub spun: u64,
    pub parked: u64,
}

impl IoRing {
    /// Registers a ring area with the VMM. `Ok(None)`: it serves no rings
    /// (the guest uses the calls); `Err`: any other refusal.
    pub fn setup(rpc: &mut Rpc) -> Result<Option<IoRing>, Error> {
        let Some(slot) = AREAS
            .taken
            .iter()
            .position(|t| !t.swap(true, Ordering::AcqRel))
        else {
            return Err(Status::NoResources.into());
        };
        let base = AREAS.areas[slot].0.get().cast::<u8>();
        // SAFETY: the area is page-aligned, AREA bytes, and this ring's
        // alone from here (its flag).
        let ring = unsafe { GuestRing::init(base, ENTRIES, ENTRIES) };
        let args = [base as u64, u64::from(ENTRIES), u64::from(ENTRIES), 0, 0, 0];
        match rpc.call(Call::NetRingSetup, 0, args) {
            Ok(r) => Ok(Some(IoRing {
                id: r[0],
                ring,
                in_flight: 0,
                sends: 0,
                rhythm: Rhythm::default(),
                kick_owed: false,
                kicks: 0,
                spun: 0,
                parked: 0,
            })),
            Err(e)
                if e == Error::from(Status::NotConfigured)
                    || e == Error::from(Status::UnsupportedCall) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Room for another submission whose completion has room too.
    pub fn can_post(&self) -> bool {
        self.in_flight < ENTRIES && self.ring.sq_free() > 0
    }

    /// Posts `sqe` (which must fit: [`IoRing::can_post`]). If the poller
    /// sleeps, the kick is owed until [`IoRing::next`] or [`IoRing::flush`].
    pub fn post(&mut self, sqe: &Sqe) -> Result<(), Error> {
        if !self.can_post() {
            return Err(Status::NoResources.into());
        }
        let kick = self
            .ring
            .post(sqe)
            .ok_or(Error::from(Status::NoResources))?;
        self.in_flight += 1;
        self.sends += u32::from(sqe.op == op::SEND);
        self.kick_owed |= kick;
        Ok(())
    }

    /// Kicks the poller if a post found it asleep: what was posted is
    /// served without the guest waiting for it.
    pub fn flush(&mut self, rpc: &mut Rpc) -> Result<(), Error> {
        if core::mem::take(&mut self.kick_owed) {
            self.kicks += 1;
            rpc.call(Call::NetRingKick, 0, [self.id, 0, 0, 0, 0, 0])?;
        }
        Ok(())
    }

    /// Posts a receive of up to `buf.len()` bytes on `handle` into `buf`
    /// (which must stay untouched until its completion).
    pub fn post_recv(&mut self, handle: u64, buf: &mut [u8], user: u64) -> Result<(), Error> {
        let sqe = Sqe {
            op: op::RECV,
            handle,
            buf: buf.as_mut_ptr() as u64,
            len: buf.len() as u32,
            user,
            ..Sqe::default()
        };
        self.post(&sqe)
    }

    /// Posts a send of `data` on `handle` to `to` (`None`: the connected
    /// peer); `data` must stay untouched until its completion.
    pub fn post_send(
        &mut self,
        handle: u64,
        data: &[u8],
        to: Option<Addr>,
        user: u64,
    ) -> Result<(), Error> {
        let sqe = Sqe {
            op: op::SEND,
            handle,
            buf: data.as_ptr() as u64,
            len: data.len() as u32,
            user,
            addr: to.unwrap_or(Addr::NONE).words(),
            ..Sqe::default()
        };
        self.post(&sqe)
    }

    /// The next completion, waiting as `wait` says until host time
    /// `deadline` (`TimedOut` after it).
    ///
    /// A kick owed is paid first when spinning; a park pays it itself
    /// (`NetRingWait` serves what was posted before it parks).
    pub fn next(&mut self, rpc: &mut Rpc, wait: Wait, deadline: u64) -> Result<Cqe, Error> {
        if let Wait::Spin(window) = wait {
            self.flush(rpc)?;
            let now = rpc.now();
            let due = self.rhythm.due().filter(|_| self.sends == 0);
            let spin_from = match due {
                Some(due) if now < due.saturating_sub(window / 2) => {
                    let wake = due.saturating_sub(window / 2).min(deadline);
                    if let Parked::Completion(c) = self.park(rpc, wake)? {
                        return Ok(c);
                    }
                    wake
                }
                _ => now,
            };
            let until = spin_from.saturating_add(window).min(deadline);
            loop {
                if let Some(c) = self.take_now(rpc) {
                    self.spun += 1;
                    return Ok(c);
                }
                if rpc.now() >= until {
                    break;
                }
                core::hint::spin_loop();
            }
        }
        loop {
            if let Some(c) = self.take_now(rpc) {
                return Ok(c);
            }
            match self.park(rpc, deadline)? {
                Parked::Completion(c) => return Ok(c),
                Parked::Deadline => return Err(Status::TimedOut.into()),
                Parked::Woken => {}
            }
        }
    }

    /// Parks in `NetRingWait` until a completion or host time `until`.
    fn park(&mut self, rpc: &mut Rpc, until: u64) -> Result<Parked, Error> {
        self.kick_owed = false;
        let deadline = match rpc.call(Call::NetRingWait, 0, [self.id, until, 0, 0, 0, 0]) {
            Ok(_) => false,
            Err(e) if e == Error::from(Status::TimedOut) => true,
            Err(e) => return Err(e),
        };
        Ok(match self.take_now(rpc) {
            Some(c) => {
                self.parked += 1;
                Parked::Completion(c)
            }
            None if deadline => Parked::Deadline,
            None => Parked::Woken,
        })
    }

    /// The next completion if there is one, its receive's arrival noted.
    fn take_now(&mut self, rpc: &mut Rpc) -> Option<Cqe> {
        let c = self.ring.complete()?;
        self.in_flight = self.in_flight.saturating_sub(1);
        if c.op == op::SEND {
            self.sends = self.sends.saturating_sub(1);
        } else if c.op == op::RECV {
            // When the host took the data (its own clock), not when this
            // vCPU saw it: a receive seen late, after a park, must not
            // shift the rhythm's phase.
            let at = if c.time != 0 { c.time } else { rpc.now() };
            self.rhythm.arrived(at);
        }
        Some(c)
    }
}

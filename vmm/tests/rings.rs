//! Exitless I/O rings (`rpc::ring`) served by the real I/O poller thread,
//! with the test as the guest: it writes ring areas in a `GuestRam`
//! through `rtvm_abi::ring::GuestRing`, as the guest's client does, and host
//! sockets on loopback are the peers. No KVM is needed: the poller never
//! enters the guest. Correctness only: ordering under load, full rings on
//! either side, a guest that stops consuming or scribbles on its ring,
//! pause, stop and teardown with work in flight.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rtvm_abi::ring::{self, op, Cqe, GuestRing, Sqe};
use rtvm_abi::vmrpc::{net, Status};
use rtvm_vmm::config::{GuestSpec, NetPolicy, VmConfig};
use rtvm_vmm::memory::GuestRam;
use rtvm_vmm::rpc::net::encode_addr;
use rtvm_vmm::rpc::park::{Interrupted, Park, Parked};
use rtvm_vmm::rpc::ring::IoPoller;
use rtvm_vmm::rpc::Services;

const RAM: u64 = 32 << 20;
/// Where ring areas go, one per MiB.
const RINGS_AT: u64 = 0x10_0000;
/// Where buffers go: 4 KiB each.
const BUFS_AT: u64 = 0x80_0000;

/// A guest and its VMM's poller, in-process.
struct Setup {
    ram: Arc<GuestRam>,
    services: Arc<Services>,
    poller: Option<IoPoller>,
}

impl Setup {
    fn new() -> Setup {
        let ram = Arc::new(GuestRam::new(RAM).unwrap());
        let mut config = VmConfig::new(GuestSpec::Builtin("rings".into()));
        config.net = NetPolicy {
            bind: vec!["127.0.0.1:*".parse().unwrap()],
            connect: vec!["127.0.0.1:*".parse().unwrap()],
            ..NetPolicy::default()
        };
        let services = Arc::new(Services::new(&config).unwrap());
        services.sockets.serve_rings();
        let poller = IoPoller::spawn(
            services.clone(),
            ram.clone(),
            Duration::from_micros(50),
            || {},
        )
        .unwrap();
        Setup {
            ram,
            services,
            poller: Some(poller),
        }
    }

    fn host(&self, addr: u64) -> *mut u8 {
        (self.ram.host_base().unwrap() + addr) as *mut u8
    }

    /// Ring `n`'s area, set up with `sq` and `cq` entries: its id and the
    /// guest's side.
    fn ring(&self, n: u64, sq: u32, cq: u32) -> (u64, GuestRing) {
        let at = RINGS_AT + n * 0x10_0000;
        // SAFETY: the area lies in RAM and only this ring uses it.
        let guest = unsafe { GuestRing::init(self.host(at), sq, cq) };
        let id = self
            .services
            .sockets
            .rings()
            .setup(&self.ram, at, u64::from(sq), u64::from(cq))
            .unwrap()[0];
        (id, guest)
    }

    /// A bound guest UDP socket: its handle and address.
    fn udp(&self) -> (u64, std::net::SocketAddr) {
        let s = &self.services.sockets;
        let h = s.open(net::INET, net::UDP, 0).unwrap()[0];
        s.bind(h, net::v4([127, 0, 0, 1], 0)).unwrap();
        let a = s.address(h, 0).unwrap();
        let addr = rtvm_vmm::rpc::net::decode_addr([a[0], a[1], a[2]]).unwrap();
        (h, addr)
    }

    fn write(&self, addr: u64, data: &[u8]) {
        // SAFETY: inside RAM.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.host(addr), data.len()) };
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        // SAFETY: inside RAM.
        unsafe { std::ptr::copy_nonoverlapping(self.host(addr), out.as_mut_ptr(), len) };
        out
    }

    /// Posts `sqe`, kicking the poller if it sleeps; false if the ring is full.
    fn post(&self, id: u64, guest: &mut GuestRing, sqe: &Sqe) -> bool {
        match guest.post(sqe) {
            None => false,
            Some(kick) => {
                if kick {
                    self.services.sockets.rings().kick(id).unwrap();
                }
                true
            }
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(p) = self.poller.take() {
            p.stop();
        }
    }
}

/// The next completion, waiting for it as long as a hung poller would
/// need to be noticed (never a timing check: it only ends a hang).
fn next(guest: &mut GuestRing) -> Cqe {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(c) = guest.complete() {
            return c;
        }
        assert!(
            Instant::now() < until,
            "no completion in 20 s: {:?}",
            guest.sq_free()
        );
        std::thread::yield_now();
    }
}

fn recv(handle: u64, buf: u64, len: u32, user: u64) -> Sqe {
    Sqe {
        op: op::RECV,
        handle,
        buf,
        len,
        user,
        ..Sqe::default()
    }
}

fn send(handle: u64, buf: u64, len: u32, user: u64, to: std::net::SocketAddr) -> Sqe {
    Sqe {
        op: op::SEND,
        handle,
        buf,
        len,
        user,
        addr: encode_addr(&to),
        ..Sqe::default()
    }
}

#[test]
fn a_udp_echo_goes_through_the_rings_with_no_call_on_its_path() {
    let s = Setup::new();
    let (h, addr) = s.udp();
    let (id, mut g) = s.ring(0, 8, 8);
    assert!(s.post(id, &mut g, &recv(h, BUFS_AT, 2048, 1)));
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.send_to(b"ping", addr).unwrap();
    let c = next(&mut g);
    assert_eq!((c.user, c.status, c.op, c.len), (1, 0, op::RECV, 4));
    assert_eq!(
        rtvm_vmm::rpc::net::decode_addr(c.addr).unwrap(),
        peer.local_addr().unwrap()
    );
    assert_eq!(s.read(BUFS_AT, 4), b"ping");
    assert!(s.post(
        id,
        &mut g,
        &send(h, BUFS_AT, 4, 2, peer.local_addr().unwrap())
    ));
    let c = next(&mut g);
    assert_eq!((c.user, c.status, c.len), (2, 0, 4));
    let mut back = [0u8; 16];
    peer.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let (n, from) = peer.recv_from(&mut back).unwrap();
    assert_eq!((&back[..n], from), (&b"ping"[..], addr));
    let counts = s.services.sockets.rings().counts();
    assert_eq!(
        (counts.rings, counts.submissions, counts.completions),
        (1, 2, 2)
    );
}

#[test]
fn a_flood_each_way_arrives_whole_and_in_order_through_small_rings() {
    let s = Setup::new();
    let (h, addr) = s.udp();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let to = peer.local_addr().unwrap();
    // Out: 500 sends through a ring of 4, each acknowledged before its
    // buffer is used again; the peer reads meanwhile (UDP drops what
    // overflows a receive buffer).
    let (id, mut g) = s.ring(0, 4, 4);
    const N: u64 = 500;
    // What the peer has read: the guest stays within 64 datagrams of it,
    // so that a slow machine's reader never makes the peer's buffer drop one.
    let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = {
        let peer = peer.try_clone().unwrap();
        let read = read.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            (0..N)
                .map(|_| {
                    let (n, _) = peer.recv_from(&mut buf).unwrap();
                    read.fetch_add(1, std::sync::atomic::Ordering::Release);
                    u64::from_le_bytes(buf[..n].try_into().unwrap())
                })
                .collect::<Vec<u64>>()
        })
    };
    let (mut posted, mut done, mut in_flight) = (0u64, 0u64, 0u32);
    while done < N {
        while posted < N
            && in_flight < 4
            && posted < read.load(std::sync::atomic::Ordering::Acquire) + 64
        {
            let buf = BUFS_AT + (posted % 4) * 4096;
            s.write(buf, &posted.to_le_bytes());
            if !s.post(id, &mut g, &send(h, buf, 8, posted, to)) {
                break;
            }
            posted += 1;
            in_flight += 1;
        }
        if in_flight == 0 {
            std::thread::yield_now();
            continue;
        }
        let c = next(&mut g);
        assert_eq!(
            (c.user, c.status, c.len),
            (done, 0, 8),
            "in order, all sent"
        );
        done += 1;
        in_flight -= 1;
    }
    assert_eq!(
        reader.join().unwrap(),
        (0..N).collect::<Vec<_>>(),
        "all, in order"
    );
    // In: 300 datagrams into 3 receives posted ahead, each posted again
    // once taken.
    let (id2, mut g2) = s.ring(1, 4, 4);
    for i in 0..3 {
        assert!(s.post(id2, &mut g2, &recv(h, BUFS_AT + i * 4096, 64, i)));
    }
    // In batches the guest has room for: UDP drops what overflows a
    // socket's buffer, and a slow machine must not lose a datagram here.
    let (taken_tx, taken_rx) = std::sync::mpsc::channel::<()>();
    let sender = std::thread::spawn(move || {
        for seq in 0u64..300 {
            peer.send_to(&seq.to_le_bytes(), addr).unwrap();
            if seq % 32 == 31 {
                for _ in 0..32 {
                    taken_rx.recv().unwrap();
                }
            }
        }
    });
    for seq in 0u64..300 {
        let c = next(&mut g2);
        assert_eq!((c.status, c.len), (0, 8));
        let buf = BUFS_AT + c.user * 4096;
        assert_eq!(s.read(buf, 8), seq.to_le_bytes(), "datagram {seq} in order");
        assert!(s.post(id2, &mut g2, &recv(h, buf, 64, c.user)));
        let _ = taken_tx.send(());
    }
    sender.join().unwrap();
}

#[test]
fn a_guest_that_stops_taking_completions_stalls_its_ring_and_loses_nothing() {
    let s = Setup::new();
    let (h, _) = s.udp();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let to = peer.local_addr().unwrap();
    let (id, mut g) = s.ring(0, 8, 2);
    for i in 0..8u64 {
        s.write(BUFS_AT + i * 4096, &[i as u8]);
        assert!(s.post(id, &mut g, &send(h, BUFS_AT + i * 4096, 1, i, to)));
    }
    // Two completions fit: two datagrams go, the rest wait their turn.
    let mut buf = [0u8; 8];
    for i in 0..2u8 {
        assert_eq!(peer.recv_from(&mut buf).unwrap().0, 1);
        assert_eq!(buf[0], i);
    }
    // Another ring meanwhile works.
    let (h2, addr2) = s.udp();
    let (id2, mut g2) = s.ring(1, 2, 2);
    assert!(s.post(id2, &mut g2, &recv(h2, BUFS_AT + 0x10_0000, 64, 9)));
    peer.send_to(b"other", addr2).unwrap();
    assert_eq!(next(&mut g2).len, 5);
    // Taking completions lets the stalled ring go on; all eight arrive, in
    // order, each acknowledged once.
    for i in 0..8u64 {
        let c = next(&mut g);
        assert_eq!((c.user, c.status), (i, 0));
    }
    for i in 2..8u8 {
        assert_eq!(peer.recv_from(&mut buf).unwrap().0, 1);
        assert_eq!(buf[0], i);
    }
}

#[test]
fn bad_submissions_complete_with_their_status_and_scribbled_indices_break_only_that_ring() {
    let s = Setup::new();
    let (h, _) = s.udp();
    let (id, mut g) = s.ring(0, 8, 8);
    let to: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
    let cases = [
        (
            Sqe {
                flags: 1,
                ..send(h, BUFS_AT, 1, 1, to)
            },
            Status::BadFlags,
        ),
        (
            Sqe {
                op: 9,
                ..send(h, BUFS_AT, 1, 2, to)
            },
            Status::UnsupportedCall,
        ),
        (send(h, RAM - 2, 8, 3, to), Status::BadAddress),
        (send(h, BUFS_AT, u32::MAX, 4, to), Status::TooLarge),
        (send(0x8000_7777, BUFS_AT, 1, 5, to), Status::BadHandle),
        (
            send(h, BUFS_AT, 1, 6, "10.0.0.1:9".parse().unwrap()),
            Status::NotPermitted,
        ),
    ];
    for (sqe, _) in &cases {
        assert!(s.post(id, &mut g, sqe));
    }
    for (sqe, status) in &cases {
        let c = next(&mut g);
        assert_eq!((c.user, c.status), (sqe.user, *status as u32), "{status:?}");
    }
    // The guest writes an impossible tail: that ring is no longer served,
    // and waiting on it says so; another ring is.
    // SAFETY: the header's sq_tail, in RAM.
    unsafe {
        let tail = s.host(RINGS_AT + ring::field::SQ_TAIL as u64).cast::<u32>();
        tail.write_volatile(tail.read_volatile().wrapping_add(1000));
    }
    s.services.sockets.rings().kick(id).unwrap();
    let (id2, mut g2) = s.ring(1, 2, 2);
    assert!(s.post(id2, &mut g2, &send(h, BUFS_AT, 1, 7, to)));
    assert_eq!(next(&mut g2).user, 7);
    let mut park = Sleep;
    assert_eq!(
        s.services
            .sockets
            .rings()
            .wait(&s.services.sockets, &s.ram, id, u64::MAX, &mut park),
        Err(Status::BadArgument)
    );
}

#[test]
fn setup_checks_the_area_and_the_ring_count_is_bounded() {
    let s = Setup::new();
    let rings = s.services.sockets.rings();
    // SAFETY: an area in RAM.
    unsafe { GuestRing::init(s.host(RINGS_AT), 4, 4) };
    assert_eq!(
        rings.setup(&s.ram, RINGS_AT + 8, 4, 4),
        Err(Status::BadAddress)
    );
    assert_eq!(
        rings.setup(&s.ram, RAM - 4096, 4, 4),
        Err(Status::BadAddress)
    );
    assert_eq!(
        rings.setup(&s.ram, RINGS_AT, 3, 4),
        Err(Status::BadArgument)
    );
    assert_eq!(
        rings.setup(&s.ram, RINGS_AT, 8, 4),
        Err(Status::BadArgument),
        "not the header's"
    );
    s.write(RINGS_AT, b"XXXX");
    assert_eq!(
        rings.setup(&s.ram, RINGS_AT, 4, 4),
        Err(Status::BadAbiVersion)
    );
    for n in 0..rtvm_vmm::rpc::ring::MAX_RINGS as u64 {
        s.ring(n % 20, 1, 1);
    }
    // SAFETY: an area in RAM.
    unsafe { GuestRing::init(s.host(RINGS_AT), 1, 1) };
    assert_eq!(
        rings.setup(&s.ram, RINGS_AT, 1, 1),
        Err(Status::NoResources)
    );
    assert_eq!(rings.kick(0), Err(Status::BadHandle));
}

/// A vCPU's park, for `NetRingWait`: ppoll until the deadline.
struct Sleep;

impl Park for Sleep {
    fn park(&mut self, fds: &mut [libc::pollfd], deadline: u64) -> Result<Parked, Interrupted> {
        let now = rtvm_vmm::clock::now_ns();
        let ms = if deadline == u64::MAX {
            -1
        } else {
            (deadline.saturating_sub(now) / 1_000_000) as i32
        };
        // SAFETY: live pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        Ok(if n > 0 {
            Parked::Ready
        } else {
            Parked::Deadline
        })
    }
}

#[test]
fn a_parked_waiter_is_woken_by_the_completion_and_a_deadline_ends_the_wait() {
    let s = Setup::new();
    let (h, addr) = s.udp();
    let (id, mut g) = s.ring(0, 4, 4);
    let rings = s.services.sockets.rings();
    let mut park = Sleep;
    let soon = rtvm_vmm::clock::now_ns() + 5_000_000;
    assert_eq!(
        rings.wait(&s.services.sockets, &s.ram, id, soon, &mut park),
        Err(Status::TimedOut)
    );
    assert!(s.post(id, &mut g, &recv(h, BUFS_AT, 64, 1)));
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .send_to(b"wake", addr)
            .unwrap();
    });
    assert_eq!(
        rings.wait(&s.services.sockets, &s.ram, id, u64::MAX, &mut park),
        Ok([0; 4])
    );
    let c = g.complete().expect("the receive's completion");
    assert_eq!(c.len, 4);
    // Stamped with the host's clock when the data was taken.
    let now = rtvm_vmm::clock::now_ns();
    assert!(
        c.time > soon.saturating_sub(5_000_000) && c.time <= now,
        "{c:?}"
    );
    sender.join().unwrap();
}

#[test]
fn a_paused_poller_leaves_the_rings_alone_until_resumed_and_stop_ends_it_with_work_in_flight() {
    let mut s = Setup::new();
    let (h, _) = s.udp();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = peer.local_addr().unwrap();
    let (id, mut g) = s.ring(0, 4, 4);
    let rings = s.services.sockets.rings();
    assert!(rings.pause(Duration::from_secs(20)));
    assert!(s.post(id, &mut g, &send(h, BUFS_AT, 1, 1, to)));
    rings.kick(id).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(g.complete().is_none(), "a paused poller took a submission");
    assert_eq!(g.sq_free(), 3);
    rings.resume();
    assert_eq!(next(&mut g).user, 1);
    // Receives posted that will never complete: the stop still ends it.
    assert!(s.post(id, &mut g, &recv(h, BUFS_AT, 64, 2)));
    let cpu = s.poller.take().unwrap().stop();
    assert!(cpu.is_some(), "its CPU time is reported");
}

#[test]
fn a_vcpu_parked_in_ring_wait_completes_a_receive_itself_when_its_data_comes() {
    let s = Setup::new();
    let (h, addr) = s.udp();
    let (id, mut g) = s.ring(0, 4, 4);
    let rings = s.services.sockets.rings();
    assert!(s.post(id, &mut g, &recv(h, BUFS_AT, 64, 1)));
    // Let the poller take the receive, then keep it out of the way: the
    // parked waiter has to serve the data itself.
    while g.sq_free() < 4 {
        std::thread::yield_now();
    }
    assert!(rings.pause(Duration::from_secs(20)));
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(20));
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .send_to(b"self", addr)
            .unwrap();
    });
    let mut park = Sleep;
    assert_eq!(
        rings.wait(&s.services.sockets, &s.ram, id, u64::MAX, &mut park),
        Ok([0; 4])
    );
    let c = g.complete().expect("a completion");
    assert_eq!((c.user, c.status, c.len), (1, 0, 4));
    assert_eq!(s.read(BUFS_AT, 4), b"self");
    assert_eq!(rings.counts().by_vcpu, 1);
    sender.join().unwrap();
    rings.resume();
}

#[test]
fn ring_wait_serves_what_was_posted_before_it_so_a_waiting_guest_owes_no_kick() {
    let s = Setup::new();
    let (h, addr) = s.udp();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = peer.local_addr().unwrap();
    let (id, mut g) = s.ring(0, 4, 4);
    let rings = s.services.sockets.rings();
    // The poller out of the way: whatever is served, the waiter served.
    assert!(rings.pause(Duration::from_secs(20)));
    s.write(BUFS_AT, b"sent by the waiter");
    assert!(g.post(&send(h, BUFS_AT, 18, 1, to)).is_some());
    assert!(g.post(&recv(h, BUFS_AT + 4096, 64, 2)).is_some());
    let mut park = Sleep;
    assert_eq!(
        rings.wait(&s.services.sockets, &s.ram, id, u64::MAX, &mut park),
        Ok([0; 4]),
        "the send's completion ends the wait"
    );
    let c = g.complete().expect("the send's completion");
    assert_eq!((c.user, c.status, c.len), (1, 0, 18));
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"sent by the waiter"[..], addr));
    // The receive was taken by that wait too: the next one completes it.
    assert_eq!(g.sq_free(), 4);
    peer.send_to(b"back", addr).unwrap();
    assert_eq!(
        rings.wait(&s.services.sockets, &s.ram, id, u64::MAX, &mut park),
        Ok([0; 4])
    );
    let c = g.complete().expect("the receive's completion");
    assert_eq!((c.user, c.status, c.len), (2, 0, 4));
    assert_eq!(rings.counts().kicks, 0);
    rings.resume();
}

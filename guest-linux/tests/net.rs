//! The Linux socket client (`rtvm_guest_linux::net`) end to end against
//! the VMM's real VMRPC server and `NetService`, through call slots in an
//! in-process region, with real host sockets on loopback as the peers.

mod support;

use std::net::{TcpStream, UdpSocket};
use std::sync::atomic::Ordering;

use rtvm_abi::vmrpc::Status;
use rtvm_guest_linux::net::{opt, Addr, Sockets, INET, MAX_IO, NO_DEADLINE, TCP, UDP};
use rtvm_guest_linux::slots::SlotTransport;
use rtvm_guest_linux::Error;
use rtvm_vmm::clock::now_ns;
use rtvm_vmm::config::NetPolicy;
use support::InProcessSlots;

fn policy(bind: &[&str], connect: &[&str]) -> NetPolicy {
    NetPolicy {
        bind: bind.iter().map(|r| r.parse().unwrap()).collect(),
        connect: connect.iter().map(|r| r.parse().unwrap()).collect(),
        ..NetPolicy::default()
    }
}

fn loopback() -> Sockets<InProcessSlots> {
    Sockets::new(InProcessSlots::new(policy(
        &["127.0.0.1:*"],
        &["127.0.0.1:*"],
    )))
}

/// A guest TCP listener on a port of the host's choosing, and that port.
fn guest_listener(s: &Sockets<InProcessSlots>) -> (u64, u16) {
    let l = s.socket(INET, TCP).unwrap();
    s.bind(l, &Addr::v4([127, 0, 0, 1], 0)).unwrap();
    s.listen(l, 4).unwrap();
    (l, s.local_address(l).unwrap().port)
}

fn addr(a: std::net::SocketAddr) -> Addr {
    Addr::parse(&a.to_string()).unwrap()
}

/// The tests of this file one at a time: one of them counts this
/// process's descriptors, which the others' host sockets would change.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn a_udp_datagram_goes_out_and_the_answer_comes_back_with_its_sender() {
    let _serial = serial();
    let s = loopback();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let h = s.socket(INET, UDP).unwrap();
    s.bind(h, &Addr::v4([127, 0, 0, 1], 0)).unwrap();
    assert_eq!(
        s.send(h, b"ping", Some(&addr(peer.local_addr().unwrap())))
            .unwrap(),
        4
    );
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping");
    peer.send_to(b"pong!", from).unwrap();
    let mut got = [0u8; 64];
    let (n, sender) = s.recv(h, &mut got, now_ns() + 5_000_000_000).unwrap();
    assert_eq!(&got[..n], b"pong!");
    assert_eq!(sender, addr(peer.local_addr().unwrap()));
    // Nothing more: the wait ends at its deadline.
    assert!(matches!(
        s.recv(h, &mut got, now_ns() + 20_000_000),
        Err(Error::Status(Status::TimedOut))
    ));
    s.close(h).unwrap();
    // Every slot was given back.
    let table = s.transport().slot_table();
    assert!(table.iter().all(|w| w.load(Ordering::Relaxed) == 0));
}

#[test]
fn a_whole_64_kib_buffer_crosses_a_slot_and_more_is_cut_to_it() {
    let _serial = serial();
    let s = loopback();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let h = s.socket(INET, UDP).unwrap();
    s.connect(h, &addr(peer.local_addr().unwrap()), NO_DEADLINE)
        .unwrap();
    let data: Vec<u8> = (0..60_000u32).map(|i| (i * 7 % 251) as u8).collect();
    assert_eq!(s.send(h, &data, None).unwrap(), data.len());
    let mut buf = vec![0u8; 65_536];
    let (n, _) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], &data[..]);
    // A send longer than a slot carries sends what the slot holds (a UDP
    // datagram that large is refused by the host's kernel, with its status).
    let long = vec![1u8; MAX_IO + 10];
    assert!(matches!(
        s.send(h, &long, None),
        Ok(MAX_IO) | Err(Error::Status(_))
    ));
    s.close(h).unwrap();
}

#[test]
fn tcp_accepts_a_host_client_and_both_directions_flow() {
    let _serial = serial();
    let s = loopback();
    let (l, port) = guest_listener(&s);
    let client = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"hello").unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).unwrap();
        back
    });
    let ready = s.poll(&[l], now_ns() + 5_000_000_000).unwrap();
    assert_eq!((ready.mask, ready.count), (1, 1));
    let (conn, peer) = s.accept(l, now_ns() + 5_000_000_000).unwrap();
    assert_eq!(peer.octets4(), [127, 0, 0, 1]);
    let mut buf = [0u8; 5];
    let mut got = 0;
    while got < 5 {
        let (n, _) = s
            .recv(conn, &mut buf[got..], now_ns() + 5_000_000_000)
            .unwrap();
        assert!(n > 0);
        got += n;
    }
    assert_eq!(&buf, b"hello");
    assert_eq!(s.send(conn, b"world", None).unwrap(), 5);
    assert_eq!(&client.join().unwrap(), b"world");
    // The peer closed: a receive answers 0 bytes.
    assert_eq!(
        s.recv(conn, &mut buf, now_ns() + 5_000_000_000).unwrap().0,
        0
    );
    s.close(conn).unwrap();
    s.close(l).unwrap();
}

#[test]
fn the_policy_refuses_a_bind_and_a_connect_outside_it() {
    let _serial = serial();
    let s = Sockets::new(InProcessSlots::new(policy(&[], &[])));
    let h = s.socket(INET, UDP).unwrap();
    assert!(matches!(
        s.bind(h, &Addr::v4([127, 0, 0, 1], 0)),
        Err(Error::Status(Status::NotPermitted))
    ));
    let t = s.socket(INET, TCP).unwrap();
    assert!(matches!(
        s.connect(t, &Addr::v4([127, 0, 0, 1], 9), NO_DEADLINE),
        Err(Error::Status(Status::NotPermitted))
    ));
    assert!(matches!(
        s.close(12345),
        Err(Error::Status(Status::BadHandle))
    ));
}

#[test]
fn many_sockets_opened_and_closed_leave_no_host_descriptor() {
    let _serial = serial();
    let s = loopback();
    // One first, so lazily opened host descriptors are counted in both.
    let h = s.socket(INET, UDP).unwrap();
    s.close(h).unwrap();
    let before = open_fds();
    for _ in 0..500 {
        let h = s.socket(INET, UDP).unwrap();
        s.bind(h, &Addr::v4([127, 0, 0, 1], 0)).unwrap();
        s.close(h).unwrap();
    }
    assert_eq!(open_fds(), before);
}

#[test]
fn with_every_slot_owned_by_live_threads_a_call_says_so_and_a_dead_owners_is_reused() {
    let _serial = serial();
    let s = loopback();
    let table = s.transport().slot_table();
    // Owned by init, which lives.
    table.iter().for_each(|w| w.store(1, Ordering::Relaxed));
    assert!(matches!(s.socket(INET, UDP), Err(Error::NoFreeSlot)));
    // One owned by a process that is gone.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = u64::from(child.id());
    child.wait().unwrap();
    table[5].store(dead, Ordering::Relaxed);
    let h = s.socket(INET, UDP).unwrap();
    assert_eq!(
        table[5].load(Ordering::Relaxed),
        0,
        "taken over, then given back"
    );
    s.close(h).unwrap();
}

#[test]
fn too_many_handles_for_one_poll_are_refused_before_any_call() {
    let _serial = serial();
    let s = loopback();
    let handles = vec![0u64; 65];
    assert!(matches!(s.poll(&handles, NO_DEADLINE), Err(Error::TooLong)));
}

#[test]
fn names_options_pending_bytes_and_shutdown_answer_as_the_host_sees_them() {
    let _serial = serial();
    let s = loopback();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let h = s.socket(INET, UDP).unwrap();
    s.bind(h, &Addr::v4([127, 0, 0, 1], 0)).unwrap();
    // getsockname: the port the host's kernel picked.
    let me = s.local_address(h).unwrap();
    assert_eq!(me.octets4(), [127, 0, 0, 1]);
    assert_ne!(me.port, 0);
    // getpeername before a connect: the host's ENOTCONN, as a status.
    assert!(matches!(s.peer_address(h), Err(Error::Status(_))));
    s.connect(h, &addr(peer.local_addr().unwrap()), NO_DEADLINE)
        .unwrap();
    assert_eq!(s.peer_address(h).unwrap(), addr(peer.local_addr().unwrap()));
    // FIONREAD: nothing, then the datagram's bytes.
    assert_eq!(s.getsockopt(h, opt::READABLE).unwrap(), 0);
    peer.send_to(b"12345", format!("127.0.0.1:{}", me.port))
        .unwrap();
    s.poll(&[h], now_ns() + 5_000_000_000).unwrap();
    assert_eq!(s.getsockopt(h, opt::READABLE).unwrap(), 5);
    // Options read back what was set; SO_ERROR is clear.
    s.setsockopt(h, opt::REUSEADDR, 1).unwrap();
    assert_eq!(s.getsockopt(h, opt::REUSEADDR).unwrap(), 1);
    s.setsockopt(h, opt::TOS, 0xb8).unwrap();
    assert_eq!(s.getsockopt(h, opt::TOS).unwrap(), 0xb8);
    assert_eq!(s.getsockopt(h, opt::ERROR).unwrap(), 0);
    assert!(s.getsockopt(h, opt::RCVBUF).unwrap() > 0);
    assert!(matches!(
        s.getsockopt(h, 99),
        Err(Error::Status(Status::BadArgument))
    ));
    s.close(h).unwrap();

    // Shutting down a TCP connection's writing side ends the peer's stream.
    let (l, port) = guest_listener(&s);
    let client = std::thread::spawn(move || {
        use std::io::Read;
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut all = Vec::new();
        c.read_to_end(&mut all).unwrap();
        all
    });
    let (conn, _) = s.accept(l, now_ns() + 5_000_000_000).unwrap();
    s.send(conn, b"bye", None).unwrap();
    s.shutdown(conn, 1).unwrap();
    assert_eq!(client.join().unwrap(), b"bye");
    assert!(matches!(
        s.shutdown(conn, 3),
        Err(Error::Status(Status::BadArgument))
    ));
    s.close(conn).unwrap();
    s.close(l).unwrap();
}

/// A process that ended: its id, and the slot ownership of this thread.
struct Ended(u64);

impl rtvm_guest_linux::slots::Owners for Ended {
    fn me(&self) -> u64 {
        rtvm_guest_linux::slots::LinuxThreads.me()
    }
    fn alive(&self, id: u64) -> bool {
        rtvm_guest_linux::slots::LinuxThreads.alive(id)
    }
    fn process(&self) -> u64 {
        self.0
    }
}

#[test]
fn sockets_a_process_left_open_when_it_ended_are_reaped_by_another() {
    let _serial = serial();
    let slots = InProcessSlots::new(policy(&["127.0.0.1:*"], &["127.0.0.1:*"]));
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = u64::from(child.id());
    child.wait().unwrap();
    let ended = Sockets::with_owners(&slots, Ended(dead));
    for _ in 0..3 {
        ended.socket(INET, UDP).unwrap();
    }
    let live = Sockets::new(&slots);
    let mine = live.socket(INET, TCP).unwrap();
    let me = u64::from(std::process::id());
    let mut owners = live.owners().unwrap();
    owners.sort_unstable();
    let mut expected = vec![dead, me];
    expected.sort_unstable();
    assert_eq!(owners, expected);
    assert_eq!(live.reap_ended().unwrap(), 3);
    assert_eq!(slots.open_sockets(), 1, "the live process's socket stays");
    assert_eq!(live.owners().unwrap(), vec![me]);
    assert_eq!(live.reap_ended().unwrap(), 0);
    live.close(mine).unwrap();
    assert_eq!(slots.open_sockets(), 0);
}

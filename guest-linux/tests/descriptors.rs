//! Outsourced sockets as descriptors (`rtvm_guest_linux::descriptors`, what
//! the preload library's socket functions call) end to end against the
//! VMM's real VMRPC server and `NetService`, in-process, with host sockets
//! on loopback as the peers: C semantics, errno and descriptor lifetimes.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rtvm_guest_linux::descriptors::{Fd, Host, SocketDescriptors};
use rtvm_guest_linux::net::Addr;
use rtvm_vmm::config::NetPolicy;
use support::InProcessSlots;

/// The host side as the layer sees it: the same clock (in-process, the
/// guest's clock is the host's) and a vCPU kind the test sets.
struct TestHost {
    rt: AtomicBool,
}

impl Host for TestHost {
    fn now(&self) -> u64 {
        rtvm_vmm::clock::now_ns()
    }
    fn on_rt_vcpu(&self) -> bool {
        self.rt.load(Ordering::Relaxed)
    }
}

type Layer = SocketDescriptors<InProcessSlots, TestHost>;

fn layer() -> Layer {
    let policy = NetPolicy {
        bind: vec!["127.0.0.1:*".parse().unwrap()],
        connect: vec!["127.0.0.1:*".parse().unwrap()],
        ..NetPolicy::default()
    };
    SocketDescriptors::new(
        InProcessSlots::new(policy),
        TestHost {
            rt: AtomicBool::new(true),
        },
    )
}

/// One test at a time: two of them count this process's descriptors.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn local(port: u16) -> Option<Addr> {
    Some(Addr::v4([127, 0, 0, 1], port))
}

fn std_addr(a: Addr) -> std::net::SocketAddr {
    a.to_string().parse().unwrap()
}

fn udp(l: &Layer) -> Fd {
    l.socket(libc::AF_INET, libc::SOCK_DGRAM, 0)
        .unwrap()
        .unwrap()
}

fn tcp(l: &Layer) -> Fd {
    l.socket(libc::AF_INET, libc::SOCK_STREAM, 0)
        .unwrap()
        .unwrap()
}

fn pollfd(fd: Fd, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

const SECOND: Option<u64> = Some(1_000_000_000);

#[test]
fn only_inet_udp_and_tcp_are_outsourced_and_each_is_a_real_descriptor() {
    let _serial = serial();
    let l = layer();
    assert!(l.socket(libc::AF_UNIX, libc::SOCK_STREAM, 0).is_none());
    assert!(l.socket(libc::AF_INET, libc::SOCK_RAW, 1).is_none());
    assert!(l
        .socket(libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_TCP)
        .is_none());
    let fd = l
        .socket(
            libc::AF_INET6,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
        .unwrap()
        .unwrap();
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
    assert_eq!(link.to_string_lossy(), "anon_inode:[eventfd]");
    // SAFETY: F_GETFD on a descriptor of this process.
    let fd_flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    assert_eq!(fd_flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    assert_eq!(
        l.status_flags(fd),
        Ok(libc::O_RDWR | libc::O_NONBLOCK),
        "SOCK_NONBLOCK"
    );
    let ty = l.getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE).unwrap();
    assert_eq!(ty, libc::SOCK_STREAM.to_ne_bytes());
    assert_eq!(l.close(fd), Some(Ok(())));
    assert!(!l.is_outsourced(fd));
    assert_eq!(l.close(fd), None, "no longer ours: the C library's close");
}

#[test]
fn udp_peek_receive_and_answer_like_socat() {
    let _serial = serial();
    let l = layer();
    let fd = udp(&l);
    l.bind(fd, local(0)).unwrap();
    let me = l.name(fd, false).unwrap();
    assert_ne!(me.port, 0);
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.send_to(b"hello", std_addr(me)).unwrap();

    // socat's UDP-LISTEN: wait, peek one byte for the sender, connect.
    let mut set = [pollfd(fd, libc::POLLIN)];
    assert_eq!(l.poll(&mut set, SECOND), Some(Ok(1)));
    assert_eq!(set[0].revents, libc::POLLIN);
    let mut one = [0u8; 1];
    let (n, from) = l.recv(fd, &mut one, libc::MSG_PEEK).unwrap();
    assert_eq!((n, &one), (1, b"h"));
    assert_eq!(std_addr(from), peer.local_addr().unwrap());
    l.connect(fd, Some(from)).unwrap();
    assert_eq!(l.name(fd, true), Ok(from));

    let mut buf = [0u8; 64];
    let (n, _) = l.recv(fd, &mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"hello", "the peek left it queued");
    assert_eq!(l.send(fd, b"hello", None, 0), Ok(5));
    let mut back = [0u8; 64];
    let (n, _) = peer.recv_from(&mut back).unwrap();
    assert_eq!(&back[..n], b"hello");
    l.close(fd).unwrap().unwrap();
}

#[test]
fn waits_end_as_the_caller_asked_nonblocking_timeout_or_data() {
    let _serial = serial();
    let l = layer();
    let fd = udp(&l);
    l.bind(fd, local(0)).unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(l.recv(fd, &mut buf, libc::MSG_DONTWAIT), Err(libc::EAGAIN));
    l.set_nonblocking(fd, true).unwrap();
    assert_eq!(l.recv(fd, &mut buf, 0), Err(libc::EAGAIN));
    l.set_nonblocking(fd, false).unwrap();
    // SO_RCVTIMEO of 30 ms, over several bounded parks (1 ms each off the
    // RT vCPU).
    l.host().rt.store(false, Ordering::Relaxed);
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 30_000,
    };
    // SAFETY: a timeval is plain data.
    let bytes =
        unsafe { std::slice::from_raw_parts((&tv as *const libc::timeval).cast::<u8>(), 16) };
    l.setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, bytes)
        .unwrap();
    assert_eq!(
        l.getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO),
        Ok(bytes.to_vec())
    );
    let parks = l.sockets().transport().io_parks();
    assert_eq!(l.recv(fd, &mut buf, 0), Err(libc::EAGAIN));
    assert!(
        l.sockets().transport().io_parks() > parks + 1,
        "parked in slices"
    );
    // A blocking receive with data on its way.
    let me = std_addr(l.name(fd, false).unwrap());
    let sender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(5));
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .send_to(b"late", me)
            .unwrap();
    });
    l.setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &[0; 16])
        .unwrap();
    let (n, _) = l.recv(fd, &mut buf, 0).unwrap();
    assert_eq!(&buf[..n], b"late");
    sender.join().unwrap();
    assert_eq!(
        l.setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &[0; 3]),
        Err(libc::EINVAL)
    );
    l.close(fd).unwrap().unwrap();
}

#[test]
fn tcp_accept_echo_and_end_of_stream() {
    let _serial = serial();
    let l = layer();
    let listener = tcp(&l);
    l.setsockopt(
        listener,
        libc::SOL_SOCKET,
        libc::SO_REUSEADDR,
        &1i32.to_ne_bytes(),
    )
    .unwrap();
    l.bind(listener, local(0)).unwrap();
    l.listen(listener, 5).unwrap();
    let at = std_addr(l.name(listener, false).unwrap());
    assert_eq!(
        l.getsockopt(listener, libc::SOL_SOCKET, libc::SO_ACCEPTCONN),
        Ok(1i32.to_ne_bytes().to_vec())
    );
    let mut out = [pollfd(listener, libc::POLLIN | libc::POLLOUT)];
    assert_eq!(
        l.poll(&mut out, Some(0)),
        Some(Ok(0)),
        "a listener is not writable"
    );

    let client = std::thread::spawn(move || {
        let mut s = TcpStream::connect(at).unwrap();
        s.write_all(b"ping").unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        back
    });
    let (conn, peer) = l
        .accept(listener, libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
        .unwrap();
    assert_eq!(peer.family, rtvm_guest_linux::net::INET);
    assert_eq!(l.status_flags(conn), Ok(libc::O_RDWR | libc::O_NONBLOCK));
    l.set_nonblocking(conn, false).unwrap();
    let mut buf = [0u8; 4];
    let (n, _) = l.recv(conn, &mut buf, libc::MSG_WAITALL).unwrap();
    assert_eq!(&buf[..n], b"ping");
    assert_eq!(l.send(conn, b"pong", None, libc::MSG_NOSIGNAL), Ok(4));
    assert_eq!(&client.join().unwrap(), b"pong");
    assert_eq!(
        l.recv(conn, &mut buf, 0).map(|r| r.0),
        Ok(0),
        "end of stream"
    );
    assert_eq!(l.readable(conn), Ok(0));
    l.shutdown(conn, libc::SHUT_WR).unwrap();
    assert_eq!(l.shutdown(conn, 7), Err(libc::EINVAL));
    l.close(conn).unwrap().unwrap();
    l.close(listener).unwrap().unwrap();
}

#[test]
fn a_poll_set_mixing_outsourced_and_local_descriptors_sees_both() {
    let _serial = serial();
    let l = layer();
    let fd = udp(&l);
    l.bind(fd, local(0)).unwrap();
    let me = std_addr(l.name(fd, false).unwrap());
    let mut pipe = [0; 2];
    // SAFETY: a two-int array for pipe(2).
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);

    // Nothing ready: the timeout ends it.
    let mut set = [pollfd(fd, libc::POLLIN), pollfd(pipe[0], libc::POLLIN)];
    assert_eq!(l.poll(&mut set, Some(3_000_000)), Some(Ok(0)));

    // The local end becomes ready while the set waits in slices.
    let writer = pipe[1];
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(5));
        // SAFETY: one byte from a live buffer to our pipe.
        unsafe { libc::write(writer, b"x".as_ptr().cast(), 1) };
    });
    assert_eq!(l.poll(&mut set, SECOND), Some(Ok(1)));
    assert_eq!((set[0].revents, set[1].revents), (0, libc::POLLIN));
    t.join().unwrap();
    let mut byte = [0u8; 1];
    // SAFETY: reading one byte into a live buffer.
    unsafe { libc::read(pipe[0], byte.as_mut_ptr().cast(), 1) };

    // The outsourced one: readable, and select says the same.
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(b"d", me)
        .unwrap();
    assert_eq!(l.poll(&mut set, SECOND), Some(Ok(1)));
    assert_eq!((set[0].revents, set[1].revents), (libc::POLLIN, 0));
    // SAFETY: fd_sets are plain data, zeroed then set.
    let (mut r, mut w): (libc::fd_set, libc::fd_set) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: valid sets; every descriptor is below FD_SETSIZE.
    unsafe {
        libc::FD_SET(fd, &mut r);
        libc::FD_SET(pipe[0], &mut r);
        libc::FD_SET(pipe[1], &mut w);
    }
    let nfds = fd.max(pipe[0]).max(pipe[1]) + 1;
    // SAFETY: valid sets.
    let n = unsafe { l.select(nfds, &mut r, &mut w, std::ptr::null_mut(), SECOND) };
    assert_eq!(n, Some(Ok(2)), "the socket readable, the pipe writable");
    // SAFETY: valid sets.
    unsafe {
        assert!(libc::FD_ISSET(fd, &r) && !libc::FD_ISSET(pipe[0], &r));
        assert!(libc::FD_ISSET(pipe[1], &w));
    }
    // A set with no outsourced descriptor is not the layer's.
    let mut plain = [pollfd(pipe[0], libc::POLLIN)];
    assert_eq!(l.poll(&mut plain, Some(0)), None);
    l.close(fd).unwrap().unwrap();
    // SAFETY: our pipe's descriptors.
    unsafe {
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
}

#[test]
fn epoll_reports_outsourced_sockets_with_their_data_and_oneshot_disarms() {
    let _serial = serial();
    let l = layer();
    let fd = udp(&l);
    l.bind(fd, local(0)).unwrap();
    let me = std_addr(l.name(fd, false).unwrap());
    // SAFETY: plain system call.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0);
    let ev = |events: i32, data: u64| libc::epoll_event {
        events: events as u32,
        u64: data,
    };
    assert_eq!(
        l.epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, Some(ev(libc::EPOLLIN, 77))),
        Some(Ok(()))
    );
    assert_eq!(
        l.epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, Some(ev(libc::EPOLLIN, 77))),
        Some(Err(libc::EEXIST))
    );
    assert_eq!(
        l.epoll_ctl(-1, libc::EPOLL_CTL_ADD, fd, None),
        Some(Err(libc::EBADF))
    );
    let mut out = [ev(0, 0); 4];
    assert_eq!(l.epoll_wait(ep, &mut out, Some(2_000_000)), Some(Ok(0)));
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .send_to(b"e", me)
        .unwrap();
    assert_eq!(l.epoll_wait(ep, &mut out, SECOND), Some(Ok(1)));
    let (events, data) = (out[0].events, out[0].u64);
    assert_eq!((events, data), (libc::EPOLLIN as u32, 77));
    // One-shot: reported once, then silent until re-armed.
    assert_eq!(
        l.epoll_ctl(
            ep,
            libc::EPOLL_CTL_MOD,
            fd,
            Some(ev(libc::EPOLLIN | libc::EPOLLONESHOT, 78))
        ),
        Some(Ok(()))
    );
    assert_eq!(l.epoll_wait(ep, &mut out, SECOND), Some(Ok(1)));
    assert_eq!(l.epoll_wait(ep, &mut out, Some(2_000_000)), Some(Ok(0)));
    assert_eq!(l.epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, None), Some(Ok(())));
    assert_eq!(
        l.epoll_ctl(ep, libc::EPOLL_CTL_DEL, fd, None),
        Some(Err(libc::ENOENT))
    );
    assert_eq!(
        l.epoll_wait(ep, &mut out, Some(0)),
        None,
        "nothing of ours left in it"
    );
    l.close(fd).unwrap().unwrap();
    // SAFETY: our epoll descriptor.
    unsafe { libc::close(ep) };
}

#[test]
fn the_policy_refuses_with_the_documented_errno() {
    let _serial = serial();
    let l = layer();
    let fd = udp(&l);
    assert_eq!(
        l.bind(fd, Some(Addr::v4([0, 0, 0, 0], 9))),
        Err(libc::EACCES)
    );
    assert_eq!(
        l.bind(fd, Some(Addr::v6([0; 16], 9))),
        Err(libc::EAFNOSUPPORT)
    );
    assert_eq!(l.bind(fd, None), Err(libc::EINVAL));
    assert_eq!(
        l.send(fd, b"x", Some(Addr::v4([10, 9, 9, 9], 9)), 0),
        Err(libc::EPERM)
    );
    let t = tcp(&l);
    assert_eq!(
        l.connect(t, Some(Addr::v4([10, 9, 9, 9], 80))),
        Err(libc::EPERM)
    );
    // Refused by the peer, not the policy.
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(
        l.connect(t, Some(Addr::parse(&closed.to_string()).unwrap())),
        Err(libc::ECONNREFUSED)
    );
    assert_eq!(
        l.setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BROADCAST,
            &1i32.to_ne_bytes()
        ),
        Err(libc::ENOPROTOOPT)
    );
    assert_eq!(
        l.recv(fd, &mut [0; 4], libc::MSG_OOB),
        Err(libc::EOPNOTSUPP)
    );
    assert_eq!(
        l.listen(fd, 1),
        Err(libc::EOPNOTSUPP),
        "UDP does not listen"
    );
    assert_eq!(l.bind(999, local(1)), Err(libc::EBADF));
    l.close(fd).unwrap().unwrap();
    l.close(t).unwrap().unwrap();
}

#[test]
fn a_duplicate_keeps_the_socket_until_the_last_descriptor_closes() {
    let _serial = serial();
    let l = layer();
    let listener = tcp(&l);
    l.bind(listener, local(0)).unwrap();
    l.listen(listener, 1).unwrap();
    let at = std_addr(l.name(listener, false).unwrap());
    let mut client = TcpStream::connect(at).unwrap();
    let (conn, _) = l.accept(listener, 0).unwrap();
    // SAFETY: dup of our own descriptor (what the preload's dup does first).
    let second = unsafe { libc::dup(conn) };
    l.duplicated(conn, second);
    assert_eq!(l.sockets().transport().open_sockets(), 2);
    l.close(conn).unwrap().unwrap();
    assert_eq!(l.send(second, b"still", None, 0), Ok(5));
    let mut buf = [0u8; 5];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still");
    assert_eq!(
        l.sockets().transport().open_sockets(),
        2,
        "open through the duplicate"
    );
    l.close(second).unwrap().unwrap();
    assert_eq!(l.sockets().transport().open_sockets(), 1);
    assert_eq!(client.read(&mut buf).unwrap(), 0, "the peer sees the end");
    l.close(listener).unwrap().unwrap();
    assert_eq!(l.sockets().transport().open_sockets(), 0);
}

#[test]
fn fork_gives_the_child_handles_of_its_own_and_a_failed_fork_leaks_none() {
    let _serial = serial();
    let l = layer();
    let fd = udp(&l);
    l.bind(fd, local(0)).unwrap();
    assert_eq!(l.sockets().transport().open_sockets(), 1);
    // A failed fork: the child's handles are closed again.
    assert_eq!(l.fork_with(|| -1), -1);
    assert_eq!(l.sockets().transport().open_sockets(), 1);
    // The parent's side of a fork: the child owns the second handles.
    assert_eq!(l.fork_with(|| 4242), 4242);
    assert_eq!(l.sockets().transport().open_sockets(), 2);
    // The child's side (this process plays it): its descriptor now names
    // the second handle, and closing it leaves the parent's open.
    assert_eq!(l.fork_with(|| 0), 0);
    assert_eq!(l.sockets().transport().open_sockets(), 3);
    l.close(fd).unwrap().unwrap();
    assert_eq!(l.sockets().transport().open_sockets(), 2);
}

#[test]
fn many_opens_and_closes_leak_no_descriptor_on_either_side() {
    let _serial = serial();
    let l = layer();
    let before = open_fds();
    for i in 0..300 {
        let fd = if i % 2 == 0 { udp(&l) } else { tcp(&l) };
        l.bind(fd, local(0)).unwrap();
        l.close(fd).unwrap().unwrap();
    }
    assert_eq!(open_fds(), before, "guest placeholders");
    assert_eq!(l.sockets().transport().open_sockets(), 0, "host sockets");
    assert!(l.is_empty());
}

#[test]
fn the_socket_limit_is_emfile_and_a_closed_socket_makes_room() {
    let _serial = serial();
    let policy = NetPolicy {
        max_sockets: 2,
        ..NetPolicy::default()
    };
    let l = SocketDescriptors::new(
        InProcessSlots::new(policy),
        TestHost {
            rt: AtomicBool::new(false),
        },
    );
    let a = udp(&l);
    let b = tcp(&l);
    assert_eq!(
        l.socket(libc::AF_INET, libc::SOCK_DGRAM, 0),
        Some(Err(libc::EMFILE))
    );
    l.close(a).unwrap().unwrap();
    let c = udp(&l);
    l.close(b).unwrap().unwrap();
    l.close(c).unwrap().unwrap();
}

#[test]
fn a_connect_nobody_answers_waits_in_bounded_parks_and_times_out() {
    let _serial = serial();
    // A listener whose queue is full drops further SYNs: a connect to it
    // stays under way.
    // SAFETY: plain socket calls on a socket this test owns.
    let listener = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    let any = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes([127, 0, 0, 1]),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let mut bound = any;
    let mut bound_len = len;
    // SAFETY: valid addresses of the given lengths.
    unsafe {
        assert_eq!(
            libc::bind(listener, (&any as *const libc::sockaddr_in).cast(), len),
            0
        );
        assert_eq!(libc::listen(listener, 0), 0);
        libc::getsockname(
            listener,
            (&mut bound as *mut libc::sockaddr_in).cast(),
            &mut bound_len,
        );
    }
    let port = u16::from_be(bound.sin_port);
    let at: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let fillers: Vec<_> = (0..4)
        .filter_map(|_| TcpStream::connect_timeout(&at, Duration::from_millis(100)).ok())
        .collect();
    assert!(!fillers.is_empty(), "the queue took none");

    let l = layer();
    l.host().rt.store(false, Ordering::Relaxed);
    let t = tcp(&l);
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 50_000,
    };
    // SAFETY: a timeval is plain data.
    let bytes =
        unsafe { std::slice::from_raw_parts((&tv as *const libc::timeval).cast::<u8>(), 16) };
    l.setsockopt(t, libc::SOL_SOCKET, libc::SO_SNDTIMEO, bytes)
        .unwrap();
    let parks = l.sockets().transport().io_parks();
    assert_eq!(l.connect(t, local(port)), Err(libc::ETIMEDOUT));
    assert!(
        l.sockets().transport().io_parks() > parks + 1,
        "in several parks of at most 1 ms"
    );
    l.close(t).unwrap().unwrap();
    // SAFETY: the test's own socket.
    unsafe { libc::close(listener) };
}

//! `rtvm-guest`: VMRPC from a Linux guest's shell (root only).
//!
//! ```text
//! rtvm-guest ping [value]   echo a value through the host
//! rtvm-guest clock          host CLOCK_MONOTONIC (ns), by a Clock call
//! rtvm-guest info           this vCPU: index, RT, TSC kHz, vCPU count
//! rtvm-guest sleep <ns>     long-poll sleep for <ns> of host time
//! rtvm-guest exit <status>  end the VM with <status>
//! rtvm-guest net-selftest <port>
//!                           outsourced sockets on 127.0.0.1 of the host:
//!                           UDP and TCP between two of them on <port> and
//!                           <port>+1, and a bind to <port>-1, which the
//!                           policy must refuse
//! rtvm-guest net-reap       close the host sockets of guest processes
//!                           that ended without closing them; prints how
//!                           many
//! ```
//!
//! Calls go through the call page of the CPU the tool runs on: pin it
//! (`taskset -c 1 rtvm-guest sleep 1000000`); `net-selftest` goes through
//! the region's call slots and runs anywhere. Exit status: 0 ok, 1 VMRPC
//! error (with a message), 2 usage.

use std::process::ExitCode;

use rtvm_abi::vmrpc::Status;
use rtvm_guest_linux::net::{opt, Addr, Sockets, INET, TCP, UDP};
use rtvm_guest_linux::{exit_vm, Client, Error, PortIo};

const USAGE: &str =
    "usage: rtvm-guest ping [value] | clock | info | sleep <ns> | exit <status> | net-selftest <port> | net-reap";

enum Command {
    Ping(u64),
    Clock,
    Info,
    Sleep(u64),
    Exit(u32),
    NetSelftest(u16),
    NetReap,
}

fn parse(args: &[String]) -> Option<Command> {
    let number = |s: &String| -> Option<u64> {
        match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => s.parse().ok(),
        }
    };
    Some(match args {
        [c] if c == "ping" => Command::Ping(0x5254_564d),
        [c, v] if c == "ping" => Command::Ping(number(v)?),
        [c] if c == "clock" => Command::Clock,
        [c] if c == "info" => Command::Info,
        [c] if c == "net-reap" => Command::NetReap,
        [c, ns] if c == "sleep" => Command::Sleep(number(ns)?),
        // A negative status is taken as its 32-bit two's complement.
        [c, s] if c == "exit" => Command::Exit(
            s.parse::<u32>()
                .ok()
                .or_else(|| s.parse::<i32>().ok().map(|v| v as u32))?,
        ),
        [c, p] if c == "net-selftest" => Command::NetSelftest(
            p.parse()
                .ok()
                .filter(|&p: &u16| (1..u16::MAX).contains(&p))?,
        ),
        _ => return None,
    })
}

fn run(command: Command) -> Result<(), Error> {
    if let Command::Exit(status) = command {
        return Err(exit_vm(status));
    }
    if let Command::NetSelftest(port) = command {
        return net_selftest(&Sockets::new(PortIo::open()?), port);
    }
    if let Command::NetReap = command {
        let closed = Sockets::new(PortIo::open()?).reap_ended()?;
        println!("net-reap: closed {closed}");
        return Ok(());
    }
    let mut client = Client::new(PortIo::open()?);
    match command {
        Command::Ping(x) => {
            let echo = client.ping(x)?;
            println!("{echo:#x}");
        }
        Command::Clock => println!("{}", client.clock()?),
        Command::Info => {
            let vcpu = client.current_vcpu()?;
            let info = client.vcpu_info(vcpu)?;
            println!("vcpu {}", info.index);
            println!("rt {}", client.is_rt_cpu(vcpu));
            println!("realtime_thread {}", info.is_realtime());
            println!("timer_advance {}", info.has_timer_advance());
            println!("tsc_khz {}", info.tsc_khz);
            println!("vcpus {}", info.count);
        }
        Command::Sleep(ns) => {
            let woke = client.sleep_host(ns)?;
            println!(
                "late_ns {} early_return {} advance_ns {}",
                woke.returned.saturating_sub(woke.deadline),
                woke.early_return,
                woke.advance_ns
            );
        }
        Command::Exit(_) | Command::NetSelftest(_) | Command::NetReap => {
            unreachable!("handled above")
        }
    }
    Ok(())
}

/// Waits of the self-test: 10 s of host time (the harness is slow).
const WAIT_NS: u64 = 10_000_000_000;

/// A failed check of the self-test.
fn check(ok: bool, what: &str) -> Result<(), Error> {
    if ok {
        Ok(())
    } else {
        eprintln!("rtvm-guest: net-selftest: {what}");
        Err(Error::Status(Status::BadArgument))
    }
}

/// Outsourced sockets end to end from this guest: every byte through a call
/// slot, every socket a host socket under the VM's policy.
fn net_selftest(s: &Sockets<PortIo>, port: u16) -> Result<(), Error> {
    let here = |p| Addr::v4([127, 0, 0, 1], p);
    let deadline = || {
        let mut c = Client::new(s.transport());
        c.host_now().map(|now| now + WAIT_NS)
    };
    // UDP: a datagram from one socket to the other and back.
    let (a, b) = (s.socket(INET, UDP)?, s.socket(INET, UDP)?);
    s.bind(a, &here(port))?;
    s.bind(b, &here(port + 1))?;
    check(s.local_address(a)? == here(port), "getsockname")?;
    check(
        s.send(a, b"over", Some(&here(port + 1)))? == 4,
        "short UDP send",
    )?;
    let mut buf = [0u8; 16];
    let (n, from) = s.recv(b, &mut buf, deadline()?)?;
    check(
        &buf[..n] == b"over" && from == here(port),
        "UDP datagram garbled",
    )?;
    s.send(b, b"back", Some(&from))?;
    let (n, _) = s.recv(a, &mut buf, deadline()?)?;
    check(&buf[..n] == b"back", "UDP answer garbled")?;
    s.close(a)?;
    s.close(b)?;
    println!("net-selftest: udp ok");
    // TCP: a listener, a client connecting to it, both directions.
    let l = s.socket(INET, TCP)?;
    s.setsockopt(l, opt::REUSEADDR, 1)?;
    s.bind(l, &here(port))?;
    s.listen(l, 4)?;
    let c = s.socket(INET, TCP)?;
    s.connect(c, &here(port), deadline()?)?;
    let (conn, _) = s.accept(l, deadline()?)?;
    check(s.peer_address(c)? == here(port), "getpeername")?;
    check(s.send(c, b"hello", None)? == 5, "short TCP send")?;
    let mut got = Vec::new();
    while got.len() < 5 {
        let (n, _) = s.recv(conn, &mut buf, deadline()?)?;
        check(n > 0, "TCP peer closed early")?;
        got.extend_from_slice(&buf[..n]);
    }
    check(got == b"hello", "TCP bytes garbled")?;
    check(s.getsockopt(conn, opt::ERROR)? == 0, "SO_ERROR set")?;
    s.shutdown(c, 1)?;
    let (n, _) = s.recv(conn, &mut buf, deadline()?)?;
    check(n == 0, "no end of stream after the shutdown")?;
    s.close(c)?;
    s.close(conn)?;
    s.close(l)?;
    println!("net-selftest: tcp ok");
    // The policy: a port outside it.
    let r = s.socket(INET, UDP)?;
    match s.bind(r, &here(port - 1)) {
        Err(Error::Status(Status::NotPermitted)) => println!("net-selftest: refused ok"),
        other => check(false, &format!("a bind outside the policy gave {other:?}"))?,
    }
    s.close(r)?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(args.first().map(String::as_str), Some("-h" | "--help")) {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let Some(command) = parse(&args) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match run(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rtvm-guest: {e}");
            ExitCode::from(1)
        }
    }
}

//! `rtvm-guest`: VMRPC from a Linux guest's shell (root only).
//!
//! ```text
//! rtvm-guest ping [value]   echo a value through the host
//! rtvm-guest clock          host CLOCK_MONOTONIC (ns), by a Clock call
//! rtvm-guest info           this vCPU: index, RT, TSC kHz, vCPU count
//! rtvm-guest sleep <ns>     long-poll sleep for <ns> of host time
//! rtvm-guest exit <status>  end the VM with <status>
//! ```
//!
//! Calls go through the call page of the CPU the tool runs on: pin it
//! (`taskset -c 1 rtvm-guest sleep 1000000`). Exit status: 0 ok, 1 VMRPC
//! error (with a message), 2 usage.

use std::process::ExitCode;

use rtvm_guest_linux::{exit_vm, Client, Error, PortIo};

const USAGE: &str = "usage: rtvm-guest ping [value] | clock | info | sleep <ns> | exit <status>";

enum Command {
    Ping(u64),
    Clock,
    Info,
    Sleep(u64),
    Exit(u32),
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
        [c, ns] if c == "sleep" => Command::Sleep(number(ns)?),
        // A negative status is taken as its 32-bit two's complement.
        [c, s] if c == "exit" => Command::Exit(
            s.parse::<u32>()
                .ok()
                .or_else(|| s.parse::<i32>().ok().map(|v| v as u32))?,
        ),
        _ => return None,
    })
}

fn run(command: Command) -> Result<(), Error> {
    if let Command::Exit(status) = command {
        return Err(exit_vm(status));
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
        Command::Exit(_) => unreachable!("handled above"),
    }
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

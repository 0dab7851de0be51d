//! `logger rt=V period=P count=N write=1|0 file=F housekeeping=H`: the
//! real-time logging case. A real-time task on vCPU V (default: the last)
//! waits for N (default 1000) deadlines of a periodic host timer of period P
//! ns (default 1 ms), and after each wake writes one record `<cycle>
//! <deadline_ns> <late_ns>\n` to file F (default `rt.log`) in the share,
//! opened once (created, truncated, append mode), with one `FsWrite` per
//! record. It reports how late each wait returned (stream 0), the deadlines
//! missed (stream 1) and how long each write took, by the host clock around
//! the call (stream 2, ns). At the end it syncs and closes the file and
//! checks the file's size is the bytes it wrote.
//!
//! `write=0` runs the same loop without the file (no file call at all, so it
//! needs no share): the baseline the writes are compared against.
//!
//! Housekeeping on vCPU 0 and how the VM ends are as for `periodic` (see `rt`).

use super::rt::{self, Housekeeping};
use super::Ctx;
use crate::fmtbuf::FmtBuf;
use crate::fs::{open, CURRENT};
use crate::vmrpc::{Batch, Error, Rpc, Vmrpc};

pub fn run(ctx: &Ctx) -> ! {
    rt::run(ctx, "logger", Housekeeping::Ping, rt_task)
}

/// Longest record: three u64s, two spaces and a newline fit easily.
type Record = FmtBuf<80>;

fn rt_task(ctx: &Ctx) -> u32 {
    let period = ctx.number_arg("period", 1_000_000);
    let count = ctx.number_arg("count", 1000);
    let write = ctx.number_arg("write", 1) != 0;
    let file = ctx.arg("file").unwrap_or("rt.log");
    let mut rpc = Rpc::new(ctx.info, ctx.vcpu);

    let handle = if write {
        let flags = open::CREATE | open::WRITE | open::TRUNCATE | open::APPEND;
        match rpc.open(file, flags, 0) {
            Ok(handle) => Some(handle),
            Err(e) => {
                println!("logger: open {file}: {e} FAIL");
                return 1;
            }
        }
    } else {
        None
    };

    let mut late = Batch::new(0);
    let mut missed = Batch::new(1);
    let mut write_ns = Batch::new(2);
    let (mut total_missed, mut max_late) = (0, 0);
    let (mut records, mut bytes, mut max_write, mut sum_write) = (0u64, 0u64, 0u64, 0u64);
    // Writes that failed or were short, and the first of them: its cycle
    // and what the write returned.
    let mut bad_writes = 0;
    let mut first_bad: Option<(u64, Result<usize, Error>)> = None;

    rpc.periodic(period, 0).expect("VMRPC Periodic");
    for cycle in 1..=count {
        let wait = rpc
            .wait_next()
            .unwrap_or_else(|e| panic!("WaitNext in cycle {cycle}: {e}"));
        if let Some(handle) = handle {
            let record = Record::format(format_args!(
                "{cycle} {} {}\n",
                wait.woke.deadline,
                wait.woke.late_ns()
            ));
            let record = record.as_bytes();
            let t0 = rpc.now();
            let result = rpc.write(handle, record, CURRENT);
            let took = rpc.now() - t0;
            write_ns.push(&mut rpc, took);
            max_write = max_write.max(took);
            sum_write += took;
            match result {
                Ok(n) if n == record.len() => {
                    records += 1;
                    bytes += n as u64;
                }
                other => {
                    if let Ok(n) = other {
                        bytes += n as u64;
                    }
                    bad_writes += 1;
                    first_bad.get_or_insert((cycle, other));
                }
            }
        }
        late.push(&mut rpc, wait.woke.late_ns());
        missed.push(&mut rpc, wait.missed);
        total_missed += wait.missed;
        max_late = max_late.max(wait.woke.late_ns());
    }
    late.flush(&mut rpc);
    missed.flush(&mut rpc);
    write_ns.flush(&mut rpc);

    let mut failed = false;
    if let Some(handle) = handle {
        let size = rpc.fsync(handle).and_then(|()| rpc.fstat(handle));
        let closed = rpc.close(handle);
        match (size, closed) {
            (Ok(stat), Ok(())) if stat.size == bytes => {}
            (Ok(stat), Ok(())) => {
                println!(
                    "logger: {file} has {} bytes, {bytes} were written FAIL",
                    stat.size
                );
                failed = true;
            }
            (Err(e), _) | (_, Err(e)) => {
                println!("logger: fsync, fstat or close of {file}: {e} FAIL");
                failed = true;
            }
        }
    }

    println!(
        "logger: cycles={count} missed={total_missed} max_late_ns={max_late} records={records}"
    );
    if let Some(mean) = sum_write.checked_div(count).filter(|_| write) {
        println!("logger: write_ns max={max_write} mean={mean} bytes={bytes}");
    }
    if let Some((cycle, result)) = first_bad {
        match result {
            Ok(n) => println!(
                "logger: {bad_writes} of {count} writes failed (first: cycle {cycle}, \
                 {n} bytes written) FAIL"
            ),
            Err(e) => println!(
                "logger: {bad_writes} of {count} writes failed (first: cycle {cycle}, {e}) FAIL"
            ),
        }
        failed = true;
    }
    u32::from(failed)
}

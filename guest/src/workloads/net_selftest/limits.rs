//! The socket limit and open/close cycles of `net-selftest`.

use super::*;

pub(super) fn socket_limit(n: &mut Net, t: &mut Tally, limit: usize) {
    let already = n.n_open;
    let check = detail!("sockets up to the limit of {limit} ({already} open before)");
    t.record(check.as_str(), {
        (|| {
            while n.n_open < limit {
                let had = n.n_open;
                n.socket(INET, UDP)
                    .map_err(|e| detail!("socket {}: {e}", had + 1))?;
            }
            let r = n.rpc.socket(INET, UDP);
            if let Ok(h) = r {
                n.track(h);
            }
            expect_in(detail!("socket {}", limit + 1).as_str(), r, S::NoResources)
        })()
    });
    t.record("close them all", {
        let mut result = Ok(());
        while n.n_open > 0 {
            let h = n.open[n.n_open - 1];
            if let Err(e) = n.rpc.close_socket(h) {
                result = Err(detail!("close {h:#x}: {e}"));
            }
            n.n_open -= 1;
        }
        result
    });
    t.record("socket after closing them all", {
        (|| {
            let h = n.socket(INET6, TCP)?;
            n.close(h)
        })()
    });
}

pub(super) fn socket_cycles(n: &mut Net, t: &mut Tally, cycles: u64) {
    const KINDS: [(u64, u64); 4] = [(INET, UDP), (INET, TCP), (INET6, UDP), (INET6, TCP)];
    let check = detail!("{cycles} socket+close cycles");
    t.record(check.as_str(), {
        (|| {
            for i in 0..cycles {
                let (domain, kind) = KINDS[i as usize % KINDS.len()];
                let h = n
                    .socket(domain, kind)
                    .map_err(|e| detail!("cycle {i}: {e}"))?;
                n.close(h).map_err(|e| detail!("cycle {i}: {e}"))?;
            }
            Ok(())
        })()
    });
}

//! Kernel software timestamps on UDP sockets (`SO_TIMESTAMPING`): turning
//! them on, and reading a datagram or an error-queue entry with its
//! timestamp.

use std::io;
use std::mem::{size_of, MaybeUninit};
use std::os::fd::RawFd;

// Not (yet) in the libc crate for linux-gnu; values from
// <asm-generic/socket.h> (64-bit: the _OLD and _NEW layouts agree) and
// <linux/errqueue.h>.
pub(super) const SO_TIMESTAMPING: libc::c_int = 37;
const SCM_TIMESTAMPING: libc::c_int = SO_TIMESTAMPING;
const SCM_TSTAMP_SND: u32 = 0;

/// Turns kernel timestamping `flags` on for the socket `fd`.
pub(super) fn set_timestamping(fd: RawFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: setsockopt(2) with a live c_uint of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_TIMESTAMPING,
            (&flags as *const libc::c_uint).cast(),
            size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// CLOCK_REALTIME in ns, the clock of kernel software timestamps.
pub(super) fn realtime_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

pub(super) struct Msg {
    pub(super) len: usize,
    /// The software timestamp (`scm_timestamping.ts[0]`), if any.
    pub(super) timestamp_ns: Option<i64>,
    /// The OPT_ID of a TX timestamp from the error queue.
    pub(super) tx_id: Option<u32>,
}

/// recvmsg(2) without blocking, with the timestamp control messages parsed.
pub(super) fn recv_msg(fd: RawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<Msg> {
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is valid; the pointers set below are live
    // for the call.
    let mut hdr: libc::msghdr = unsafe { MaybeUninit::zeroed().assume_init() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = size_of::<[u64; 64]>();
    // SAFETY: recvmsg(2) into the buffers described by `hdr`.
    let n = unsafe { libc::recvmsg(fd, &mut hdr, flags | libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut msg = Msg {
        len: n as usize,
        timestamp_ns: None,
        tx_id: None,
    };
    // SAFETY: walking the control messages the kernel wrote into `control`
    // with the CMSG_* helpers, reading each payload unaligned.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&hdr);
        while !cmsg.is_null() {
            let c = &*cmsg;
            let data = libc::CMSG_DATA(cmsg);
            if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == SCM_TIMESTAMPING {
                let ts: [libc::timespec; 3] = std::ptr::read_unaligned(data.cast());
                if ts[0].tv_sec != 0 || ts[0].tv_nsec != 0 {
                    msg.timestamp_ns = Some(ts[0].tv_sec * 1_000_000_000 + ts[0].tv_nsec);
                }
            } else if c.cmsg_level == libc::SOL_IP && c.cmsg_type == libc::IP_RECVERR {
                let err: libc::sock_extended_err = std::ptr::read_unaligned(data.cast());
                if err.ee_errno == libc::ENOMSG as u32
                    && err.ee_origin == libc::SO_EE_ORIGIN_TIMESTAMPING
                    && err.ee_info == SCM_TSTAMP_SND
                {
                    msg.tx_id = Some(err.ee_data);
                }
            }
            cmsg = libc::CMSG_NXTHDR(&hdr, cmsg);
        }
    }
    Ok(msg)
}

//! VMRPC: how a guest calls the host like a procedure.
//!
//! # Protocol
//!
//! 1. The guest fills a **call page**: a 4 KiB-aligned page of its RAM laid out
//!    as [`CallPage`] (all fields little-endian): `abi_version` =
//!    [`crate::ABI_VERSION`], `call` = a [`Call`] number, `flags` =
//!    [`flags`] bits, `args`. Buffers are passed as (guest-physical
//!    address, length) argument pairs, or in the page's `payload`.
//! 2. It rings the doorbell: a 32-bit `out` of the call page's page frame
//!    number (address >> 12) to [`crate::port::DOORBELL`]. Every vCPU has a
//!    call page announced in [`crate::VcpuBoot::call_page`]; any other page of
//!    guest RAM works too, so a guest thread may keep its own.
//! 3. The VM exit lands in the host thread of the vCPU that rang. It serves
//!    the call (for a *long poll*, it first waits — the vCPU stays parked in
//!    the host and the guest runs nothing meanwhile), writes `status` and
//!    `results`, and resumes the vCPU after the `out` instruction. Other vCPUs
//!    keep running throughout.
//! 4. The guest reads `status` ([`Status`]) and `results`.
//!
//! If the doorbell value itself names no page of guest RAM, there is no page
//! to write a status to: the host then sets EAX to
//! [`DOORBELL_ERROR`]` | `[`Status::BadAddress`]. EAX is otherwise left as it
//! was (the page frame number, which never has bit 31 set).
//!
//! # Time
//!
//! Times are host `CLOCK_MONOTONIC` nanoseconds ([`Call::Clock`]). A guest that
//! wants to read the host clock without an exit maps it from its TSC with the
//! `tsc_khz` that [`Call::VcpuInfo`] returns and the (host time, guest TSC)
//! pair one `Clock` call returns. Where `tsc_khz` is 0 the TSC is no clock:
//! the host does not keep its own time with its TSC, and KVM then shifts a
//! guest's TSC whenever the vCPU is scheduled in, so only `Clock` tells time.

/// Value the host puts in EAX when the doorbell names no page of guest RAM,
/// or-ed with the status.
pub const DOORBELL_ERROR: u32 = 1 << 31;

/// Size of a call page.
pub const CALL_PAGE_SIZE: usize = 4096;
/// Number of argument words.
pub const ARGS: usize = 6;
/// Number of result words.
pub const RESULTS: usize = 4;
/// Offset of the payload area in the call page.
pub const PAYLOAD_OFFSET: usize = 128;
/// Size of the payload area.
pub const PAYLOAD_SIZE: usize = CALL_PAGE_SIZE - PAYLOAD_OFFSET;
/// Size of the part of the call page the host reads to decode a call.
pub const REQUEST_SIZE: usize = 16 + ARGS * 8;

/// Layout of a call page. Offsets: `abi_version` 0, `call` 4, `flags` 8,
/// `status` 12, `args` 16..64, `results` 64..96, reserved 96..128,
/// `payload` 128..4096.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CallPage {
    pub abi_version: u32,
    pub call: u32,
    pub flags: u32,
    /// Written by the host.
    pub status: u32,
    pub args: [u64; ARGS],
    /// Written by the host.
    pub results: [u64; RESULTS],
    pub reserved: [u64; 4],
    pub payload: [u8; PAYLOAD_SIZE],
}

/// Byte offsets of the host-written fields.
pub const STATUS_OFFSET: usize = 12;
pub const RESULTS_OFFSET: usize = 64;

/// Call flags.
pub mod flags {
    /// For waiting calls: the host may return up to its current timer advance
    /// *before* the deadline, with `results[0]` = the deadline, so the guest
    /// can spin the last stretch itself at CPL3 (where its TSC is native) and
    /// resume exactly on time, without paying the VM re-entry after the wake.
    /// Without it, a waiting call never returns before its deadline.
    pub const EARLY_RETURN: u32 = 1 << 0;
    /// For waiting calls: the argument named by the call carries the
    /// guest's own measurement of the previous early-return wait: when it
    /// got control back, in signed ns after that wait's deadline (two's
    /// complement), taken before spinning. This is the lateness that counts,
    /// VM re-entry included, and the host tunes its timer advance by it
    /// (as KVM's `lapic_timer_advance` measures at guest entry).
    pub const FEEDBACK: u32 = 1 << 1;
    /// Flags that only waiting calls may carry.
    pub const WAIT_ONLY: u32 = EARLY_RETURN | FEEDBACK;
    /// Every flag this ABI version defines.
    pub const ALL: u32 = EARLY_RETURN | FEEDBACK;
}

/// A `#[repr(u32)]` enum with stable numbers, and its tables made from the
/// one list: `from_u32`, `ALL` and `name` (the label after `=>`, or the
/// variant's own name). A number given twice does not compile.
macro_rules! numbered {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident = $n:literal $(=> $label:literal)?,)*
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $n,)*
        }

        impl $name {
            /// Every value this ABI version defines, in number order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The value numbered `n`, if this ABI version defines it.
            pub const fn from_u32(n: u32) -> Option<$name> {
                match n {
                    $($n => Some($name::$variant),)*
                    _ => None,
                }
            }

            /// A short name for logs and messages.
            pub const fn name(self) -> &'static str {
                match self {
                    $($name::$variant => numbered!(@label $variant $($label)?),)*
                }
            }
        }
    };
    (@label $variant:ident) => { stringify!($variant) };
    (@label $variant:ident $label:literal) => { $label };
}

numbered! {
/// Call numbers. Stable: a number, once given, keeps its meaning. Each
/// service owns a range ([`Service`]).
pub enum Call {
    /// `results[0] = args[0]`: the round-trip floor of VMRPC.
    Ping = 1,
    /// `results[0]` = host CLOCK_MONOTONIC in ns; `results[1]` = this
    /// vCPU's TSC at that same moment and `results[2]` = how far that pairing
    /// may be off, in ns (both 0 if the host cannot tell). With the pair and
    /// `tsc_khz`, a guest reads host time from its TSC, free of the
    /// uncertainty of an exit round trip.
    Clock = 2,
    /// Long poll: wait `args[0]` ns (`args[1]`: feedback). Results as for `SleepUntil`.
    Sleep = 3,
    /// Long poll: wait until host CLOCK_MONOTONIC ≥ `args[0]` ns
    /// (`args[1]`: [`flags::FEEDBACK`]).
    /// `results[0]` = the deadline, `results[1]` = host time when the host
    /// handed control back, `results[2]` = the timer advance in use (ns).
    SleepUntil = 4,
    /// Start a periodic timer on this vCPU: period `args[0]` ns, first
    /// deadline `args[1]` (0: now + period). `results[0]` = first deadline.
    Periodic = 5,
    /// Long poll: wait for the next deadline of the periodic timer
    /// (`args[0]`: [`flags::FEEDBACK`]).
    /// `results[0]` = that deadline, `results[1]` = how late the host woke
    /// the guest (ns, 0 when on time or early-return), `results[2]` = periods
    /// missed (deadlines that passed before this call was made),
    /// `results[3]` = the timer advance in use (ns).
    WaitNext = 6,
    /// `results[0]` = vCPU index, `results[1]` = [`vcpu_info`] flags,
    /// `results[2]` = vCPU count, `results[3]` = TSC frequency in kHz: 0 if
    /// unknown, or if the TSC cannot serve as a clock (the host does not keep
    /// time with its own TSC, and KVM may shift the guest's): then no
    /// `EARLY_RETURN`, and host time only by `Clock`.
    VcpuInfo = 7,
    /// Write the guest buffer (`args[0]` address, `args[1]` length ≤
    /// [`LOG_MAX`]) to the VMM's log.
    Log = 8,
    /// Hand `args[1]` u64 samples at guest address `args[0]` to the host,
    /// appended to sample stream `args[2]` (< [`HOST_STREAM`]); benchmarks
    /// collect guest-side measurements this way. `results[0]` = samples
    /// the stream now holds.
    Report = 9,

    // Outsourced files: a host directory shared with the VM (the "share").
    // Paths are (address, length) pairs of UTF-8 bytes, relative to the share
    // root, at most [`PATH_MAX`] bytes; nothing resolves outside the share
    // (`..`, absolute paths, symlinks leading out: `NotPermitted`). Handles
    // are small integers, valid until closed. Without a share every call
    // answers `NoShare`.
    /// Open `args[0..2]` path with [`fs::open`] flags `args[2]` (READ or
    /// WRITE required; unknown bits: `BadArgument`) and mode `args[3]`
    /// (permission bits only, ≤ 0o777; 0: 0o644) for created files. Only regular files and
    /// directories open. `results[0]` = handle.
    FsOpen = 20,
    /// Read up to `args[2]` bytes of handle `args[0]` into guest address
    /// `args[1]`, at offset `args[3]` ([`fs::CURRENT`]: the file position).
    /// `results[0]` = bytes read (0 at end of file).
    FsRead = 21,
    /// Write `args[2]` bytes at guest address `args[1]` to handle `args[0]`,
    /// at offset `args[3]` ([`fs::CURRENT`]: the file position, or the end
    /// for append). `results[0]` = bytes written. A write that would cross
    /// the VM's total-bytes quota is refused whole (`QuotaExceeded`).
    FsWrite = 22,
    /// Flush handle `args[0]` to stable storage.
    FsFsync = 23,
    /// Close handle `args[0]`.
    FsClose = 24,
    /// Stat path `args[0..2]` (not following a final symlink). Results:
    /// size, [`fs::kind`], modification time (ns since the epoch), mode bits.
    FsStat = 25,
    /// Stat handle `args[0]`; results as `FsStat`.
    FsFstat = 26,
    /// Make directory `args[0..2]` with mode `args[2]` (≤ 0o777; 0: 0o755).
    FsMkdir = 27,
    /// Remove path `args[0..2]`; `args[2]` = [`fs::REMOVE_DIR`] for a
    /// directory (other bits: `BadArgument`).
    FsUnlink = 28,
    /// Rename path `args[0..2]` to path `args[2..4]`, both inside the share.
    FsRename = 29,
    /// List directory `args[0..2]` from cookie `args[2]` (0: the start)
    /// into the guest buffer `args[3]`, `args[4]` bytes long, as records
    /// `kind: u8, name_len: u16 (LE), name`, in the host file system's own
    /// order (`.` and `..` left out). Results: the cookie to continue from
    /// (opaque: the host directory's offset; 0: no more), bytes written,
    /// entries. Each call costs what it returns, however large the
    /// directory. A buffer too small for even one record: `TooLarge`; a
    /// cookie the directory does not know: `BadArgument`.
    FsReaddir = 30,

    // Outsourced sockets: host sockets owned by the VM, confined by its
    // network policy (nothing is permitted by default). Handles are socket
    // handles only ([`net::HANDLE_TAG`] set); a file handle, a closed one or
    // another VM's is `BadHandle`. An address is three words: `port |
    // family << 16` ([`net::INET`], [`net::INET6`]), then the 16 address bytes
    // big-endian in two words (an IPv4 address is the low 32 bits of the
    // second). Waits take an absolute host deadline ([`net::NO_DEADLINE`]:
    // none) and park only the calling vCPU; a wait that reaches its deadline
    // answers `TimedOut`.
    /// `args[0]` = [`net::INET`] or [`net::INET6`], `args[1]` =
    /// [`net::UDP`] or [`net::TCP`], `args[2]` = its owner (a guest
    /// process id, for [`Call::NetReap`]; 0: none). `results[0]` = handle.
    NetSocket = 40,
    /// Bind handle `args[0]` to address `args[1..4]` (policy: `bind`).
    NetBind = 41,
    /// Listen on TCP handle `args[0]` with backlog `args[1]` (≤ 1024).
    NetListen = 42,
    /// Long poll: accept on listening handle `args[0]` until deadline
    /// `args[1]`; the new handle's owner is `args[2]` (as for
    /// [`Call::NetSocket`]). `results[0]` = new handle, `results[1..4]` =
    /// peer address.
    NetAccept = 43,
    /// Connect handle `args[0]` to address `args[1..4]` (policy: `connect`),
    /// waiting until deadline `args[4]` for TCP.
    NetConnect = 44,
    /// Send `args[2]` bytes at guest address `args[1]` on handle `args[0]`,
    /// to address `args[3..6]` (family 0, whatever the other bits: the connected peer; policy:
    /// `connect`). Waits for buffer space without deadline argument only as
    /// long as [`net::SEND_WAIT_NS`]. `results[0]` = bytes sent.
    NetSend = 45,
    /// Long poll: receive up to `args[2]` bytes into guest address `args[1]`
    /// from handle `args[0]`, until deadline `args[3]`, with flags `args[4]`
    /// ([`net::recv`]; 0 for none). `results[0]` = bytes (0 for TCP: the
    /// peer closed), `results[1..4]` = the sender's address.
    NetRecv = 46,
    /// Long poll: until deadline `args[2]`, wait for any of the `args[1]`
    /// (≤ [`net::POLL_MAX`]) handles in the u64 array at guest address
    /// `args[0]` to be readable (data, a connection to accept, or an error
    /// or hang-up to collect). `results[0]` = bit mask of the ready entries,
    /// `results[1]` = how many.
    NetPoll = 47,
    /// Set option `args[1]` ([`net::opt`]) of handle `args[0]` to `args[2]`.
    NetSetsockopt = 48,
    /// Close handle `args[0]`.
    NetClose = 49,
    /// Shut down handle `args[0]`: `args[1]` = 0 reading, 1 writing, 2 both.
    NetShutdown = 50,
    /// The address of handle `args[0]`: `args[1]` = 0 its own (what
    /// getsockname says), 1 its peer's (getpeername). `results[0..3]` =
    /// the address.
    NetAddress = 51,
    /// Option `args[1]` ([`net::opt`]) of handle `args[0]`: `results[0]` =
    /// its value (buffer sizes as the host's kernel reports them).
    NetGetsockopt = 52,
    /// A second handle to the socket of handle `args[0]`, owned by
    /// `args[1]` (for a guest process that forks): the socket stays open
    /// until its last handle is closed. Counts against the socket limit.
    /// `results[0]` = the handle.
    NetDup = 53,
    /// Close every handle owned by `args[0]` (≠ 0): what a guest does for a
    /// process that ended without closing its sockets. `results[0]` = how
    /// many were closed.
    NetReap = 54,
    /// The distinct owners of open handles: up to `args[1]` of them as u64s
    /// at guest address `args[0]`. `results[0]` = how many were written,
    /// `results[1]` = how many there are.
    NetOwners = 55,
    /// Register the I/O ring area at guest address `args[0]` (page
    /// aligned, its header filled in: see `crate::ring`) with `args[1]`
    /// submission and `args[2]` completion entries. `results[0]` = the
    /// ring's id. `NotConfigured` when the VMM serves no rings.
    NetRingSetup = 56,
    /// Wake the VM's I/O poller for ring `args[0]` (when its header says
    /// the poller sleeps).
    NetRingKick = 57,
    /// Long poll: until deadline `args[1]`, wait for a completion in ring
    /// `args[0]` (at once if one is there).
    NetRingWait = 58,
}
}

/// The services calls are routed to, each owning a range of call numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// 1..=19: the calling vCPU's own: ping, clock, timers, vCPU facts,
    /// log, sample reports.
    Vcpu,
    /// 20..=39: outsourced files.
    Files,
    /// 40..=59: outsourced sockets.
    Net,
}

impl Call {
    /// The service that owns this call's number range.
    pub const fn service(self) -> Service {
        match self as u32 {
            1..=19 => Service::Vcpu,
            20..=39 => Service::Files,
            _ => Service::Net,
        }
    }

    /// Whether the call may park the vCPU in the host (a long poll).
    pub const fn is_long_poll(self) -> bool {
        matches!(self, Call::Sleep | Call::SleepUntil | Call::WaitNext)
    }

    /// Whether the call may park the vCPU waiting for I/O (until a deadline
    /// argument): the VMM must be able to cut it short.
    pub const fn waits_for_io(self) -> bool {
        matches!(
            self,
            Call::NetAccept
                | Call::NetConnect
                | Call::NetSend
                | Call::NetRecv
                | Call::NetPoll
                | Call::NetRingWait
        )
    }
}

/// Longest message for [`Call::Log`].
pub const LOG_MAX: u64 = 1024;
/// Number of sample streams.
pub const STREAMS: u64 = 8;
/// The last stream is the host's own: the lateness (ns) of every
/// [`Call::WaitNext`] as the host saw it when it handed control back, to
/// cross-check what the guest measures. Guests cannot report to it.
pub const HOST_STREAM: u64 = STREAMS - 1;
/// Most samples one [`Call::Report`] may carry.
pub const REPORT_MAX: u64 = 65536;

/// Longest path for the file calls, in bytes.
pub const PATH_MAX: u64 = 1024;

/// Constants of the file calls.
pub mod fs {
    /// What making a file or a directory costs against the VM's write
    /// quota: its inode and directory entry take the host's disk though no
    /// byte is written. Opening a file that exists costs nothing.
    pub const CREATE_COST: u64 = 4096;
    /// `FsOpen` flags.
    pub mod open {
        pub const READ: u64 = 1 << 0;
        pub const WRITE: u64 = 1 << 1;
        pub const CREATE: u64 = 1 << 2;
        pub const TRUNCATE: u64 = 1 << 3;
        pub const APPEND: u64 = 1 << 4;
        /// With `CREATE`: fail with `AlreadyExists` if the file exists.
        pub const EXCLUSIVE: u64 = 1 << 5;
        pub const ALL: u64 = READ | WRITE | CREATE | TRUNCATE | APPEND | EXCLUSIVE;
        /// Flags that need a writable share.
        pub const WRITE_CLASS: u64 = WRITE | CREATE | TRUNCATE | APPEND;
    }
    /// Offset meaning "the file position" for `FsRead`/`FsWrite`.
    pub const CURRENT: u64 = u64::MAX;
    /// `FsUnlink` flag: remove a directory.
    pub const REMOVE_DIR: u64 = 1;
    /// File kinds in stat results and directory records.
    pub mod kind {
        pub const OTHER: u64 = 0;
        pub const FILE: u64 = 1;
        pub const DIR: u64 = 2;
        pub const SYMLINK: u64 = 3;
    }
}

/// Constants of the socket calls.
pub mod net {
    pub const INET: u64 = 4;
    pub const INET6: u64 = 6;
    pub const UDP: u64 = 1;
    pub const TCP: u64 = 2;
    /// Bit set in every socket handle, so a file handle is never mistaken for one.
    pub const HANDLE_TAG: u64 = 1 << 31;
    /// Deadline meaning "wait as long as it takes" (the VMM can still cut it short).
    pub const NO_DEADLINE: u64 = u64::MAX;
    /// How long a send waits for buffer space before `TimedOut`.
    pub const SEND_WAIT_NS: u64 = 1_000_000_000;
    /// Most handles one `NetPoll` may wait on.
    pub const POLL_MAX: u64 = 64;
    /// `NetRecv` flags.
    pub mod recv {
        /// Leave what is received queued (MSG_PEEK): the next receive
        /// returns it again.
        pub const PEEK: u64 = 1;
        /// Every flag this ABI version knows; others are `BadFlags`.
        pub const ALL: u64 = PEEK;
    }
    /// `NetSetsockopt` options.
    pub mod opt {
        /// SO_REUSEADDR (0 or 1).
        pub const REUSEADDR: u64 = 1;
        /// SO_RCVBUF in bytes (capped by the VM's buffer limit).
        pub const RCVBUF: u64 = 2;
        /// SO_SNDBUF in bytes (capped by the VM's buffer limit).
        pub const SNDBUF: u64 = 3;
        /// TCP_NODELAY (0 or 1).
        pub const NODELAY: u64 = 4;
        /// SO_PRIORITY 0..=6 (the queueing priority of the socket's packets).
        pub const PRIORITY: u64 = 5;
        /// IP_TOS / IPV6_TCLASS, 0..=255 (DSCP for real-time traffic).
        pub const TOS: u64 = 6;
        /// SO_ERROR, read only: the socket's pending error as a
        /// [`super::super::Status`] number (0: none), cleared by reading.
        pub const ERROR: u64 = 7;
        /// FIONREAD, read only: bytes ready to be received.
        pub const READABLE: u64 = 8;
    }

    /// The address words of an IPv4 address and port.
    pub const fn v4(octets: [u8; 4], port: u16) -> [u64; 3] {
        [
            port as u64 | INET << 16,
            0,
            u32::from_be_bytes(octets) as u64,
        ]
    }

    /// The address words of an IPv6 address and port.
    pub const fn v6(octets: [u8; 16], port: u16) -> [u64; 3] {
        let hi = u64::from_be_bytes([
            octets[0], octets[1], octets[2], octets[3], octets[4], octets[5], octets[6], octets[7],
        ]);
        let lo = u64::from_be_bytes([
            octets[8], octets[9], octets[10], octets[11], octets[12], octets[13], octets[14],
            octets[15],
        ]);
        [port as u64 | INET6 << 16, hi, lo]
    }
}

/// Flags in `results[1]` of [`Call::VcpuInfo`].
pub mod vcpu_info {
    /// The vCPU's host thread runs with a real-time policy.
    pub const REALTIME: u64 = 1 << 0;
    /// Waiting calls on this vCPU use an adaptive timer advance.
    pub const TIMER_ADVANCE: u64 = 1 << 1;
}

numbered! {
/// Status of a call. Stable numbers.
pub enum Status {
    Ok = 0 => "ok",
    /// An address or address + length lies outside guest RAM (or overflows).
    BadAddress = 1 => "bad address",
    /// A handle is unknown, closed or not this VM's.
    BadHandle = 2 => "bad handle",
    /// The configured policy forbids it.
    NotPermitted = 3 => "not permitted",
    /// A wait reached its timeout before its event.
    TimedOut = 4 => "timed out",
    /// A wait was cut short because the VM is stopping.
    Interrupted = 5 => "interrupted",
    /// The call number is unknown.
    UnsupportedCall = 6 => "unsupported call",
    /// The call page names another ABI version.
    BadAbiVersion = 7 => "bad ABI version",
    /// Unknown flag bits are set.
    BadFlags = 8 => "bad flags",
    /// An argument is out of range.
    BadArgument = 9 => "bad argument",
    /// The call needs state this vCPU does not have (e.g. `WaitNext` with no
    /// periodic timer).
    NotConfigured = 10 => "not configured",
    /// A limit on resources was reached (the host's own, e.g. descriptors).
    NoResources = 11 => "no resources",
    /// The path does not exist.
    NotFound = 12 => "not found",
    /// The path exists already (exclusive create, mkdir, rename over a directory).
    AlreadyExists = 13 => "already exists",
    /// A directory was expected.
    NotADirectory = 14 => "not a directory",
    /// A file was expected.
    IsADirectory = 15 => "is a directory",
    /// The directory is not empty.
    NotEmpty = 16 => "directory not empty",
    /// The share is read-only.
    ReadOnly = 17 => "read-only share",
    /// The VM has as many files open as its limit allows.
    TooManyOpenFiles = 18 => "too many open files",
    /// More bytes in one call than the limit allows (split the request).
    TooLarge = 19 => "too large for one call",
    /// The VM has written as many bytes as its limit allows (making a file
    /// or a directory counts [`fs::CREATE_COST`]).
    QuotaExceeded = 20 => "write quota exceeded",
    /// No share is configured for this VM.
    NoShare = 21 => "no share",
    /// The host's file system or network stack reported an error.
    IoError = 22 => "I/O error",
    /// The peer refused the connection (nothing listens there).
    ConnectionRefused = 23 => "connection refused",
    /// The peer reset the connection.
    ConnectionReset = 24 => "connection reset",
    /// The local address is in use by another socket.
    AddressInUse = 25 => "address in use",
    /// The directory holds as many entries as the share allows.
    DirectoryFull = 26 => "directory full",
}
}

/// A decoded, validated request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub call: Call,
    pub flags: u32,
    pub args: [u64; ARGS],
}

impl Request {
    /// Decodes the first [`REQUEST_SIZE`] bytes of a call page. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Request, Status> {
        let word = |at: usize, n: usize| -> Option<u64> {
            let b = bytes.get(at..at.checked_add(n)?)?;
            let mut v = [0u8; 8];
            v[..n].copy_from_slice(b);
            Some(u64::from_le_bytes(v))
        };
        let version = word(0, 4).ok_or(Status::BadAddress)? as u32;
        if version != crate::ABI_VERSION {
            return Err(Status::BadAbiVersion);
        }
        let number = word(4, 4).ok_or(Status::BadAddress)? as u32;
        let call = Call::from_u32(number).ok_or(Status::UnsupportedCall)?;
        let flags = word(8, 4).ok_or(Status::BadAddress)? as u32;
        if flags & !flags::ALL != 0 {
            return Err(Status::BadFlags);
        }
        if flags & flags::WAIT_ONLY != 0 && !call.is_long_poll() {
            return Err(Status::BadFlags);
        }
        let mut args = [0u64; ARGS];
        for (i, a) in args.iter_mut().enumerate() {
            *a = word(16 + i * 8, 8).ok_or(Status::BadAddress)?;
        }
        Ok(Request { call, flags, args })
    }

    /// Encodes the request into the first [`REQUEST_SIZE`] bytes of `out`
    /// (what a guest writes before ringing the doorbell).
    pub fn encode(&self, out: &mut [u8; REQUEST_SIZE]) {
        out[0..4].copy_from_slice(&crate::ABI_VERSION.to_le_bytes());
        out[4..8].copy_from_slice(&(self.call as u32).to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.to_le_bytes());
        out[12..16].copy_from_slice(&0u32.to_le_bytes());
        for (i, a) in self.args.iter().enumerate() {
            out[16 + i * 8..24 + i * 8].copy_from_slice(&a.to_le_bytes());
        }
    }
}

/// The guest-physical address of the call page a doorbell value names, if
/// the whole page lies inside guest RAM of `ram_size` bytes.
pub fn call_page_address(doorbell: u32, ram_size: u64) -> Option<u64> {
    if doorbell & DOORBELL_ERROR != 0 {
        return None;
    }
    let addr = u64::from(doorbell) << 12;
    buffer_in_ram(addr, CALL_PAGE_SIZE as u64, ram_size).then_some(addr)
}

/// Whether `[addr, addr + len)` lies inside guest RAM of `ram_size` bytes
/// starting at address 0. Overflow-safe.
pub fn buffer_in_ram(addr: u64, len: u64, ram_size: u64) -> bool {
    match addr.checked_add(len) {
        Some(end) => end <= ram_size,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(version: u32, call: u32, flags: u32, args: [u64; ARGS]) -> [u8; REQUEST_SIZE] {
        let mut b = [0u8; REQUEST_SIZE];
        b[0..4].copy_from_slice(&version.to_le_bytes());
        b[4..8].copy_from_slice(&call.to_le_bytes());
        b[8..12].copy_from_slice(&flags.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            b[16 + i * 8..24 + i * 8].copy_from_slice(&a.to_le_bytes());
        }
        b
    }

    #[test]
    fn layout_matches_the_documented_offsets() {
        assert_eq!(core::mem::size_of::<CallPage>(), CALL_PAGE_SIZE);
        assert_eq!(core::mem::offset_of!(CallPage, status), STATUS_OFFSET);
        assert_eq!(core::mem::offset_of!(CallPage, args), 16);
        assert_eq!(core::mem::offset_of!(CallPage, results), RESULTS_OFFSET);
        assert_eq!(core::mem::offset_of!(CallPage, payload), PAYLOAD_OFFSET);
    }

    #[test]
    fn each_bad_request_class_has_its_status() {
        let v = crate::ABI_VERSION;
        assert_eq!(
            Request::decode(&page(v + 1, 1, 0, [0; 6])),
            Err(Status::BadAbiVersion)
        );
        assert_eq!(
            Request::decode(&page(v, 0, 0, [0; 6])),
            Err(Status::UnsupportedCall)
        );
        assert_eq!(
            Request::decode(&page(v, 999, 0, [0; 6])),
            Err(Status::UnsupportedCall)
        );
        assert_eq!(
            Request::decode(&page(v, 1, 1 << 7, [0; 6])),
            Err(Status::BadFlags)
        );
        assert_eq!(
            Request::decode(&page(v, Call::Ping as u32, flags::EARLY_RETURN, [0; 6])),
            Err(Status::BadFlags),
            "early return only means something for waits"
        );
        assert_eq!(
            Request::decode(&page(v, 1, 0, [0; 6])[..20]),
            Err(Status::BadAddress)
        );
        let ok = Request::decode(&page(v, 4, flags::EARLY_RETURN, [7, 0, 0, 0, 0, 9])).unwrap();
        assert_eq!(ok.call, Call::SleepUntil);
        assert_eq!(ok.args[5], 9);
    }

    #[test]
    fn doorbell_values_outside_ram_name_no_page() {
        let ram = 64 << 20;
        assert_eq!(call_page_address(0x3fff, ram), Some(0x3fff << 12));
        assert_eq!(call_page_address(0x4000, ram), None);
        assert_eq!(call_page_address(u32::MAX, u64::MAX), None);
        assert!(!buffer_in_ram(u64::MAX - 1, 4, u64::MAX));
        assert!(buffer_in_ram(ram - 8, 8, ram));
        assert!(!buffer_in_ram(ram - 8, 9, ram));
    }

    #[test]
    fn every_status_and_call_number_round_trips() {
        for n in 0..64 {
            if let Some(s) = Status::from_u32(n) {
                assert_eq!(s as u32, n);
                assert!(!s.name().is_empty());
            }
            if let Some(c) = Call::from_u32(n) {
                assert_eq!(c as u32, n);
            }
        }
    }
}

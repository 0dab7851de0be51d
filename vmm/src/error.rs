//! Errors of the VMM. Each says what failed in words a user can act on.

use std::io;

use thiserror::Error;

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Error)]
pub enum Error {
    /// /dev/kvm could not be opened.
    #[error("cannot open {path}: {source} (is KVM enabled on this host, and may this user open it? root or the 'kvm' group is needed)")]
    KvmUnavailable {
        path: String,
        #[source]
        source: io::Error,
    },
    /// The host's KVM lacks something rtvm needs.
    #[error("KVM on this host lacks {0}")]
    KvmMissingCapability(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    /// Bad configuration (user input).
    #[error("{0}")]
    Config(String),
    /// Guest RAM could not be set up or accessed.
    #[error("guest memory: {0}")]
    GuestMemory(String),
    /// The guest image could not be loaded.
    #[error("guest image: {0}")]
    GuestImage(String),
    /// A real-time setting could not be applied and `rt_strict` was asked for.
    #[error("{0}")]
    Realtime(String),
    /// A host resource (thread, file, eventfd, signal) failed.
    #[error("{what}: {source}")]
    Host {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl Error {
    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }

    pub(crate) fn host(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Host { what, source }
    }

    /// Whether the error comes from the user's input rather than the host.
    pub fn is_user_error(&self) -> bool {
        matches!(self, Error::Config(_) | Error::GuestImage(_))
    }
}

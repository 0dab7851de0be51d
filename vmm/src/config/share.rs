//! The share: the host directory a VM's file calls are served from, and
//! its limits.

use std::path::PathBuf;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Default limits of a share.
pub const DEFAULT_MAX_OPEN_FILES: usize = 64;
pub const DEFAULT_MAX_BYTES_PER_CALL: u64 = 1 << 20;
pub const DEFAULT_MAX_BYTES_WRITTEN: u64 = 1 << 30;
pub const DEFAULT_MAX_DIR_ENTRIES: usize = 10_000;
/// The entry cap can be lowered, not raised beyond this: a create counts
/// the directory's entries up to the cap, so the cap bounds its cost.
pub const MAX_DIR_ENTRIES: usize = 1_000_000;
/// The per-call limit can be lowered, not raised beyond this.
pub const MAX_BYTES_PER_CALL: u64 = 16 << 20;

/// The host directory a VM may use, and its limits.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShareConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default = "default_max_open")]
    pub max_open_files: usize,
    #[serde(default = "default_max_call", deserialize_with = "super::byte_size")]
    pub max_bytes_per_call: u64,
    #[serde(default = "default_max_written", deserialize_with = "super::byte_size")]
    pub max_bytes_written: u64,
    /// Most entries the guest may make a directory hold: files, directories
    /// and renames into it are refused (`DirectoryFull`) once it has them.
    #[serde(default = "default_max_dir_entries")]
    pub max_dir_entries: usize,
}

fn default_max_dir_entries() -> usize {
    DEFAULT_MAX_DIR_ENTRIES
}

fn default_max_open() -> usize {
    DEFAULT_MAX_OPEN_FILES
}
fn default_max_call() -> u64 {
    DEFAULT_MAX_BYTES_PER_CALL
}
fn default_max_written() -> u64 {
    DEFAULT_MAX_BYTES_WRITTEN
}

impl ShareConfig {
    pub fn new(path: PathBuf, read_only: bool) -> Self {
        ShareConfig {
            path,
            read_only,
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            max_bytes_per_call: DEFAULT_MAX_BYTES_PER_CALL,
            max_bytes_written: DEFAULT_MAX_BYTES_WRITTEN,
            max_dir_entries: DEFAULT_MAX_DIR_ENTRIES,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.max_open_files == 0 || self.max_open_files > 65_535 {
            return Err(Error::Config(format!(
                "share max_open_files = {}: must be 1..=65535",
                self.max_open_files
            )));
        }
        if self.max_bytes_per_call == 0 || self.max_bytes_per_call > MAX_BYTES_PER_CALL {
            return Err(Error::Config(format!(
                "share max_bytes_per_call = {}: must be 1..={MAX_BYTES_PER_CALL}",
                self.max_bytes_per_call
            )));
        }
        if self.max_dir_entries == 0 || self.max_dir_entries > MAX_DIR_ENTRIES {
            return Err(Error::Config(format!(
                "share max_dir_entries = {}: must be 1..={MAX_DIR_ENTRIES}",
                self.max_dir_entries
            )));
        }
        Ok(())
    }
}

//! What the tests of the `rtvm` binary share: running it with a time limit
//! and reading what it printed.
#![allow(dead_code)] // each test file uses its own subset

pub mod nested;

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

/// The `rtvm` binary under test, with logging left at its default.
pub fn rtvm() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rtvm"));
    cmd.env_remove("RUST_LOG");
    cmd
}

/// Runs `cmd` with its output captured, killing it after `limit`.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rtvm starts");
    wait_output_within(child, limit)
}

/// Waits for a started `child`, killing it after `limit`.
pub fn wait_output_within(child: Child, limit: Duration) -> Output {
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        std::thread::sleep(limit);
        // SAFETY: plain kill(2); harmless if the process has ended.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let out = child.wait_with_output().expect("rtvm runs");
    assert!(!watchdog.is_finished(), "rtvm did not end within {limit:?}");
    out
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A path in the temp directory unique to this test process.
pub fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("rtvm-test-{}-{name}", std::process::id()))
}

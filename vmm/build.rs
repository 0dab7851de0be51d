//! Builds the built-in guest (`guest/`, a freestanding `no_std` kernel) with
//! its own cargo invocation and target directory, and hands its path to the
//! crate as `RTVM_GUEST_ELF` for `include_bytes!`.
//!
//! The guest is not a workspace member: its `panic = "abort"` profile and
//! freestanding link flags must not meet the workspace's test builds.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap();
    let guest = root.join("guest");
    for watched in ["src", "Cargo.toml", "Cargo.lock", "build.rs", "linker.ld"] {
        println!("cargo:rerun-if-changed={}", guest.join(watched).display());
    }
    println!("cargo:rerun-if-changed={}", root.join("abi/src").display());
    println!(
        "cargo:rerun-if-changed={}",
        root.join("abi/Cargo.toml").display()
    );

    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let target_dir = out_dir.join("guest-target");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--locked")
        .arg("--offline")
        .arg("--manifest-path")
        .arg(guest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // Whatever flags the outer build runs with (coverage, sanitizers, clippy
    // as the rustc wrapper, a cross target) are for host code, not the guest.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET_DIR",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_PROFILE_RELEASE_PANIC",
        "CARGO_PROFILE_RELEASE_LTO",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd
        .status()
        .expect("failed to run cargo to build the built-in guest");
    if !status.success() {
        panic!("building the built-in guest (guest/) failed: {status}");
    }
    let elf = target_dir.join("release").join("rtvm-guest");
    println!("cargo:rustc-env=RTVM_GUEST_ELF={}", elf.display());
}

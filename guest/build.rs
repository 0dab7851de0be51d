//! Links the guest as a freestanding, static, non-PIE ELF at the address the
//! ABI names, using `linker.ld`. Done here rather than in `.cargo/config.toml`
//! because the VMM's build script builds this crate from another directory,
//! where such a config file would not be read.

use std::path::Path;

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let script = Path::new(&manifest_dir).join("linker.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        &format!("-Wl,-T,{}", script.display()),
    ] {
        println!("cargo:rustc-link-arg={arg}");
    }
}

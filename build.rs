//! Release builds of the proxy's binary lay the functions a proxied request runs through next to
//! one another (`layout/hot-symbols.txt`, written by `bench/hot-symbols.sh`), so that a request
//! arriving at cold caches fetches fewer lines and pages of code (README, "Benchmarks",
//! eighteenth step). Only where the linker is the one Rust uses by default on the target (LLD on
//! x86_64 Linux) and no other was asked for: the option is LLD's. A symbol in the list that the
//! binary does not have (the code changed since the list was written) is skipped; the layout then
//! falls back to the linker's own order for it, and the build is the same otherwise.

use std::env;
use std::path::Path;

const LIST: &str = "layout/hot-symbols.txt";

fn main() {
    println!("cargo:rerun-if-changed={LIST}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CRM_PROXY_NO_LAYOUT");
    let release = env::var("PROFILE").is_ok_and(|p| p == "release");
    let default_lld = env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    // A linker of the user's own (`target.<triple>.linker`, `-C linker`, `-C link-arg=-fuse-ld=..`)
    // may not know the option.
    let own_linker = env::var_os("RUSTC_LINKER").is_some()
        || env::var("CARGO_ENCODED_RUSTFLAGS").is_ok_and(|f| f.contains("link"));
    let opted_out = env::var_os("CRM_PROXY_NO_LAYOUT").is_some();
    if !release || !default_lld || own_linker || opted_out {
        return;
    }
    let manifest = env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let list = Path::new(&manifest).join(LIST);
    if !list.is_file() {
        return;
    }
    let bin = "cargo:rustc-link-arg-bin=crm-quota-proxy";
    println!("{bin}=-Wl,--symbol-ordering-file={}", list.display());
    println!("{bin}=-Wl,--no-warn-symbol-ordering");
}

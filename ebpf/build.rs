//! Compiles the BPF programs in `src/*.c` with clang (`-O2 -g -target bpf`) into OUT_DIR.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The objects this crate embeds: (C source, object file name).
const OBJECTS: &[(&str, &str)] = &[
    ("src/sock_lb.c", "sock_lb.bpf.o"),
    ("src/policy.c", "policy.bpf.o"),
    ("src/layout.c", "layout.bpf.o"),
];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    println!("cargo:rerun-if-env-changed=CLANG");
    println!("cargo:rerun-if-changed=src/mesh.h");
    // Kernel UAPI headers include <asm/types.h>, which Debian keeps under the multiarch dir.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let multiarch = match arch.as_str() {
        "aarch64" => "/usr/include/aarch64-linux-gnu",
        _ => "/usr/include/x86_64-linux-gnu",
    };
    for (src, obj) in OBJECTS {
        println!("cargo:rerun-if-changed={src}");
        compile(&clang, Path::new(src), &out.join(obj), multiarch);
    }
}

fn compile(clang: &str, src: &Path, obj: &Path, multiarch: &str) {
    let output = Command::new(clang)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{multiarch}"))
        .arg("-Isrc")
        .arg("-c")
        .arg(src)
        .arg("-o")
        .arg(obj)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {clang} to build {} ({e}); run scripts/deps to install clang and libbpf-dev", src.display())
        });
    if !output.status.success() {
        panic!(
            "{clang} failed on {}:\n{}{}",
            src.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

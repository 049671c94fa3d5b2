//! mesh-ebpf: the meshd datapath programs and their map layouts.
//!
//! The BPF programs are C in `ebpf/src/*.c`, compiled by `build.rs` with
//! `clang -O2 -g -target bpf`. This crate will carry the object bytes and one
//! `#[repr(C)]` Rust definition of every map key and value, mirrored by exactly one
//! C header, with a test that proves the two layouts agree. The agent loads the
//! object with aya. Filled in by the eBPF datapath issue.

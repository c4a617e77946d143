//! Embeds the kernel object built by `cargo xtask build-ebpf`, or stops with a message that
//! says how to build it.

use std::path::Path;

fn main() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let object = manifest.join("../mesh-ebpf/target/bpfel-unknown-none/release/mesh-ebpf");
    println!("cargo:rerun-if-changed={}", object.display());
    println!("cargo:rerun-if-env-changed=MESH_EBPF_OBJECT");
    let object = std::env::var("MESH_EBPF_OBJECT").map_or(object, Into::into);
    if !object.exists() {
        panic!(
            "\n\nthe eBPF object {} does not exist: run `cargo xtask build-ebpf` first \
             (after `scripts/setup`, which installs its toolchain)\n",
            object.display()
        );
    }
    println!(
        "cargo:rustc-env=MESH_EBPF_OBJECT={}",
        object.canonicalize().expect("canonical path").display()
    );
}

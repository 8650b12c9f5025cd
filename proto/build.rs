//! Generates the tessera.v1 Rust code from `proto/` with protox (a pure-Rust protobuf compiler), so
//! that a fresh clone builds without a system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("proto");
    let files: Vec<PathBuf> = std::fs::read_dir(root.join("tessera/v1"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    let mut sorted = files;
    sorted.sort();
    // The directory too, so that an added .proto file is compiled.
    println!("cargo:rerun-if-changed={}", root.join("tessera/v1").display());
    for f in &sorted {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&sorted, [&root])?;
    let descriptor_path = PathBuf::from(std::env::var("OUT_DIR")?).join("tessera_v1_descriptor.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .codec_path("crate::codec::Codec")
        .compile_fds(fds)?;

    // etcd's v3 API (the part `tessera-head --store etcd://` uses): clients only.
    let etcd = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("etcd");
    let etcd_files = [etcd.join("kv.proto"), etcd.join("rpc.proto")];
    for f in &etcd_files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let etcd_fds = protox::compile(&etcd_files, [&etcd])?;
    tonic_prost_build::configure().build_server(false).build_client(true).compile_fds(etcd_fds)?;
    Ok(())
}

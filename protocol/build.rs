//! Compiles the .proto files with a vendored protoc, so a fresh machine needs no system package.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY-free: build scripts run single-threaded; tonic-prost-build reads PROTOC.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("cascade_descriptor.bin"))
        .compile_protos(&["proto/cascade.proto", "proto/raft.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}

//! Generates the gRPC and binlog types from `proto/` with a vendored protoc, so a
//! fresh machine needs no protoc of its own.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files = [
        "tern/kv/v1/kv.proto",
        "tern/admin/v1/admin.proto",
        "tern/replication/v1/replication.proto",
        "tern/binlog/v1/binlog.proto",
    ]
    .map(|f| root.join(f));
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Every `bytes` field is `bytes::Bytes`: keys and values move from the
        // request into binlog events and RocksDB batches without copies.
        .bytes(".")
        .file_descriptor_set_path(out.join("tern_descriptor.bin"))
        .compile_protos(&files, std::slice::from_ref(&root))?;
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    Ok(())
}

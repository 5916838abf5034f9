//! Generates Rust code from `proto/` with the pure-Rust protox compiler, so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not when it was compiled: a build script binary reused from another
    // checkout of the repository (a shared target directory) must still read this checkout's protos.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [root.join("busbar/v1/busbar.proto"), root.join("busbar/raft/v1/raft.proto")];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;
    // Record keys, values and header values as `bytes::Bytes`: decoding then slices them out of the
    // received message instead of allocating and copying each one, and the broker hands a stored
    // record's bytes to the response without a copy (a produce's records go into the batch the same way).
    tonic_prost_build::configure().bytes(".busbar.v1.Record").bytes(".busbar.v1.Header").compile_fds(fds)?;
    Ok(())
}

//! Generates the client gRPC protocol's Rust code from `proto/phxq/v1/phxq.proto`.
//!
//! The .proto is compiled with `protox` (pure Rust), so building needs no `protoc` on the
//! machine; `tonic-prost-build` then generates the messages, the client and the server.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    const PROTO: &str = "proto/phxq/v1/phxq.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    // Resolve `phxq/v1/phxq.proto` against the `proto` include directory: the file's name inside
    // the descriptor set is then its import path, as with protoc.
    let descriptors = protox::compile(["phxq/v1/phxq.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

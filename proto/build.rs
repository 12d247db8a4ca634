//! Generates the control services' Rust code from `replica.proto`, `engine.proto` and
//! `manager.proto` with protox, a protobuf compiler written in Rust, so that building
//! Horn needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=replica.proto");
    println!("cargo:rerun-if-changed=engine.proto");
    println!("cargo:rerun-if-changed=manager.proto");
    let fds = protox::compile(["replica.proto", "engine.proto", "manager.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}

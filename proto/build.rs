//! Generates the control service's Rust code from `replica.proto` with protox, a
//! protobuf compiler written in Rust, so that building Horn needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=replica.proto");
    let fds = protox::compile(["replica.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}

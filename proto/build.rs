//! Builds the gRPC code with a vendored protoc, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=tandem");
    println!("cargo:rerun-if-changed=csi");
    tonic_prost_build::configure().compile_protos(&["tandem/v1/admin.proto"], &["."])?;
    // The vendored protoc ships the well-known types (descriptor, timestamp, wrappers).
    tonic_prost_build::configure().compile_protos(&["csi/v1/csi.proto"], &["."])?;
    Ok(())
}

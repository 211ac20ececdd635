//! Compiles the control-plane protocol (`proto/ebb/mesh/v1`) with protox and tonic-prost-build: pure
//! Rust, no protoc needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "ebb/mesh/v1/resources.proto",
        "ebb/mesh/v1/control.proto",
        "ebb/mesh/v1/admin.proto",
        "ebb/mesh/v1/identity.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let mut config = tonic_prost_build::Config::new();
    // Resources travel in `Any`: their messages name themselves with the type URL xDS uses.
    config.enable_type_names();
    config.type_name_domain(["."], "type.googleapis.com");
    tonic_prost_build::configure().compile_fds_with_config(fds, config)?;
    Ok(())
}

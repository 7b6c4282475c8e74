//! Says at build time when JPEG decoding lacks libjpeg-turbo's SIMD code: mozjpeg-sys
//! assembles it only when `nasm` is on the PATH, and cargo does not show a registry
//! dependency's own warning about it. What mozjpeg-sys built is read from the `jconfig.h` it
//! generated (its `include` metadata, `DEP_JPEG_INCLUDE`), so the message follows its rebuilds.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let Some(dirs) = std::env::var_os("DEP_JPEG_INCLUDE") else {
        return;
    };
    let simd = std::env::split_paths(&dirs).any(|dir| {
        std::fs::read_to_string(dir.join("jconfig.h")).is_ok_and(|h| h.contains("WITH_SIMD"))
    });
    if matches!(arch.as_str(), "x86_64" | "x86") && !simd {
        println!(
            "cargo:warning=JPEG decoding is built without libjpeg-turbo's SIMD code (same pixels, \
             about half the decoding speed) because `nasm` was not found. Install nasm, then \
             `cargo clean -p mozjpeg-sys` and build again to get it."
        );
    }
}

//! Says at build time when JPEG decoding lacks libjpeg-turbo's SIMD code: mozjpeg-sys
//! assembles it only when `nasm` is on the PATH, and cargo does not show a registry
//! dependency's own warning about it. What mozjpeg-sys built is read from the `jconfig.h` it
//! generated (its `include` metadata, `DEP_JPEG_INCLUDE`), so the message follows its rebuilds.
//!
//! With the `cuda` feature it also compiles clipft's CUDA kernels (`src/model/cuda_kernels.cu`)
//! to PTX with `nvcc` (`$NVCC`, else on the PATH) for compute capability `$CUDA_COMPUTE_CAP`
//! (default 80; the driver compiles PTX for any newer GPU).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_cuda_kernels();
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let Some(dirs) = std::env::var_os("DEP_JPEG_INCLUDE") else {
        return;
    };
    let simd = std::env::split_paths(&dirs).any(|dir| {
        std::fs::read_to_string(dir.join("jconfig.h")).is_ok_and(|h| h.contains("WITH_SIMD"))
    });
    if matches!(arch.as_str(), "x86_64" | "x86") && !simd {
        // `cargo clean -p` clears one profile's directory: name the one being built.
        let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
        println!(
            "cargo:warning=JPEG decoding is built without libjpeg-turbo's SIMD code (same pixels, \
             about half the decoding speed) because `nasm` was not found. Install nasm, then \
             `cargo clean{} -p mozjpeg-sys` and build again to get it.",
            if release { " --release" } else { "" }
        );
    }
}

fn build_cuda_kernels() {
    const SRC: &str = "src/model/cuda_kernels.cu";
    println!("cargo:rerun-if-changed={SRC}");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let cap: String = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let cap = if cap.is_empty() { "80".into() } else { cap };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("cuda_kernels.ptx");
    let status = std::process::Command::new(&nvcc)
        .args([
            "--ptx",
            "-O3",
            "-std=c++17",
            &format!("-arch=compute_{cap}"),
            SRC,
            "-o",
        ])
        .arg(&out)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("`{nvcc}` failed on {SRC} ({s})"),
        Err(e) => panic!(
            "the `cuda` feature needs nvcc to compile {SRC}: could not run `{nvcc}` ({e}); \
             set NVCC or put the CUDA toolkit's bin on the PATH"
        ),
    }
}

//! Compiles `kernels/*.cu` with nvcc into fatbins (SASS for `CUDA_COMPUTE_CAP`, default 90 =
//! H100) under `OUT_DIR`, only when the `cuda` feature is on; the crate embeds them with
//! `include_bytes!` (see `src/kvcache/cuda.rs`). Without the feature nothing is compiled and no
//! CUDA toolkit is needed.
//!
//! nvcc is found as `NVCC`, then `CUDA_HOME/bin/nvcc` (or `CUDA_PATH`, `CUDA_ROOT`), then `nvcc`
//! on `PATH` (`eval "$(scripts/cuda-toolchain.sh)"` sets these up).
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for v in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "CUDA_ROOT",
        "CUDA_COMPUTE_CAP",
    ] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = find_nvcc();
    let cap: String = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "90".into())
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect();
    let cap = if cap.is_empty() {
        "90".to_string()
    } else {
        cap
    };
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in &sources {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src.file_stem().expect("file name").to_string_lossy();
        let dst = out.join(format!("{stem}.fatbin"));
        compile(&nvcc, src, &dst, &cap);
    }
}

fn find_nvcc() -> PathBuf {
    if let Some(p) = std::env::var_os("NVCC") {
        return p.into();
    }
    for v in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(root) = std::env::var_os(v) {
            let p = Path::new(&root).join("bin").join("nvcc");
            if p.exists() {
                return p;
            }
        }
    }
    "nvcc".into()
}

fn compile(nvcc: &Path, src: &Path, dst: &Path, cap: &str) {
    let status = Command::new(nvcc)
        .args(["--fatbin", "-O3", "-std=c++17", "-Ikernels"])
        .arg(format!("-gencode=arch=compute_{cap},code=sm_{cap}"))
        .arg(src)
        .arg("-o")
        .arg(dst)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "nvcc failed ({s}) on {}: fix the kernel, or build without `--features cuda`",
            src.display()
        ),
        Err(e) => panic!(
            "cannot run nvcc ({}): {e}. The `cuda` feature needs the CUDA toolkit: \
             eval \"$(scripts/cuda-toolchain.sh)\" or set NVCC / CUDA_HOME",
            nvcc.display()
        ),
    }
}

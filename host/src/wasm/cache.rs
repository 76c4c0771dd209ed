//! The compile cache: machine code of compiled plugins under `<state dir>/compiled`, keyed
//! by the `.wasm`'s content digest and the engine's compatibility hash, so a restart or a
//! hot swap to a precompiled version only loads it. Also gives a compile's memory back.

use super::engine::{error_chain, wasm_error};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Where the compiled code of the `.wasm` with `digest` is kept for `engine`: the engine's
/// compatibility hash (wasmtime version, settings, CPU features) is part of the name, so an
/// upgraded host never picks up code compiled by another.
pub(crate) fn cache_file(engine: &Engine, dir: &Path, digest: &str) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let hex = digest.trim_start_matches("sha256:");
    dir.join(format!("{hex}-{:016x}.cwasm", hasher.finish()))
}

/// The cached component in `file`, if there is a usable one.
pub(crate) fn load_cached(engine: &Engine, file: &Path) -> Option<Component> {
    if !file.is_file() {
        return None;
    }
    // SAFETY: `deserialize_file` trusts the file to be machine code that wasmtime produced
    // for this engine. The cache directory is the host's own (under its state directory,
    // written only by `store_cached`); wasmtime itself checks the version and settings
    // recorded in the file and refuses a mismatch, which we treat as a miss.
    match unsafe { Component::deserialize_file(engine, file) } {
        Ok(component) => Some(component),
        Err(e) => {
            tracing::warn!(file = %file.display(), "ignoring a cached compile: {}", error_chain(&e));
            None
        }
    }
}

/// Stores `component`'s code in `file` (written aside, then renamed into place, so a reader
/// never sees half a file). A failure only costs the next start a compile.
pub(crate) fn store_cached(component: &Component, file: &Path) {
    let result = (|| -> anyhow::Result<()> {
        let bytes = component.serialize().map_err(wasm_error)?;
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, file)?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(file = %file.display(), "cannot store the compiled plugin: {e:#}");
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(bytes);
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// Hands the memory a compile freed back to the operating system. Cranelift allocates tens
/// of MiB while it compiles a plugin, on several threads and so in several of glibc's malloc
/// arenas, and glibc keeps what is freed there for later: without this, a host that
/// compiled its plugins stays ~7 MiB per plugin bigger than one that loaded them from the
/// compile cache (`make bench-memory`). Takes a few milliseconds, once per compile.
pub(crate) fn release_compile_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free pages of glibc's heaps to the kernel; it does
    // not touch memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
}

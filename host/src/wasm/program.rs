//! One compiled version of a plugin: read, compiled (or loaded from the compile cache),
//! checked against the contract and linked, ready to instantiate. A hot swap prepares one
//! of these off the event path.

use super::bindings;
use super::cache::{cache_file, digest, load_cached, release_compile_memory, store_cached};
use super::engine::error_chain;
use super::host::HostState;
use super::instance::StoreData;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wasmtime::Engine;
use wasmtime::component::{Component, HasSelf, Linker};

/// Why a plugin could not be loaded. Each names the file and the cause, for the user.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid WebAssembly component: {message}")]
    Compile { path: PathBuf, message: String },
    #[error(
        "{path}: does not implement the eddy:plugin world (build it with the eddy-sdk for wasm32-wasip2): {message}"
    )]
    Contract { path: PathBuf, message: String },
    #[error("{path}: init failed: {message}")]
    Init { path: PathBuf, message: String },
    #[error("{path}: migrate failed: {message}")]
    Migrate { path: PathBuf, message: String },
}

/// One compiled version of a plugin, linked against the host and ready to instantiate. A hot
/// swap prepares one of these off the event path; the switch itself only instantiates it.
pub struct Program {
    pub(crate) path: PathBuf,
    pub(crate) digest: String,
    pub(crate) pre: bindings::PluginPre<StoreData>,
    /// Whether the component exports the optional `migrate` function.
    pub(crate) has_migrate: bool,
    /// How long reading, compiling (or loading the precompiled artifact) and linking took.
    pub compile_time: Duration,
    /// Whether the machine code came from the compile cache rather than a compile.
    pub precompiled: bool,
    /// Whether the machine code is the baseline compiler's ([`baseline_engine`]): a stopgap
    /// until the optimized code is ready.
    pub baseline: bool,
}

impl Program {
    /// Reads, compiles and links the component at `path`, checking that it implements the
    /// contract (its imports are ours, its exports have the right types). With a `cache`
    /// directory, the machine code of a `.wasm` compiled before (same bytes, same engine) is
    /// loaded from there instead of compiled again, and a new compile is stored there.
    pub fn compile(
        engine: &Engine,
        path: &Path,
        cache: Option<&Path>,
    ) -> Result<Program, LoadError> {
        Program::compile_and_release(engine, path, cache, true)
    }

    /// [`Program::compile`], handing the memory the compile freed back to the OS
    /// afterwards if `release` (a few milliseconds).
    fn compile_and_release(
        engine: &Engine,
        path: &Path,
        cache: Option<&Path>,
        release: bool,
    ) -> Result<Program, LoadError> {
        let started = std::time::Instant::now();
        let path = path.to_path_buf();
        let bytes = std::fs::read(&path).map_err(|source| LoadError::Read {
            path: path.clone(),
            source,
        })?;
        let digest = digest(&bytes);
        let cached = cache.map(|dir| cache_file(engine, dir, &digest));
        let (component, precompiled) = match cached.as_deref().and_then(|f| load_cached(engine, f))
        {
            Some(component) => (component, true),
            None => {
                let component = compile_component(engine, &path, &bytes)?;
                if let Some(file) = &cached {
                    store_cached(&component, file);
                }
                if release {
                    release_compile_memory();
                }
                (component, false)
            }
        };
        Program::link(engine, path, digest, component, started, precompiled)
    }

    /// Compiles the component at `path` with the baseline compiler (`engine` is a
    /// [`baseline_engine`]), checking the contract like [`Program::compile`]. Never cached:
    /// its code only bridges the time until the optimized compile is done, so it does not
    /// spend time giving memory back either: the optimized compile right after does.
    pub fn compile_baseline(engine: &Engine, path: &Path) -> Result<Program, LoadError> {
        let mut program = Program::compile_and_release(engine, path, None, false)?;
        program.baseline = true;
        Ok(program)
    }

    /// Whether `cache` holds `engine`'s compiled code for the `.wasm` with this digest.
    pub fn is_cached(engine: &Engine, cache: &Path, digest: &str) -> bool {
        cache_file(engine, cache, digest).is_file()
    }

    fn link(
        engine: &Engine,
        path: PathBuf,
        digest: String,
        component: Component,
        started: std::time::Instant,
        precompiled: bool,
    ) -> Result<Program, LoadError> {
        if let Some(version) = other_contract_version(engine, &component) {
            return Err(LoadError::Contract {
                path,
                message: format!(
                    "it was built against eddy:plugin@{version}, and this host speaks \
                     eddy:plugin@{CONTRACT_VERSION}: rebuild it with the eddy-sdk of this release"
                ),
            });
        }
        let contract = |e: wasmtime::Error| LoadError::Contract {
            path: path.clone(),
            message: error_chain(&e),
        };
        let mut linker: Linker<StoreData> = Linker::new(engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(contract)?;
        bindings::Plugin::add_to_linker::<StoreData, HasSelf<HostState>>(&mut linker, |d| {
            &mut d.host
        })
        .map_err(contract)?;
        let pre = linker
            .instantiate_pre(&component)
            .and_then(bindings::PluginPre::new)
            .map_err(contract)?;
        let has_migrate = component.get_export_index(None, "migrate").is_some();
        Ok(Program {
            path,
            digest,
            pre,
            has_migrate,
            compile_time: started.elapsed(),
            precompiled,
            baseline: false,
        })
    }

    /// Compiles the component at `path` into `cache` (unless it is there already), for a
    /// later [`Program::compile`] to load: `eddy compile`. Returns the artifact's path.
    pub fn precompile(engine: &Engine, path: &Path, cache: &Path) -> Result<PathBuf, LoadError> {
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let file = cache_file(engine, cache, &digest(&bytes));
        if load_cached(engine, &file).is_none() {
            store_cached(&compile_component(engine, path, &bytes)?, &file);
        }
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The engine that compiled this version: its instances must live in a store of it.
    pub fn engine(&self) -> &Engine {
        self.pre.instance_pre().engine()
    }

    /// `sha256:<hex>` of the `.wasm` file's bytes.
    pub fn digest(&self) -> &str {
        &self.digest
    }
}

/// The version of the `eddy:plugin` package in `wit/`, the one this host implements.
pub const CONTRACT_VERSION: &str = "0.5.0";

/// The `eddy:plugin` version a component imports, if it is not [`CONTRACT_VERSION`]: for a
/// message that says "rebuild" rather than "no matching implementation".
fn other_contract_version(engine: &Engine, component: &Component) -> Option<String> {
    component
        .component_type()
        .imports(engine)
        .filter_map(|(name, _)| name.strip_prefix("eddy:plugin/")?.split_once('@'))
        .map(|(_, version)| version.to_string())
        .find(|version| version != CONTRACT_VERSION)
}

fn compile_component(engine: &Engine, path: &Path, bytes: &[u8]) -> Result<Component, LoadError> {
    Component::new(engine, bytes).map_err(|e| LoadError::Compile {
        path: path.to_path_buf(),
        // wasmparser's messages span lines (byte dumps): keep them on one.
        message: error_chain(&e)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_version_is_the_wit_packages() {
        let wit = include_str!("../../../wit/eddy.wit");
        assert!(
            wit.contains(&format!("package eddy:plugin@{CONTRACT_VERSION};")),
            "CONTRACT_VERSION {CONTRACT_VERSION} is not wit/eddy.wit's package version"
        );
    }
}

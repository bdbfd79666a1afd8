//! Loading ONNX Runtime at run time (`ort` with `load-dynamic`): from `--ort-lib`, from
//! `ORT_DYLIB_PATH`, or from the `onnxruntime` wheel in the project's `.venv`. A missing or
//! unloadable library is an error that says where we looked and how to fix it, never a panic.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime library not found: pass --ort-lib PATH or set ORT_DYLIB_PATH to libonnxruntime.so \
         (scripts/setup.sh installs it from the onnxruntime wheel into .venv)"
    )]
    NotFound,
    #[error("ONNX Runtime library `{0}` does not exist")]
    Missing(PathBuf),
    #[error("cannot load ONNX Runtime from `{path}`: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("ONNX Runtime was already loaded from `{loaded}`; cannot load `{wanted}` too")]
    Conflict { loaded: PathBuf, wanted: PathBuf },
}

/// The process's one ONNX Runtime environment.
pub struct OnnxRuntime {
    pub env: Environment,
    pub library: PathBuf,
}

static RUNTIME: OnceLock<Result<OnnxRuntime, RuntimeError>> = OnceLock::new();

/// Loads ONNX Runtime once per process. `explicit` is `--ort-lib`.
pub fn load(explicit: Option<&Path>) -> Result<&'static OnnxRuntime, RuntimeError> {
    let wanted = find_library(explicit);
    let loaded = RUNTIME.get_or_init(|| {
        let path = wanted.clone()?;
        let builder = ort::init_from(&path).map_err(|e| RuntimeError::Load {
            path: path.clone(),
            reason: format!("{e:?}"),
        })?;
        let env = builder
            .with_name("nightshift")
            .with_telemetry(false)
            .build()
            .map_err(|e| RuntimeError::Load {
                path: path.clone(),
                reason: format!("{e:?}"),
            })?;
        Ok(OnnxRuntime { env, library: path })
    });
    let rt = loaded.as_ref().map_err(Clone::clone)?;
    if let (Some(_), Ok(w)) = (explicit, &wanted)
        && w != &rt.library
    {
        return Err(RuntimeError::Conflict {
            loaded: rt.library.clone(),
            wanted: w.clone(),
        });
    }
    Ok(rt)
}

/// Where the library is: `--ort-lib`, then `ORT_DYLIB_PATH`, then the wheel in `.venv` under
/// the current directory or next to the executable's project.
pub fn find_library(explicit: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let given = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from));
    if let Some(p) = given {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(RuntimeError::Missing(p))
        };
    }
    let mut roots = vec![PathBuf::from(".venv")];
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}/nightshift -> the project root's .venv
        if let Some(root) = exe.ancestors().nth(3) {
            roots.push(root.join(".venv"));
        }
    }
    for venv in roots {
        if let Some(p) = wheel_library(&venv) {
            return Ok(p);
        }
    }
    Err(RuntimeError::NotFound)
}

/// `VENV/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*`
fn wheel_library(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    for py in lib.flatten() {
        let capi = py.path().join("site-packages/onnxruntime/capi");
        let Ok(entries) = std::fs::read_dir(&capi) else {
            continue;
        };
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libonnxruntime.so"))
            })
            .collect();
        // Prefer the versioned file (the wheel ships only that one).
        found.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
        if let Some(p) = found.into_iter().next() {
            return std::fs::canonicalize(&p).ok().or(Some(p));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_explicit_library_names_the_path() {
        let e = find_library(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err();
        assert!(
            e.to_string().contains("/nonexistent/libonnxruntime.so"),
            "{e}"
        );
    }

    #[test]
    fn finds_the_wheel_layout() {
        let dir = tempfile::tempdir().unwrap();
        let capi = dir
            .path()
            .join("lib/python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        std::fs::write(capi.join("libonnxruntime.so.1.31.1"), b"").unwrap();
        let found = wheel_library(dir.path()).unwrap();
        assert!(found.ends_with("libonnxruntime.so.1.31.1"));
        assert!(wheel_library(&dir.path().join("nope")).is_none());
    }
}

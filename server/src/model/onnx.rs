//! ONNX Runtime, loaded at run time from the `onnxruntime` wheel's
//! libonnxruntime, and the engine that runs one registry model.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::tensor::TensorElementType;
use ort::value::{Tensor, ValueType};

use super::{Metadata, ModelError};

static RUNTIME: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Where libonnxruntime is: `explicit`, else `ORT_DYLIB_PATH`, else the
/// `.venv` of this directory or one of its ancestors (as `make setup` makes it).
pub fn locate_runtime(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let cwd = std::env::current_dir().map_err(|e| format!("current dir: {e}"))?;
    for dir in cwd.ancestors() {
        if let Some(lib) = find_in_venv(&dir.join(".venv")) {
            return Ok(lib);
        }
    }
    Err("libonnxruntime not found: set ORT_DYLIB_PATH (bash infra/python.sh ort-path) or run make setup".into())
}

fn find_in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .flatten()
        .map(|python| python.path().join("site-packages/onnxruntime/capi"))
        .filter_map(|capi| std::fs::read_dir(capi).ok())
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
        .collect();
    found.sort();
    found.into_iter().next()
}

/// Loads ONNX Runtime once per process; later calls return the first outcome.
pub fn init_runtime(explicit: Option<&Path>) -> Result<PathBuf, ModelError> {
    RUNTIME
        .get_or_init(|| {
            let path = locate_runtime(explicit)?;
            if !path.is_file() {
                return Err(format!("libonnxruntime not found at {}", path.display()));
            }
            let shown = path.display().to_string();
            // ort panics when the library cannot be loaded or is too old; make that an error.
            let outcome = std::panic::catch_unwind(|| {
                ort::init_from(shown.clone())
                    .with_name("sfs-serve")
                    .commit()
            });
            match outcome {
                Ok(Ok(_)) => {
                    tracing::info!(path = %shown, "loaded onnx runtime");
                    Ok(path)
                }
                Ok(Err(e)) => Err(format!("initialising {shown}: {e}")),
                Err(_) => Err(format!(
                    "loading {shown} failed (missing or incompatible with ort {})",
                    ort::MINOR_VERSION
                )),
            }
        })
        .clone()
        .map_err(ModelError::Runtime)
}

/// A pool of sessions of one model (`Session::run` needs `&mut`).
pub struct OnnxEngine {
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
    input: String,
    output: String,
    positive: usize,
    width: usize,
}

fn invalid(path: &Path, problem: impl Into<String>) -> ModelError {
    ModelError::Invalid {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

impl OnnxEngine {
    /// Loads `model.onnx` and checks it against its metadata.
    pub fn load(path: &Path, meta: &Metadata, sessions: usize) -> Result<OnnxEngine, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| invalid(path, e.to_string()))?;
        let mut pool = Vec::with_capacity(sessions.max(1));
        for _ in 0..sessions.max(1) {
            let session = Session::builder()
                .and_then(|b| b.with_optimization_level(GraphOptimizationLevel::Level3))
                .and_then(|b| b.with_intra_threads(1))
                .and_then(|b| b.with_inter_threads(1))
                .and_then(|b| b.commit_from_memory(&bytes))
                .map_err(|e| invalid(path, e.to_string()))?;
            pool.push(Mutex::new(session));
        }
        let width = meta.features.len();
        let first = pool[0].lock().expect("fresh mutex");
        check_shape(path, &first, meta)?;
        drop(first);
        let engine = OnnxEngine {
            sessions: pool,
            next: AtomicUsize::new(0),
            input: meta.input_name.clone(),
            output: meta.output_name.clone(),
            positive: meta.positive_class_index,
            width,
        };
        // A dry run proves the graph runs and yields a probability.
        let s = engine.score(&vec![0.0; width])?;
        if !(0.0..=1.0).contains(&s) {
            return Err(invalid(path, format!("dry run scored {s}, outside [0, 1]")));
        }
        Ok(engine)
    }

    /// Scores one vector on whichever session is free.
    pub fn score(&self, x: &[f32]) -> Result<f32, ModelError> {
        if x.len() != self.width {
            return Err(ModelError::Runtime(format!(
                "got {} features, the model takes {}",
                x.len(),
                self.width
            )));
        }
        let rt = |e: ort::Error| ModelError::Runtime(e.to_string());
        let tensor = Tensor::from_array(([1usize, x.len()], x.to_vec())).map_err(rt)?;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.sessions.len();
        let mut guard = (0..n)
            .find_map(|i| self.sessions[(start + i) % n].try_lock().ok())
            .unwrap_or_else(|| {
                self.sessions[start % n]
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
            });
        let outputs = guard
            .run(ort::inputs![self.input.as_str() => tensor])
            .map_err(rt)?;
        let (_, data) = outputs[self.output.as_str()]
            .try_extract_tensor::<f32>()
            .map_err(rt)?;
        data.get(self.positive)
            .copied()
            .ok_or_else(|| ModelError::Runtime(format!("output has no column {}", self.positive)))
    }
}

fn check_shape(path: &Path, session: &Session, meta: &Metadata) -> Result<(), ModelError> {
    let [input] = session.inputs.as_slice() else {
        return Err(invalid(
            path,
            format!("expected one input, found {}", session.inputs.len()),
        ));
    };
    if input.name != meta.input_name {
        return Err(invalid(
            path,
            format!(
                "input is {:?}, metadata says {:?}",
                input.name, meta.input_name
            ),
        ));
    }
    match &input.input_type {
        ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape,
            ..
        } if shape.len() == 2
            && shape[1] == meta.features.len() as i64
            && (shape[0] == -1 || shape[0] == 1) => {}
        other => {
            return Err(invalid(
                path,
                format!(
                    "input {:?} is {other:?}, metadata wants float32 [batch, {}]",
                    input.name,
                    meta.features.len()
                ),
            ))
        }
    }
    let Some(output) = session.outputs.iter().find(|o| o.name == meta.output_name) else {
        return Err(invalid(
            path,
            format!("no output named {:?}", meta.output_name),
        ));
    };
    match &output.output_type {
        ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape,
            ..
        } if shape.len() == 2
            && (shape[1] == -1 || shape[1] > meta.positive_class_index as i64) =>
        {
            Ok(())
        }
        other => Err(invalid(
            path,
            format!(
                "output {:?} is {other:?}, metadata wants float32 [batch, > {}]",
                output.name, meta.positive_class_index
            ),
        )),
    }
}

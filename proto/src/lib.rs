//! Plain data shared by every nightshift role: the job spec, the wire types of the HTTP API and
//! the lease protocol, and error codes. No I/O, no runtime: everything here is serde data.

mod deadline;
mod error_code;
pub mod fleet;
pub mod layout;
mod schemas;
mod spec;
pub mod spec_check;
mod state;
mod text;
pub mod wire;

pub use deadline::Deadline;
pub use error_code::{ErrorBody, ErrorCode};
pub use fleet::{CapacityType, FleetView, InstanceInfo, JobDemand, drain_path};
pub use spec::{
    AUTO_GPU_ROWS, BatchSize, BatchSpec, DEFAULT_BATCH_ROWS, Device, ErrorSpec, FloatType,
    InputSpec, JobSpec, ModelSpec, NotifySpec, OutputColumn, OutputSpec, OutputTarget, Pool,
    RetrySpec, ShardSpec, TextField, TextSpec,
};
pub use spec_check::SpecError;
pub use state::{CatchUp, FailureClass, JobState, LeaseState, NotifyState, ShardState};
pub use text::{TextError, check_free_text, check_text, excerpt};

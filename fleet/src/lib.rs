//! The fleet scaler (`nightshift scaler`): it reads the queue, the workers and the scheduled
//! runs from a coordinator (`GET /v1/fleet`), decides how many workers the work needs
//! (`decide.rs`, a pure function), launches instances from a provider (EC2 spot with an
//! on-demand fallback, `ec2.rs`), asks surplus workers to drain and terminates their instances
//! once they hold no lease.

mod decide;
#[cfg(feature = "ec2")]
mod ec2;
mod metrics;
mod provider;
mod scaler;

pub use decide::{Decision, Observation, Policy, Reason, Removal, Scaler};
#[cfg(feature = "ec2")]
pub use ec2::{Ec2Config, Ec2Provider, LaunchTemplate};
pub use metrics::ScalerMetrics;
pub use provider::{
    DryRun, Instance, InstanceState, LaunchRequest, Launched, Provider, ProviderError,
};
pub use scaler::{LoopConfig, run};

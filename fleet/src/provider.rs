//! Where capacity comes from: a provider launches, lists and terminates the fleet's instances.
//! EC2 is one (`ec2.rs`, behind the `ec2` feature); the scaler's loop and its decisions know
//! only this trait.

use std::future::Future;

use nightshift_proto::CapacityType;

/// The lifecycle states that matter to the scaler (EC2's `pending` and `running`; instances
/// shutting down or terminated are not listed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    Pending,
    Running,
}

/// One live instance of the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub instance_type: String,
    pub capacity_type: CapacityType,
    pub state: InstanceState,
    /// When it was launched (ms since the epoch).
    pub launched_ms: i64,
}

/// What the scaler asks for: `count` more workers, for these jobs (named in the instances'
/// tags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchRequest {
    pub count: u32,
    pub job_ids: Vec<i64>,
}

/// What a launch got: the instances started (spot and on-demand), and whether spot capacity
/// was refused (insufficient capacity) so that on-demand filled in.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Launched {
    pub instances: Vec<Instance>,
    /// Spot was asked for and refused for lack of capacity.
    pub spot_refused: bool,
    /// The provider's error codes for the capacity it could not get (e.g.
    /// `InsufficientInstanceCapacity`), one per refusal.
    pub errors: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider's API answered with an error (its code and message).
    #[error("{operation} failed: {code}: {message}")]
    Api {
        operation: &'static str,
        code: String,
        message: String,
    },
    /// The provider could not be reached or its answer could not be read.
    #[error("{operation} failed: {source}")]
    Transport {
        operation: &'static str,
        #[source]
        source: anyhow::Error,
    },
    /// The provider's configuration is wrong (e.g. a missing launch template).
    #[error("{0}")]
    Config(String),
}

/// A source of worker instances.
pub trait Provider: Send + Sync {
    /// Launches `req.count` instances: spot first, on demand for what spot refused.
    fn launch(
        &self,
        req: &LaunchRequest,
    ) -> impl Future<Output = Result<Launched, ProviderError>> + Send;
    /// The fleet's instances that are pending or running.
    fn list(&self) -> impl Future<Output = Result<Vec<Instance>, ProviderError>> + Send;
    /// Terminates these instances (ids the fleet owns).
    fn terminate(&self, ids: &[String]) -> impl Future<Output = Result<(), ProviderError>> + Send;
}

/// A provider that owns nothing and launches nothing (`--provider none`): the scaler only
/// decides, logs and exports what it would do, e.g. beside an HPA or KEDA that act.
#[derive(Debug, Clone, Copy, Default)]
pub struct DryRun;

impl Provider for DryRun {
    async fn launch(&self, req: &LaunchRequest) -> Result<Launched, ProviderError> {
        tracing::info!(count = req.count, "dry run: would launch");
        Ok(Launched::default())
    }

    async fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        Ok(Vec::new())
    }

    async fn terminate(&self, ids: &[String]) -> Result<(), ProviderError> {
        tracing::info!(?ids, "dry run: would terminate");
        Ok(())
    }
}

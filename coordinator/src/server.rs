//! The coordinator role: config, build, run. Serves the API and runs the background loops
//! until shutdown; binding is separate so tests and local mode can use port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use nightshift_storage::Stores;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::allow_list::AllowList;
use crate::api::{ApiState, Tokens, router};
use crate::cost::PriceTable;
use crate::metrics::Metrics;
use crate::notifier::CallbackConfig;
use crate::service::Service;
use nightshift_metastore::speculation::SpeculationPolicy;
use nightshift_metastore::{DynMetastore, LeaseTiming};

#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub submit_tokens: Vec<String>,
    pub worker_tokens: Vec<String>,
    pub allow: AllowList,
    pub timing: LeaseTiming,
    /// How often the settle/finalize loop looks for finished jobs.
    pub finalize_every: Duration,
    /// How long one replica holds a job it finalizes before another may take over.
    pub finalize_claim: Duration,
    /// Names this replica in finalizer claims.
    pub replica_id: String,
    /// Completion callbacks: the default URL, the signing secret, backoff and deadline.
    pub callbacks: CallbackConfig,
    /// Jobs that may run at once; more wait as `queued` and start in priority, then
    /// submission order. `None`: no limit.
    pub max_running_jobs: Option<u32>,
    /// Dollars per hour by instance type, for jobs' costs.
    pub prices: PriceTable,
    /// When stragglers get speculative copies (`None`: never).
    pub speculation: Option<SpeculationPolicy>,
}

impl CoordinatorConfig {
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            submit_tokens: Vec::new(),
            worker_tokens: Vec::new(),
            allow: AllowList::default(),
            timing: LeaseTiming {
                ttl_ms: 30_000,
                backoff_base_ms: 1_000,
                backoff_max_ms: 60_000,
            },
            finalize_every: Duration::from_secs(1),
            finalize_claim: Duration::from_secs(15),
            replica_id: format!(
                "coordinator-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            callbacks: CallbackConfig::default(),
            max_running_jobs: None,
            prices: PriceTable::default(),
            speculation: Some(SpeculationPolicy::default()),
        }
    }
}

pub struct Coordinator {
    config: CoordinatorConfig,
    service: Service,
}

/// The reaper runs this many times per lease TTL, within these bounds.
const REAPS_PER_TTL: i64 = 4;
const MIN_REAP_EVERY_MS: i64 = 50;
const MAX_REAP_EVERY_MS: i64 = 5_000;
/// After shutdown, background tasks get this long to stop.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

impl Coordinator {
    pub fn new(config: CoordinatorConfig, store: DynMetastore, stores: Arc<Stores>) -> Self {
        let mut service = Service::new(
            store,
            stores,
            config.allow.clone(),
            config.timing,
            Arc::new(Metrics::default()),
        )
        .with_callbacks(&config.callbacks);
        service.max_running_jobs = config.max_running_jobs;
        service.speculation = config.speculation;
        service.prices = Arc::new(config.prices.clone());
        Self { config, service }
    }

    pub fn service(&self) -> &Service {
        &self.service
    }

    pub async fn bind(&self) -> std::io::Result<TcpListener> {
        TcpListener::bind(self.config.listen).await
    }

    /// Serves on `listener` and runs the loops until `shutdown`; then stops within a deadline.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> std::io::Result<()> {
        let tracker = TaskTracker::new();
        let reap_every = Duration::from_millis(
            (self.config.timing.ttl_ms / REAPS_PER_TTL).clamp(MIN_REAP_EVERY_MS, MAX_REAP_EVERY_MS)
                as u64,
        );
        tracker.spawn(crate::loops::reaper(
            self.service.clone(),
            reap_every,
            shutdown.clone(),
        ));
        tracker.spawn(crate::planning::planning_loop(
            self.service.clone(),
            self.config.replica_id.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(crate::loops::finalizer(
            self.service.clone(),
            self.config.replica_id.clone(),
            self.config.finalize_every,
            self.config.finalize_claim,
            shutdown.clone(),
        ));
        tracker.spawn(crate::garbage::collector(
            self.service.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(crate::schedule::scheduler(
            self.service.clone(),
            shutdown.clone(),
        ));
        tracker.spawn(crate::notifier::notifier(
            self.service.clone(),
            self.config.callbacks.clone(),
            shutdown.clone(),
        ));
        tracker.close();
        let app = router(ApiState {
            service: Arc::new(self.service.clone().coalescing(shutdown.clone(), &tracker)),
            tokens: Arc::new(Tokens {
                submit: self.config.submit_tokens.clone(),
                worker: self.config.worker_tokens.clone(),
            }),
        });
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, replica = %self.config.replica_id, "coordinator listening");
        }
        let stop = shutdown.clone();
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
        shutdown.cancel();
        if tokio::time::timeout(STOP_DEADLINE, tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                tasks = tracker.len(),
                deadline_s = STOP_DEADLINE.as_secs(),
                "background tasks still running past the stop deadline; leaving them"
            );
        }
        served
    }
}

//! The coordinator: the only client of the database. It validates and plans submitted jobs,
//! serves the HTTP API for people and workers, and runs the background loops (reaper, settler,
//! finalizer, completion callbacks, schedules). Several replicas may run against one database.

/// A point where crash tests stop the process, for real (the only way to land a crash exactly
/// between two commit steps): with the `failpoints` feature and `FAILPOINTS=NAME=return`
/// (`failpoints_from_env`); nothing at all in other builds.
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| {
            eprintln!("crash point {}: aborting", $name);
            std::process::abort()
        })
    };
}

mod allow_list;
mod api;
mod api_error;
mod coalescer;
pub mod cost;
mod dashboard;
pub mod finalizer;
mod fleet;
mod fleet_api;
mod garbage;
mod insight;
mod job_check;
mod job_view;
mod lease_check;
mod loops;
mod metrics;
mod notifier;
mod openapi;
mod ownership;
mod part_check;
mod planner;
mod planning;
mod schedule;
mod schedule_api;
mod server;
pub mod service;
mod worker_api;

pub use allow_list::AllowList;
pub use cost::PriceTable;
pub use garbage::collect_pending;
pub use notifier::{CallbackConfig, JOB_HEADER, SIGNATURE_HEADER, signature};
pub use openapi::spec as openapi_spec;
pub use ownership::{remove_job_files, unpublish};
pub use server::{Coordinator, CoordinatorConfig};
pub use service::Service;

/// Turns on the failpoints named in `FAILPOINTS` (e.g. `finalize-before-manifest=return`), for
/// the process's life. Only builds with the `failpoints` feature (the tests') have any; in
/// others this does nothing.
pub fn failpoints_from_env() {
    #[cfg(feature = "failpoints")]
    std::mem::forget(fail::FailScenario::setup());
}

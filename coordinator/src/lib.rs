//! The coordinator: the only client of the database. It validates and plans submitted jobs,
//! serves the HTTP API for people and workers, and runs the background loops (reaper, settler,
//! finalizer). Several replicas may run against one database.

pub mod store;

//! Test harness: starts real servers (PostgreSQL, the local S3 server) on free 127.0.0.1 ports and stops them.

pub mod postgres;

pub use postgres::PgServer;
pub mod fixtures;
pub mod process;
pub mod python;
pub mod verify;

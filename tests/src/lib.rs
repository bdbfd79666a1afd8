//! Test harness: starts real servers (PostgreSQL, the local S3 server) on free 127.0.0.1 ports and stops them.

pub mod postgres;

pub use postgres::PgServer;
pub mod api_server;
pub mod cluster;
pub mod ec2_proxy;
pub mod fault_proxy;
pub mod fixtures;
pub mod imds;
pub mod load;
pub mod parts;
pub mod process;
pub mod python;
pub mod s3;
pub mod verify;

pub use fault_proxy::{Fault, FaultPlan, FaultProxy};
pub use s3::S3Server;

//! tern's API surface: the Firecracker-dialect JSON models (shared by `--config-file` and, later,
//! the REST API on the Unix socket) and their conversion into `vmm::VmResources`.

#![deny(missing_docs)]

pub mod config;
pub mod models;
pub mod routes;
pub mod server;

pub use config::{ConfigFileError, parse_config};

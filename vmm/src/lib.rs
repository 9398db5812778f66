//! Building and running a VM: the hypervisor backends, the validated VM description, the vCPU
//! threads and the event loop.

#![deny(missing_docs)]

pub mod console;
pub mod controller;
pub mod device_manager;
pub mod exit;
pub mod hypervisor;
pub mod logger;
pub mod platform;
pub mod resources;
pub mod sink;
pub mod snapshot;
pub mod snapshot_file;
pub mod vcpu;
pub mod vcpu_dump;
pub mod vm;

pub use resources::{ConfigError, VmResources};

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] resources::ConfigError),
    /// The hypervisor refused something.
    #[error(transparent)]
    Hypervisor(#[from] hypervisor::HypervisorError),
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The kernel, initrd or command line could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::Error),
    /// Platform tables could not be written.
    #[error(transparent)]
    Arch(#[from] arch::Error),
    /// A device could not be set up.
    #[error("device setup: {0}")]
    Device(String),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// A vCPU stopped on something tern cannot handle.
    #[error("vCPU {index} stopped: {reason}")]
    Vcpu {
        /// Which vCPU.
        index: u8,
        /// What happened.
        reason: String,
    },
    /// The vCPUs could not be paused.
    #[error("pause: {0}")]
    Pause(String),
    /// A snapshot could not be restored.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// An OS call failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

//! How devices end the VM.

/// Why the guest asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// A reset (i8042 `0xfe`, ACPI reset register, triple fault).
    Reset,
    /// ACPI S5 soft-off.
    PowerOff,
}

/// Implemented by the VMM: asks it to stop the VM.
pub trait ExitRequester: Send + Sync {
    /// Asks the VMM to stop the VM for `reason`.
    fn request_exit(&self, reason: GuestExit);
}

/// Test double: records the requests.
#[cfg(any(test, feature = "test-utils"))]
#[derive(Default)]
pub struct RecordingExit(pub std::sync::Mutex<Vec<GuestExit>>);

#[cfg(any(test, feature = "test-utils"))]
impl ExitRequester for RecordingExit {
    fn request_exit(&self, reason: GuestExit) {
        self.0.lock().unwrap().push(reason);
    }
}

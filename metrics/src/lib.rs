//! tern's metrics: process-wide counters that any crate bumps, written as Firecracker-shaped
//! JSON lines (each counter as the change since the previous line, as Firecracker does) and as
//! Prometheus text (totals).

#![deny(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};

/// A counter: a running total, and the total at the last JSON flush.
#[derive(Default)]
pub struct Counter {
    total: AtomicU64,
    flushed: AtomicU64,
}

impl Counter {
    /// A zero counter.
    pub const fn new() -> Self {
        Self {
            total: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
        }
    }

    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    /// The running total.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// The change since the previous call (Firecracker's per-flush semantics).
    fn take_delta(&self) -> u64 {
        let total = self.total();
        total.saturating_sub(self.flushed.swap(total, Ordering::Relaxed))
    }
}

/// A value that is set rather than counted (latest wins).
#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// A zero gauge.
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    /// Sets the value.
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

trait Exposed {
    fn json_value(&self) -> u64;
    fn prometheus(&self, out: &mut String, group: &str, name: &str);
}

impl Exposed for Counter {
    fn json_value(&self) -> u64 {
        self.take_delta()
    }
    fn prometheus(&self, out: &mut String, group: &str, name: &str) {
        out.push_str(&format!(
            "# TYPE tern_{group}_{name}_total counter\ntern_{group}_{name}_total {}\n",
            self.total()
        ));
    }
}

impl Exposed for Gauge {
    fn json_value(&self) -> u64 {
        self.get()
    }
    fn prometheus(&self, out: &mut String, group: &str, name: &str) {
        out.push_str(&format!(
            "# TYPE tern_{group}_{name} gauge\ntern_{group}_{name} {}\n",
            self.get()
        ));
    }
}

fn utc_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

macro_rules! groups {
    ($( $group:ident : $gty:ident { $( $field:ident : $kind:ident ),* $(,)? } )*) => {
        $(
            /// A group of metrics: one JSON object, one Prometheus name prefix.
            #[derive(Default)]
            pub struct $gty {
                $( #[doc = stringify!($field)] pub $field: $kind, )*
            }
            impl $gty {
                const fn new() -> Self {
                    Self { $( $field: $kind::new(), )* }
                }
            }
        )*

        /// Every metric tern keeps.
        pub struct Metrics {
            $( #[doc = stringify!($group)] pub $group: $gty, )*
        }

        impl Metrics {
            /// All zero.
            pub const fn new() -> Self {
                Self { $( $group: $gty::new(), )* }
            }

            /// One JSON line in Firecracker's shape: counters as changes since the previous
            /// line, gauges as values, plus `utc_timestamp_ms`.
            pub fn json_line(&self) -> String {
                let mut root = serde_json::Map::new();
                root.insert("utc_timestamp_ms".into(), utc_ms().into());
                $(
                    let mut g = serde_json::Map::new();
                    $( g.insert(stringify!($field).into(), self.$group.$field.json_value().into()); )*
                    root.insert(stringify!($group).into(), g.into());
                )*
                serde_json::Value::Object(root).to_string()
            }

            /// Prometheus text exposition: `tern_<group>_<name>` with totals.
            pub fn prometheus(&self) -> String {
                let mut out = String::new();
                $( $(
                    self.$group.$field.prometheus(&mut out, stringify!($group), stringify!($field));
                )* )*
                out
            }
        }
    };
}

groups! {
    api_server: ApiServerMetrics {
        process_startup_time_us: Gauge,
        process_startup_time_cpu_us: Gauge,
    }
    get_api_requests: GetApiRequests {
        instance_info_count: Counter,
        machine_cfg_count: Counter,
        vm_config_count: Counter,
        version_count: Counter,
    }
    put_api_requests: PutApiRequests {
        actions_count: Counter,
        actions_fails: Counter,
        boot_source_count: Counter,
        boot_source_fails: Counter,
        logger_count: Counter,
        logger_fails: Counter,
        machine_cfg_count: Counter,
        machine_cfg_fails: Counter,
        metrics_count: Counter,
        metrics_fails: Counter,
        serial_count: Counter,
        serial_fails: Counter,
    }
    patch_api_requests: PatchApiRequests {
        machine_cfg_count: Counter,
        machine_cfg_fails: Counter,
        vm_count: Counter,
        vm_fails: Counter,
    }
    vcpu: VcpuMetrics {
        exit_io_in: Counter,
        exit_io_out: Counter,
        exit_mmio_read: Counter,
        exit_mmio_write: Counter,
        failures: Counter,
    }
    uart: UartMetrics {
        missed_write_count: Counter,
        write_count: Counter,
        read_count: Counter,
    }
    latencies_us: Latencies {
        pause_vm: Gauge,
        resume_vm: Gauge,
        vm_start: Gauge,
        full_create_snapshot: Gauge,
        diff_create_snapshot: Gauge,
        load_snapshot: Gauge,
    }
    vmm: VmmMetrics {
        panic_count: Counter,
    }
    virtio: VirtioMetrics {
        recovered_interrupts: Counter,
        recovered_notifications: Counter,
    }
    logger: LoggerMetrics {
        missed_log_count: Counter,
        missed_metrics_count: Counter,
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's metrics.
pub static METRICS: Metrics = Metrics::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_report_changes_since_the_previous_line() {
        let m = Metrics::new();
        m.vcpu.exit_io_out.add(5);
        m.latencies_us.pause_vm.set(42);
        let first: serde_json::Value = serde_json::from_str(&m.json_line()).unwrap();
        assert_eq!(first["vcpu"]["exit_io_out"], 5);
        assert_eq!(first["latencies_us"]["pause_vm"], 42);
        assert!(first["utc_timestamp_ms"].as_u64().unwrap() > 0);
        m.vcpu.exit_io_out.inc();
        let second: serde_json::Value = serde_json::from_str(&m.json_line()).unwrap();
        assert_eq!(second["vcpu"]["exit_io_out"], 1);
        assert_eq!(second["latencies_us"]["pause_vm"], 42);
    }

    #[test]
    fn prometheus_reports_totals() {
        let m = Metrics::new();
        m.uart.write_count.add(3);
        let _ = m.json_line();
        m.uart.write_count.add(2);
        let text = m.prometheus();
        assert!(
            text.contains(
                "# TYPE tern_uart_write_count_total counter\ntern_uart_write_count_total 5\n"
            ),
            "{text}"
        );
        assert!(text.contains("tern_latencies_us_pause_vm 0\n"));
    }
}

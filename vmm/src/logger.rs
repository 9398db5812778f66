//! tern's logger: Firecracker-style options (level, path, show_level, show_log_origin).
//! Lines go through a [`Sink`]: no thread (a vCPU included) ever waits for the log's reader; a
//! line that does not fit is dropped and counted in `logger.missed_log_count`.

use std::sync::{Mutex, OnceLock};

use crate::sink::Sink;

use log::{Level, LevelFilter, Log, Metadata, Record};

/// Logger settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggerConfig {
    /// Most verbose level logged.
    pub level: LevelFilter,
    /// Prefix lines with the level.
    pub show_level: bool,
    /// Prefix lines with file:line.
    pub show_log_origin: bool,
    /// Instance id shown on every line.
    pub id: String,
}

impl Default for LoggerConfig {
    fn default() -> Self {
        Self {
            level: LevelFilter::Info,
            show_level: false,
            show_log_origin: false,
            id: "anonymous-instance".into(),
        }
    }
}

/// Parses a Firecracker log level ("Error", "Warning", "Info", "Debug", "Trace", "Off"),
/// case-insensitively.
pub fn parse_level(s: &str) -> Option<LevelFilter> {
    Some(match s.to_ascii_lowercase().as_str() {
        "off" => LevelFilter::Off,
        "error" => LevelFilter::Error,
        "warn" | "warning" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" => LevelFilter::Trace,
        _ => return None,
    })
}

struct TernLogger {
    config: Mutex<LoggerConfig>,
    sink: Mutex<Sink>,
}

static LOGGER: OnceLock<TernLogger> = OnceLock::new();

fn level_name(l: Level) -> &'static str {
    match l {
        Level::Error => "ERROR",
        Level::Warn => "WARN",
        Level::Info => "INFO",
        Level::Debug => "DEBUG",
        Level::Trace => "TRACE",
    }
}

/// One formatted log line (without the newline).
pub fn format_line(cfg: &LoggerConfig, record: &Record<'_>, unix: std::time::Duration) -> String {
    let thread = std::thread::current();
    let mut line = format!(
        "{}.{:06} [{}:{}]",
        unix.as_secs(),
        unix.subsec_micros(),
        cfg.id,
        thread.name().unwrap_or("?")
    );
    if cfg.show_level {
        line.push_str(&format!(":{}", level_name(record.level())));
    }
    if cfg.show_log_origin {
        line.push_str(&format!(
            ":{}:{}",
            record.file().unwrap_or("?"),
            record.line().unwrap_or(0)
        ));
    }
    line.push(' ');
    line.push_str(&record.args().to_string());
    line
}

impl Log for TernLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level()
            <= self
                .config
                .lock()
                .map(|c| c.level)
                .unwrap_or(LevelFilter::Info)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut line = match self.config.lock() {
            Ok(c) => format_line(&c, record, unix),
            Err(_) => return,
        };
        line.push('\n');
        let sink = match self.sink.lock() {
            Ok(s) => s.clone(),
            Err(_) => return,
        };
        if !sink.push(line.as_bytes()) {
            metrics::METRICS.logger.missed_log_count.inc();
        }
    }

    /// Waits, at most [`crate::sink::FLUSH_WAIT`], for the queued lines to be written.
    fn flush(&self) {
        let sink = match self.sink.lock() {
            Ok(s) => s.clone(),
            Err(_) => return,
        };
        sink.drain(crate::sink::FLUSH_WAIT);
    }
}

/// Where log lines go by default: stderr, through a sink of its own.
pub fn stderr_sink() -> std::io::Result<Sink> {
    Sink::new(Box::new(std::io::stderr()), "log-stderr")
}

/// Installs (first call) or reconfigures the logger. `sink` of `None` means stderr. Fails only
/// when no thread can be started for the sink.
pub fn init(config: LoggerConfig, sink: Option<Sink>) -> std::io::Result<()> {
    let sink = match sink {
        Some(s) => s,
        None => stderr_sink()?,
    };
    let level = config.level;
    match LOGGER.get() {
        Some(l) => {
            if let Ok(mut c) = l.config.lock() {
                *c = config;
            }
            if let Ok(mut s) = l.sink.lock() {
                *s = sink;
            }
        }
        None => {
            let l = LOGGER.get_or_init(|| TernLogger {
                config: Mutex::new(config),
                sink: Mutex::new(sink),
            });
            let _ = log::set_logger(l);
        }
    }
    log::set_max_level(level);
    Ok(())
}

/// Writes out the queued log lines (bounded wait); called before tern exits.
pub fn flush() {
    log::logger().flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_like_firecracker() {
        assert_eq!(parse_level("Warning"), Some(LevelFilter::Warn));
        assert_eq!(parse_level("DEBUG"), Some(LevelFilter::Debug));
        assert_eq!(parse_level("off"), Some(LevelFilter::Off));
        assert_eq!(parse_level("loud"), None);
    }

    #[test]
    fn line_shows_what_is_asked() {
        let cfg = LoggerConfig {
            show_level: true,
            show_log_origin: true,
            id: "vm1".into(),
            ..Default::default()
        };
        let args = format_args!("hello");
        let rec = Record::builder()
            .args(args)
            .level(Level::Warn)
            .file(Some("x.rs"))
            .line(Some(7))
            .build();
        let line = format_line(&cfg, &rec, std::time::Duration::from_micros(1_500_000));
        assert!(line.starts_with("1.500000 [vm1:"), "{line}");
        assert!(line.ends_with(":WARN:x.rs:7 hello"), "{line}");
    }
}

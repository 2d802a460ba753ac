//! The daemon's log filter, changed while it runs.
//!
//! Owns the tracing subscriber's set-up ([`init`]: the `EnvFilter` behind a
//! reload handle, then the text or JSON formatter) and the filter in force.
//! [`set`] replaces the filter — `POST /log_level` on the admin port, which
//! `nodemesh log-level` sends — and [`current`] reads it (`GET /log_level`).
//! A filter that does not parse is refused whole with the parser's reason;
//! the one in force stays.

use std::sync::{Mutex, OnceLock, PoisonError};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

use crate::config::LogFormat;

/// Longest filter accepted at run time.
pub const MAX_FILTER_LEN: usize = 1024;

/// Why a new filter was not applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogFilterError {
    /// It does not parse.
    #[error(
        "log filter {filter:?} is not valid: {reason}; use a level (error, warn, info, debug, \
         trace) or a filter such as info,nodemesh::inbound=debug"
    )]
    Invalid {
        /// The filter given.
        filter: String,
        /// The parser's reason.
        reason: String,
    },
    /// Longer than [`MAX_FILTER_LEN`].
    #[error("log filter of {len} bytes is longer than {MAX_FILTER_LEN}")]
    TooLong {
        /// Its length.
        len: usize,
    },
    /// No subscriber with a reloadable filter runs in this process (only
    /// `nodemesh run` installs one).
    #[error("this process has no reloadable log filter")]
    NotInstalled,
    /// The subscriber refused the new filter.
    #[error("the log filter could not be replaced: {0}")]
    Reload(String),
}

struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Installs the process's subscriber: `filter` (falling back to `info` if it
/// does not parse; `config` has validated it), reloadable, then lines in
/// `format` on stderr (colours only on a terminal).
pub fn init(filter: &str, format: LogFormat) {
    let (env, text) = match EnvFilter::try_new(filter) {
        Ok(f) => (f, filter.to_owned()),
        Err(_) => (EnvFilter::new("info"), "info".to_owned()),
    };
    let (filter_layer, handle) = reload::Layer::new(env);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = match format {
        LogFormat::Json => fmt.json().boxed(),
        LogFormat::Text => fmt.boxed(),
    };
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(fmt)
        .init();
    let _ = CONTROL.set(Control {
        handle,
        current: Mutex::new(text),
    });
}

/// Parses `filter` as the daemon would apply it.
pub fn parse(filter: &str) -> Result<EnvFilter, LogFilterError> {
    if filter.len() > MAX_FILTER_LEN {
        return Err(LogFilterError::TooLong { len: filter.len() });
    }
    EnvFilter::try_new(filter).map_err(|e| LogFilterError::Invalid {
        filter: filter.to_owned(),
        reason: e.to_string(),
    })
}

/// Replaces the filter in force with `filter`; returns the previous one.
pub fn set(filter: &str) -> Result<String, LogFilterError> {
    let filter = filter.trim();
    let parsed = parse(filter)?;
    let control = CONTROL.get().ok_or(LogFilterError::NotInstalled)?;
    control
        .handle
        .reload(parsed)
        .map_err(|e| LogFilterError::Reload(e.to_string()))?;
    let mut current = control
        .current
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let previous = std::mem::replace(&mut *current, filter.to_owned());
    tracing::warn!(filter, previous = %previous, "log filter changed");
    Ok(previous)
}

/// The filter in force (`None` outside `nodemesh run`).
pub fn current() -> Option<String> {
    CONTROL.get().map(|c| {
        c.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_that_do_not_parse_are_refused_with_the_reason() {
        assert!(parse("info,nodemesh::inbound=debug").is_ok());
        match parse("info,=x=") {
            Err(LogFilterError::Invalid { filter, reason }) => {
                assert_eq!(filter, "info,=x=");
                assert!(!reason.is_empty());
            }
            other => panic!("expected Invalid, got {other:?}"),
        }
        let long = "a".repeat(MAX_FILTER_LEN + 1);
        assert_eq!(
            parse(&long).map(|_| ()),
            Err(LogFilterError::TooLong {
                len: MAX_FILTER_LEN + 1
            })
        );
        let msg = parse("info,=x=")
            .map(|_| ())
            .expect_err("invalid")
            .to_string();
        assert!(msg.contains("info,nodemesh::inbound=debug"), "{msg}");
    }

    #[test]
    fn without_an_installed_subscriber_nothing_is_set() {
        // Unit tests install no subscriber through `init`.
        assert_eq!(current(), None);
        assert_eq!(set("debug"), Err(LogFilterError::NotInstalled));
        // A bad filter is refused before anything else.
        assert!(matches!(set("=x="), Err(LogFilterError::Invalid { .. })));
    }
}

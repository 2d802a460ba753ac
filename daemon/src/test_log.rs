//! Test support: the lines a tracing subscriber writes, captured in memory,
//! for unit tests that check what is logged.

use std::sync::{Arc, Mutex};

/// Formatted log output, shared with the subscriber that writes it.
#[derive(Clone, Default)]
pub(crate) struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    /// A subscriber writing text lines (no colours) into a new capture.
    pub(crate) fn text() -> (Self, impl tracing::Subscriber + Send + Sync) {
        let out = Self::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        (out, subscriber)
    }

    /// A subscriber writing JSON lines into a new capture.
    pub(crate) fn json() -> (Self, impl tracing::Subscriber + Send + Sync) {
        let out = Self::default();
        let writer = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .json()
            .finish();
        (out, subscriber)
    }

    /// Everything written so far.
    pub(crate) fn output(&self) -> String {
        let bytes = self.0.lock().expect("lock").clone();
        String::from_utf8(bytes).expect("UTF-8 log output")
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

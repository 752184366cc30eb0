//! The process's diagnostic log (stderr, `OUTRIDER_LOG`), and changing its filter while the
//! proxy runs (`POST /logging?level=…` on the admin port), as Envoy's `/logging` and
//! Linkerd's `/proxy-log-level` do: the pod whose egress is being refused is debugged as it
//! is, not after a restart that may make the fault go away.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// The filter in force when `OUTRIDER_LOG` is unset or cannot be used.
pub const DEFAULT_FILTER: &str = "info";

/// The installed filter: its reload handle, and the text it was made from (an `EnvFilter`
/// prints its directives in an order of its own).
struct Installed {
    handle: reload::Handle<EnvFilter, Registry>,
    text: Mutex<String>,
}

static INSTALLED: OnceLock<Installed> = OnceLock::new();

/// Installs the stderr log for this process with the filter in `OUTRIDER_LOG` (default
/// `info`). An `OUTRIDER_LOG` that does not parse is not silently dropped: the default is
/// used, and a warning says why.
pub fn init() {
    // Set but empty (`OUTRIDER_LOG=` in a manifest) counts as unset, not as "errors only".
    let env = std::env::var("OUTRIDER_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let (filter, text, refused) = match env.as_deref().map(parse) {
        Some(Ok(filter)) => (filter, env.unwrap_or_default(), None),
        Some(Err(e)) => (
            EnvFilter::new(DEFAULT_FILTER),
            DEFAULT_FILTER.to_owned(),
            Some(e),
        ),
        None => (
            EnvFilter::new(DEFAULT_FILTER),
            DEFAULT_FILTER.to_owned(),
            None,
        ),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_err()
    {
        // Another subscriber is already the global one (a test harness): it stays, and
        // the filter is not ours to change.
        return;
    }
    let _ = INSTALLED.set(Installed {
        handle,
        text: Mutex::new(text),
    });
    if let Some(e) = refused {
        tracing::warn!("OUTRIDER_LOG is not a valid filter ({e}): logging at {DEFAULT_FILTER}");
    }
}

/// Why the filter could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// Not a filter: `debug`, `outrider=debug,info`, `outrider::proxy=trace` are.
    #[error("invalid log filter {0:?}: {1} (try debug, or outrider=debug,info)")]
    Invalid(String, String),
    /// This process's log was not installed by [`init`] (a library user's own subscriber).
    #[error("the log filter of this process cannot be changed: it was not installed by outrider")]
    NotInstalled,
}

/// Parses a filter strictly: a directive that does not parse is an error, where
/// `EnvFilter::new` would skip it and log less than was asked for, silently. So is a bare
/// word that is not a level: `EnvFilter` reads `verbose` as "everything from a module named
/// verbose", which turns every other line off.
fn parse(text: &str) -> Result<EnvFilter, String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains('=') && !LEVELS.iter().any(|l| directive.eq_ignore_ascii_case(l)) {
            return Err(format!(
                "{directive:?} is neither a level (trace, debug, info, warn, error, off) nor target=level"
            ));
        }
    }
    EnvFilter::builder()
        // Span field values match as plain text: a filter posted to the admin port compiles
        // no regular expression.
        .with_regex(false)
        .parse(text.trim())
        .map_err(|e| e.to_string())
}

/// The filter in force, as it was set.
pub fn current() -> Result<String, FilterError> {
    let installed = INSTALLED.get().ok_or(FilterError::NotInstalled)?;
    Ok(lock(&installed.text).clone())
}

/// Replaces the filter; returns the one it replaced. Takes effect for every log line from
/// then on, including those of callsites that were off until now.
pub fn set(text: &str) -> Result<String, FilterError> {
    let installed = INSTALLED.get().ok_or(FilterError::NotInstalled)?;
    let text = text.trim();
    if text.is_empty() {
        return Err(FilterError::Invalid(text.to_owned(), "empty".to_owned()));
    }
    let filter = parse(text).map_err(|e| FilterError::Invalid(text.to_owned(), e))?;
    // One change at a time, so that the text kept is the filter in force.
    let mut kept = lock(&installed.text);
    installed
        .handle
        .reload(filter)
        .map_err(|_| FilterError::NotInstalled)?;
    Ok(std::mem::replace(&mut *kept, text.to_owned()))
}

/// A poisoned lock still holds a valid string: a panic elsewhere must not freeze the filter.
fn lock(m: &Mutex<String>) -> std::sync::MutexGuard<'_, String> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn filters_parse_strictly() {
        for good in [
            "info",
            "debug",
            "outrider=debug,info",
            "outrider::proxy=trace,warn",
        ] {
            assert!(parse(good).is_ok(), "{good}");
        }
        // `EnvFilter::new` would drop these and log at its default, not what was asked.
        for bad in ["verbose", "outrider=loud", "a=b=c"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}

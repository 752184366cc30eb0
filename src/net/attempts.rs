//! Connecting to a name that has several allowed addresses: one attempt after another, the
//! next one started when the last fails or has had [`ATTEMPT_DELAY`] to itself, the first to
//! connect wins (RFC 8305 §5, as curl and browsers do). An address that just failed, or that
//! a later attempt beat while it was still trying, is marked down for [`DOWN_FOR`] and tried
//! after the others meanwhile (as Squid's ipcache marks bad addresses), so that one dead
//! member of a round-robin name costs one failed attempt (or one delay), not one per new
//! connection.
//!
//! A name with one address never comes here: it is dialled as before, and fails as before.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};

use super::connect::ConnectError;

/// How long an attempt has before the next address is tried beside it.
pub const ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// How long an address that failed is tried last.
pub const DOWN_FOR: Duration = Duration::from_secs(30);

/// Above this many marks, expired ones are dropped; a flood of distinct failing addresses
/// cannot grow the map without bound.
const MAX_MARKS: usize = 4096;

fn marks() -> &'static Mutex<HashMap<SocketAddr, Instant>> {
    static MARKS: OnceLock<Mutex<HashMap<SocketAddr, Instant>>> = OnceLock::new();
    MARKS.get_or_init(Mutex::default)
}

/// Whether `addr` failed within the last [`DOWN_FOR`].
fn is_down(marks: &HashMap<SocketAddr, Instant>, addr: SocketAddr, now: Instant) -> bool {
    marks
        .get(&addr)
        .is_some_and(|since| now.saturating_duration_since(*since) < DOWN_FOR)
}

/// `first` and `rest` in the order to try them: those not marked down first, each group in
/// the order given (the resolver's).
pub fn order(first: SocketAddr, rest: impl IntoIterator<Item = SocketAddr>) -> Vec<SocketAddr> {
    let all = std::iter::once(first).chain(rest);
    let now = Instant::now();
    let Ok(marks) = marks().lock() else {
        return all.collect();
    };
    let (mut up, down): (Vec<_>, Vec<_>) = all.partition(|a| !is_down(&marks, *a, now));
    up.extend(down);
    up
}

fn mark(addr: SocketAddr, failed: bool) {
    let Ok(mut marks) = marks().lock() else {
        return;
    };
    if !failed {
        marks.remove(&addr);
        return;
    }
    let now = Instant::now();
    if marks.len() >= MAX_MARKS {
        marks.retain(|_, since| now.saturating_duration_since(*since) < DOWN_FOR);
        if marks.len() >= MAX_MARKS {
            marks.clear();
        }
    }
    marks.insert(addr, now);
}

/// Runs `attempt` on `addrs` (already [ordered](order)) as described in the module comment,
/// each attempt given what is left of `timeout`. Returns the first connection made and its
/// address, or, when every attempt failed, all their errors.
pub async fn race<T, F, Fut>(
    addrs: &[SocketAddr],
    timeout: Duration,
    attempt: F,
) -> Result<(T, SocketAddr), ConnectError>
where
    F: Fn(SocketAddr, Duration) -> Fut,
    Fut: Future<Output = Result<T, ConnectError>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    let mut running = FuturesUnordered::new();
    let mut errors = Vec::new();
    let mut rest = addrs.iter().copied();
    // The attempts started, in order, and those that ended.
    let (mut started, mut ended) = (Vec::new(), Vec::new());
    let start = |addr: SocketAddr| {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let dial = attempt(addr, left);
        async move { (addr, dial.await) }
    };
    if let Some(first) = rest.next() {
        started.push(first);
        running.push(start(first));
    }
    let mut next = rest.next();
    let stagger = tokio::time::sleep(ATTEMPT_DELAY);
    tokio::pin!(stagger);
    loop {
        tokio::select! {
            done = running.next() => match done {
                Some((addr, Ok(conn))) => {
                    mark(addr, false);
                    // Those that started earlier and are still trying had their chance: a
                    // dropped SYN looks like this, and would cost every new connection the
                    // delay again.
                    for slow in started.iter().take_while(|a| **a != addr) {
                        if !ended.contains(slow) {
                            mark(*slow, true);
                        }
                    }
                    return Ok((conn, addr));
                }
                Some((addr, Err(e))) => {
                    mark(addr, true);
                    ended.push(addr);
                    errors.push(e);
                    // A failure hands over at once: no reason to wait out the delay.
                    if let Some(addr) = next.take() {
                        started.push(addr);
                        running.push(start(addr));
                        next = rest.next();
                        stagger.as_mut().reset(tokio::time::Instant::now() + ATTEMPT_DELAY);
                    }
                }
                None => return Err(ConnectError::every(errors)),
            },
            () = &mut stagger, if next.is_some() => {
                if let Some(addr) = next.take() {
                    started.push(addr);
                    running.push(start(addr));
                }
                next = rest.next();
                stagger.as_mut().reset(tokio::time::Instant::now() + ATTEMPT_DELAY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    async fn refused(a: SocketAddr) -> Result<&'static str, ConnectError> {
        Err(ConnectError::Io {
            addr: a,
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        })
    }

    #[tokio::test]
    async fn a_failure_hands_over_to_the_next_address_and_is_tried_last_meanwhile() {
        let (a, b) = (addr(1001), addr(1002));
        let got = race(&order(a, [b]), Duration::from_secs(5), |x, _| async move {
            if x == a {
                refused(x).await
            } else {
                Ok("b")
            }
        })
        .await
        .unwrap();
        assert_eq!(got, ("b", b));
        assert_eq!(order(a, [b]), [b, a], "a is marked down");
        // Once it connects again, its mark goes.
        race(&[a], Duration::from_secs(5), |_, _| async { Ok(()) })
            .await
            .unwrap();
        assert_eq!(order(a, [b]), [a, b]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_address_gets_company_after_the_delay_and_the_first_to_connect_wins() {
        let (a, b, c) = (addr(2001), addr(2002), addr(2003));
        let started = tokio::time::Instant::now();
        let got = race(&[a, b, c], Duration::from_secs(30), |x, left| async move {
            if x == a {
                // Never answers (a dropped SYN): only its own timeout would end it.
                tokio::time::sleep(left).await;
                return Err(ConnectError::Timeout(x));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(x)
        })
        .await
        .unwrap();
        assert_eq!(got.1, b, "b started after the delay and connected first");
        assert_eq!(
            started.elapsed(),
            ATTEMPT_DELAY + Duration::from_millis(100)
        );
        assert_eq!(
            order(a, [b, c]),
            [b, c, a],
            "the silent one is tried last meanwhile"
        );
    }

    #[tokio::test]
    async fn when_every_address_fails_every_error_is_told() {
        let (a, b) = (addr(3001), addr(3002));
        let err = race(&[a, b], Duration::from_secs(5), |x, _| refused(x))
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("192.0.2.1:3001") && text.contains("192.0.2.1:3002"),
            "{text}"
        );
        assert!(!err.is_timeout());
        let timeouts = race(&[a, b], Duration::from_secs(5), |x, _| async move {
            Err::<(), _>(ConnectError::Timeout(x))
        })
        .await
        .unwrap_err();
        assert!(timeouts.is_timeout(), "all timed out: a 504");
    }
}

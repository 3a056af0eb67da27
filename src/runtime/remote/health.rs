//! Health of one remote runtime: updated by a background prober and by the outcome of real
//! requests, read by listings without waiting on the runtime. A change between up and down
//! is logged (at WARN; the first answer at INFO), naming the runtime by its id only.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use crate::clock::now_rfc3339;
use crate::runtime::handle::{Health, HealthError, HealthState, RuntimeError};
use crate::runtime::types::RuntimeSummary;

/// How many recent outcomes decide "flapping".
const HISTORY: usize = 5;

/// The health state machine of one runtime.
pub struct HealthTracker {
    /// The runtime's id, for the log.
    runtime_id: String,
    slow_after: Duration,
    inner: Mutex<Inner>,
}

struct Inner {
    health: Health,
    recent: VecDeque<bool>,
}

impl HealthTracker {
    /// Starts `unknown`; an answer slower than `slow_after` counts as degraded.
    pub fn new(runtime_id: &str, slow_after: Duration) -> HealthTracker {
        let health = Health {
            state: HealthState::Unknown,
            checked_at: None,
            last_ok_at: None,
            latency_ms: None,
            last_error: None,
            summary: None,
        };
        HealthTracker {
            runtime_id: runtime_id.to_owned(),
            slow_after,
            inner: Mutex::new(Inner { health, recent: VecDeque::new() }),
        }
    }

    /// The current health.
    pub fn get(&self) -> Health {
        self.lock().health.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A probe answered with `summary` after `latency`.
    pub fn probe_ok(&self, latency: Duration, summary: RuntimeSummary) {
        let mut inner = self.lock();
        let now = now_rfc3339();
        push(&mut inner.recent, true);
        let flapping = inner.recent.iter().any(|ok| !ok);
        let before = inner.health.state;
        inner.health = Health {
            state: if latency > self.slow_after || flapping { HealthState::Degraded } else { HealthState::Healthy },
            checked_at: Some(now.clone()),
            last_ok_at: Some(now),
            latency_ms: Some((latency.as_secs_f64() * 10_000.0).round() / 10.0),
            // Degraded by a recent failure: that failure is why, until the history is clean.
            last_error: if flapping { inner.health.last_error.take() } else { None },
            summary: Some(summary),
        };
        self.log_change(before, &inner.health);
    }

    /// A probe (`GET /v1/runtime`, which every Runtime API answers) failed with `error`:
    /// the runtime is not ready, whatever the answer was. Refused, reset, silent, a server
    /// error (5xx) or `runtime_stopped` → `unreachable` (it cannot serve now); a refused
    /// token → `auth_failed`; any other answer (another 4xx, not JSON, the wrong shape, 405
    /// or 501) → `incompatible`.
    pub fn probe_failed(&self, error: &RuntimeError) {
        let (state, code) = probe_failure_state(error);
        self.record(state, code, error);
    }

    /// A real request failed with `error`. Only failures that say something about the
    /// runtime count, and a server error (5xx) on one request never makes the state better
    /// than it was: it degrades a healthy runtime and leaves any other state as it is.
    pub fn failed(&self, error: &RuntimeError) {
        // The runtime's health keeps what went wrong, not the advice to the request's client.
        let error = match error {
            RuntimeError::MaybeApplied(cause) => cause,
            other => other,
        };
        let Some((state, code)) = request_failure_state(error) else {
            return;
        };
        let now = self.lock().health.state;
        let state = match (state, now) {
            (HealthState::Degraded, HealthState::Healthy | HealthState::Degraded) => HealthState::Degraded,
            (HealthState::Degraded, now) => now,
            (state, _) => state,
        };
        self.record(state, code, error);
    }

    fn record(&self, state: HealthState, code: &'static str, error: &RuntimeError) {
        let mut inner = self.lock();
        push(&mut inner.recent, false);
        let now = now_rfc3339();
        let before = inner.health.state;
        inner.health.state = state;
        inner.health.checked_at = Some(now.clone());
        // An unreachable runtime's reason is the gateway's own words (a TLS failure, a
        // refused connection), never the host; any other error's text holds what the runtime
        // said only as checked (see `remote::text`).
        let message = match error {
            RuntimeError::Unreachable(reason) => reason.clone(),
            other => other.to_string(),
        };
        inner.health.last_error = Some(HealthError { code, message, at: now });
        self.log_change(before, &inner.health);
    }

    /// A real request succeeded: a runtime marked down because it could not be reached or
    /// refused the token is reachable again. (One that answers its probe with server errors
    /// stays down until a probe succeeds.)
    pub fn request_ok(&self) {
        let mut inner = self.lock();
        let lifted = matches!(inner.health.state, HealthState::Unreachable | HealthState::AuthFailed)
            && inner.health.last_error.as_ref().is_none_or(|e| {
                matches!(e.code, "remote_runtime_unreachable" | "remote_runtime_timeout" | "remote_runtime_auth_failed")
            });
        if lifted {
            let before = inner.health.state;
            inner.health.state = HealthState::Degraded;
            inner.health.last_ok_at = Some(now_rfc3339());
            self.log_change(before, &inner.health);
        }
    }

    /// Logs a change between up (ready) and down, or from one way of being down to another;
    /// not the flapping between healthy and degraded. No URL or token: the runtime's id only.
    fn log_change(&self, before: HealthState, now: &Health) {
        let id = &self.runtime_id;
        let state = now.state.as_str();
        let (code, why) = now.last_error.as_ref().map_or(("", String::new()), |e| (e.code, format!(": {}", e.message)));
        let was_down = before.is_down();
        if now.is_down() && (!was_down || before != now.state) {
            log::warn!(
                "runtime `{id}` is {state} ({code}{why}); probing it until it answers again (requests to it are \
                 still tried)"
            );
        } else if now.is_ready() && was_down {
            log::warn!("runtime `{id}` is back: {state}");
        } else if now.is_ready() && before == HealthState::Unknown {
            log::info!("runtime `{id}` answers: {state}");
        }
    }
}

fn push(recent: &mut VecDeque<bool>, ok: bool) {
    recent.push_back(ok);
    while recent.len() > HISTORY {
        recent.pop_front();
    }
}

/// The state and code a failed probe leaves.
fn probe_failure_state(error: &RuntimeError) -> (HealthState, &'static str) {
    match error {
        RuntimeError::Unreachable(_) => (HealthState::Unreachable, "remote_runtime_unreachable"),
        RuntimeError::Timeout(_) => (HealthState::Unreachable, "remote_runtime_timeout"),
        RuntimeError::AuthFailed => (HealthState::AuthFailed, "remote_runtime_auth_failed"),
        RuntimeError::HttpStatus { status, .. } if *status >= 500 => {
            (HealthState::Unreachable, "remote_runtime_http_error")
        }
        RuntimeError::Rejected { error, .. } if **error == RuntimeError::RuntimeStopped => {
            (HealthState::Unreachable, "runtime_stopped")
        }
        // A rejection is an HTTP error answer to a request that has nothing to reject.
        RuntimeError::Rejected { .. } | RuntimeError::WorkerNotFound => {
            (HealthState::Incompatible, "remote_runtime_http_error")
        }
        other => (HealthState::Incompatible, other.gateway_status().1),
    }
}

/// Which failures of a real request say something about the runtime's health. Whether it
/// speaks the Runtime API is the probe's to say: a request's 4xx (its own mistake, or an
/// operation the runtime does not offer, as DELETE on a base runtime) changes nothing, and
/// an answer that does not parse only degrades it — else any client could take a healthy
/// runtime out of readiness with one bad request.
fn request_failure_state(error: &RuntimeError) -> Option<(HealthState, &'static str)> {
    Some(match error {
        RuntimeError::Unreachable(_) => (HealthState::Unreachable, "remote_runtime_unreachable"),
        RuntimeError::Timeout(_) => (HealthState::Unreachable, "remote_runtime_timeout"),
        RuntimeError::AuthFailed => (HealthState::AuthFailed, "remote_runtime_auth_failed"),
        RuntimeError::Malformed(_) => (HealthState::Degraded, "remote_runtime_malformed_response"),
        // A server error, or one saying it is too busy (408, 429).
        RuntimeError::HttpStatus { status, .. } if *status >= 500 || matches!(status, 408 | 429) => {
            (HealthState::Degraded, "remote_runtime_http_error")
        }
        RuntimeError::Rejected { error, .. } if **error == RuntimeError::Overloaded => {
            (HealthState::Degraded, "overloaded")
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::types::RuntimeLimits;

    fn summary() -> RuntimeSummary {
        RuntimeSummary {
            runtime_id: "rt".into(),
            display_name: None,
            backend: "memory".into(),
            status: "running".into(),
            worker_count: 0,
            active_worker_count: 0,
            stopped_worker_count: 0,
            cancelled_worker_count: 0,
            diagnostic_count: 0,
            limits: RuntimeLimits { max_transcript_projection_items: 256, max_event_batch_items: 256 },
            boot_id: None,
            profiles: None,
            event_subscribers: None,
        }
    }

    #[test]
    fn states_follow_outcomes() {
        let h = HealthTracker::new("rt", Duration::from_millis(500));
        assert_eq!(h.get().state, HealthState::Unknown);
        h.probe_ok(Duration::from_millis(3), summary());
        assert_eq!(h.get().state, HealthState::Healthy);
        h.failed(&RuntimeError::Unreachable("refused".into()));
        let down = h.get();
        assert_eq!(
            (down.state, down.last_error.unwrap().code),
            (HealthState::Unreachable, "remote_runtime_unreachable")
        );
        assert!(down.last_ok_at.is_some(), "last_ok_at survives failures");
        h.probe_ok(Duration::from_millis(3), summary());
        assert_eq!(h.get().state, HealthState::Degraded, "flapping");
        h.failed(&RuntimeError::WorkerNotFound);
        assert_eq!(h.get().state, HealthState::Degraded, "a request's own error says nothing about health");
        h.failed(&RuntimeError::AuthFailed);
        assert_eq!(h.get().state, HealthState::AuthFailed);
        h.probe_ok(Duration::from_secs(1), summary());
        assert_eq!(h.get().state, HealthState::Degraded, "slow");
    }

    #[test]
    fn a_runtime_degraded_by_a_recent_failure_says_which_until_its_history_is_clean() {
        let h = HealthTracker::new("rt", Duration::from_millis(500));
        h.probe_failed(&RuntimeError::Unreachable("connection refused".into()));
        h.probe_ok(Duration::from_millis(3), summary());
        let back = h.get();
        assert_eq!(back.state, HealthState::Degraded, "flapping");
        assert_eq!(back.last_error.map(|e| e.code), Some("remote_runtime_unreachable"), "why it is degraded");
        for _ in 0..HISTORY {
            h.probe_ok(Duration::from_millis(3), summary());
        }
        let clean = h.get();
        assert_eq!((clean.state, clean.last_error), (HealthState::Healthy, None), "a clean history");
    }

    fn http(status: u16) -> RuntimeError {
        RuntimeError::HttpStatus { status, code: None, message: None }
    }

    fn rejected(error: RuntimeError) -> RuntimeError {
        RuntimeError::Rejected { error: Box::new(error), upstream_code: "x".into(), upstream_message: None }
    }

    #[test]
    fn a_failed_probe_is_never_ready() {
        let cases = [
            (http(500), HealthState::Unreachable, "remote_runtime_http_error"),
            (http(503), HealthState::Unreachable, "remote_runtime_http_error"),
            (rejected(RuntimeError::RuntimeStopped), HealthState::Unreachable, "runtime_stopped"),
            (http(404), HealthState::Incompatible, "remote_runtime_http_error"),
            (
                rejected(RuntimeError::InvalidRequest("x".into())),
                HealthState::Incompatible,
                "remote_runtime_http_error",
            ),
            (RuntimeError::WorkerNotFound, HealthState::Incompatible, "remote_runtime_http_error"),
            (RuntimeError::Malformed("x".into()), HealthState::Incompatible, "remote_runtime_malformed_response"),
            (RuntimeError::Unsupported, HealthState::Incompatible, "remote_runtime_unsupported"),
            (RuntimeError::AuthFailed, HealthState::AuthFailed, "remote_runtime_auth_failed"),
            (RuntimeError::Timeout(5), HealthState::Unreachable, "remote_runtime_timeout"),
        ];
        for (error, state, code) in cases {
            let h = HealthTracker::new("rt", Duration::from_millis(500));
            h.probe_ok(Duration::from_millis(3), summary());
            h.probe_failed(&error);
            let health = h.get();
            assert_eq!((health.state, health.last_error.as_ref().map(|e| e.code)), (state, Some(code)), "{error:?}");
            assert!(!health.is_ready(), "{error:?}");
        }
    }

    /// A request whose answer was lost marks the runtime as its cause does, and the health
    /// says what went wrong without the advice meant for the request's client.
    #[test]
    fn a_lost_answer_is_recorded_as_its_cause() {
        let h = HealthTracker::new("rt", Duration::from_millis(500));
        h.probe_ok(Duration::from_millis(3), summary());
        h.failed(&RuntimeError::MaybeApplied(Box::new(RuntimeError::Timeout(10_000))));
        let health = h.get();
        let error = health.last_error.expect("an error");
        assert_eq!((health.state, error.code), (HealthState::Unreachable, "remote_runtime_timeout"));
        assert_eq!(error.message, "the runtime did not answer within 10000 ms");
    }

    /// A request's own mistakes, and operations the runtime does not offer, leave a healthy
    /// runtime healthy; an answer that does not parse degrades it, still ready.
    #[test]
    fn a_request_cannot_take_a_healthy_runtime_out_of_readiness() {
        let mistakes = [
            http(400),
            http(404),
            http(418),
            rejected(RuntimeError::InvalidRequest("limit must be at least 1".into())),
            rejected(RuntimeError::LimitTooLarge(None)),
            RuntimeError::WorkerNotFound,
            RuntimeError::Unsupported,
        ];
        for error in mistakes {
            let h = HealthTracker::new("rt", Duration::from_millis(500));
            h.probe_ok(Duration::from_millis(3), summary());
            h.failed(&error);
            assert_eq!(h.get().state, HealthState::Healthy, "{error:?}");
        }
        for error in [RuntimeError::Malformed("x".into()), http(429), http(503)] {
            let h = HealthTracker::new("rt", Duration::from_millis(500));
            h.probe_ok(Duration::from_millis(3), summary());
            h.failed(&error);
            assert!(h.get().state == HealthState::Degraded && h.get().is_ready(), "{error:?}");
        }
    }

    #[test]
    fn requests_do_not_lift_a_runtime_whose_probe_fails() {
        let h = HealthTracker::new("rt", Duration::from_millis(500));
        h.failed(&http(500));
        assert_eq!(h.get().state, HealthState::Unknown, "a request's 5xx says nothing of readiness");
        h.probe_failed(&http(500));
        h.failed(&http(502));
        assert_eq!(h.get().state, HealthState::Unreachable, "a request's 5xx does not make it degraded (ready)");
        h.request_ok();
        assert_eq!(h.get().state, HealthState::Unreachable, "only a probe tells it serves again");
        h.probe_ok(Duration::from_millis(3), summary());
        assert_eq!(h.get().state, HealthState::Degraded, "flapping, ready");
        h.failed(&http(500));
        assert!(h.get().is_ready(), "one request's 5xx degrades a ready runtime");
        h.probe_failed(&RuntimeError::Unreachable("refused".into()));
        h.request_ok();
        assert_eq!(h.get().state, HealthState::Degraded, "a request got through: reachable again");
    }
}

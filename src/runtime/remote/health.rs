//! Health of one remote runtime: updated by a background prober and by the outcome of real
//! requests, read by listings without waiting on the runtime.

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
    slow_after: Duration,
    inner: Mutex<Inner>,
}

struct Inner {
    health: Health,
    recent: VecDeque<bool>,
}

impl HealthTracker {
    /// Starts `unknown`; an answer slower than `slow_after` counts as degraded.
    pub fn new(slow_after: Duration) -> HealthTracker {
        let health = Health {
            state: HealthState::Unknown,
            checked_at: None,
            last_ok_at: None,
            latency_ms: None,
            last_error: None,
            summary: None,
        };
        HealthTracker { slow_after, inner: Mutex::new(Inner { health, recent: VecDeque::new() }) }
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
        inner.health = Health {
            state: if latency > self.slow_after || flapping { HealthState::Degraded } else { HealthState::Healthy },
            checked_at: Some(now.clone()),
            last_ok_at: Some(now),
            latency_ms: Some((latency.as_secs_f64() * 10_000.0).round() / 10.0),
            last_error: None,
            summary: Some(summary),
        };
    }

    /// A probe or a request failed with `error`.
    pub fn failed(&self, error: &RuntimeError) {
        let Some((state, code)) = failure_state(error) else {
            return;
        };
        let mut inner = self.lock();
        push(&mut inner.recent, false);
        let now = now_rfc3339();
        inner.health.state = state;
        inner.health.checked_at = Some(now.clone());
        inner.health.last_error = Some(HealthError { code, at: now });
    }

    /// A real request succeeded: a runtime marked down is reachable again.
    pub fn request_ok(&self) {
        let mut inner = self.lock();
        if matches!(inner.health.state, HealthState::Unreachable | HealthState::AuthFailed) {
            inner.health.state = HealthState::Degraded;
            inner.health.last_ok_at = Some(now_rfc3339());
        }
    }
}

fn push(recent: &mut VecDeque<bool>, ok: bool) {
    recent.push_back(ok);
    while recent.len() > HISTORY {
        recent.pop_front();
    }
}

/// Which failures say something about the runtime's health (not a request's own mistakes).
fn failure_state(error: &RuntimeError) -> Option<(HealthState, &'static str)> {
    Some(match error {
        RuntimeError::Unreachable(_) => (HealthState::Unreachable, "remote_runtime_unreachable"),
        RuntimeError::Timeout(_) => (HealthState::Unreachable, "remote_runtime_timeout"),
        RuntimeError::AuthFailed => (HealthState::AuthFailed, "remote_runtime_auth_failed"),
        RuntimeError::Malformed(_) => (HealthState::Incompatible, "remote_runtime_malformed_response"),
        RuntimeError::Unsupported => (HealthState::Incompatible, "remote_runtime_unsupported"),
        RuntimeError::HttpStatus { status, .. } if *status >= 500 => {
            (HealthState::Degraded, "remote_runtime_http_error")
        }
        RuntimeError::HttpStatus { .. } => (HealthState::Incompatible, "remote_runtime_http_error"),
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
        let h = HealthTracker::new(Duration::from_millis(500));
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
}

//! Runtime errors → the gateway API's error table.

use crate::http::ApiError;
use crate::runtime::handle::RuntimeError;

/// Maps a runtime error for `runtime_id` (and `worker_id`) onto gateway-api.md's table. A
/// remote's rejection keeps its own code and explanation (both already checked by the
/// remote handle) in `upstream_code` and `upstream_message`; the message is the gateway's.
pub fn api_error(error: &RuntimeError, runtime_id: &str, worker_id: Option<&str>) -> ApiError {
    if let RuntimeError::Rejected { error, upstream_code, upstream_message } = error {
        let mut e = api_error(error, runtime_id, worker_id);
        e.extra.upstream_code = Some(upstream_code.clone());
        e.extra.upstream_message = upstream_message.clone();
        return e;
    }
    if let RuntimeError::MaybeApplied(error) = error {
        let mut e = api_error(error, runtime_id, worker_id);
        e.message.push_str("; the runtime may have applied the request: repeat it only with the same Idempotency-Key");
        e.extra.maybe_applied = true;
        return e;
    }
    let (status, code) = error.gateway_status();
    let message = match (error, worker_id) {
        (RuntimeError::WorkerNotFound, Some(wid)) => {
            format!("worker `{wid}` not found in runtime `{runtime_id}`")
        }
        (RuntimeError::RuntimeStopped, _) => format!("runtime `{runtime_id}` is shutting down"),
        (RuntimeError::Unreachable(reason), _) => {
            format!("runtime `{runtime_id}` is unreachable ({reason})")
        }
        (RuntimeError::Timeout(ms), _) => {
            format!("runtime `{runtime_id}` did not answer within {ms} ms")
        }
        (RuntimeError::AuthFailed, _) => {
            format!("runtime `{runtime_id}` refused the gateway: its token for it is missing or wrong")
        }
        (RuntimeError::Unsupported, _) => {
            format!("runtime `{runtime_id}` does not support this operation")
        }
        (RuntimeError::Malformed(what), _) => {
            format!("runtime `{runtime_id}` answered something that is not the Runtime API ({what})")
        }
        (RuntimeError::HttpStatus { status, .. }, _) => {
            format!("runtime `{runtime_id}` answered HTTP {status}")
        }
        (RuntimeError::Overloaded, _) => {
            format!(
                "runtime `{runtime_id}` is at its limit (requests in flight), or the gateway or the runtime is out of \
                 open files; retry shortly"
            )
        }
        _ => error.to_string(),
    };
    let mut api = ApiError::new(status, code, message).at(runtime_id, worker_id);
    if let RuntimeError::HttpStatus { status, code, message } = error {
        api.extra.upstream_status = Some(*status);
        api.extra.upstream_code = code.clone();
        api.extra.upstream_message = message.clone();
    }
    if matches!(error, RuntimeError::Overloaded) {
        api.extra.retry_after = Some(1);
    }
    api
}

/// 404 `runtime_not_found`.
pub fn runtime_not_found(runtime_id: &str) -> ApiError {
    ApiError::new(404, "runtime_not_found", format!("no runtime `{runtime_id}` is configured")).at(runtime_id, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::types::WorkerStatus;

    #[test]
    fn table_statuses() {
        let cases = [
            (RuntimeError::WorkerNotFound, 404, "worker_not_found"),
            (RuntimeError::WorkerNotRunning(WorkerStatus::Stopped), 409, "worker_not_running"),
            (RuntimeError::WorkerBusy, 409, "worker_busy"),
            (RuntimeError::InvalidRequest("x".into()), 400, "invalid_request"),
            (RuntimeError::LimitTooLarge(Some(300)), 400, "limit_too_large"),
            (RuntimeError::Unreachable("refused".into()), 502, "remote_runtime_unreachable"),
            (RuntimeError::Timeout(100), 504, "remote_runtime_timeout"),
            (RuntimeError::AuthFailed, 401, "remote_runtime_auth_failed"),
            (RuntimeError::Unsupported, 501, "remote_runtime_unsupported"),
            (RuntimeError::Malformed("x".into()), 502, "remote_runtime_malformed_response"),
            (RuntimeError::HttpStatus { status: 500, code: None, message: None }, 502, "remote_runtime_http_error"),
            (RuntimeError::Overloaded, 503, "overloaded"),
            (RuntimeError::PayloadTooLarge, 413, "payload_too_large"),
        ];
        for (error, status, code) in cases {
            let e = api_error(&error, "local", Some("w"));
            assert_eq!((e.status, e.code), (status, code));
            assert_eq!(e.extra.runtime_id.as_deref(), Some("local"));
        }
        let rejected = RuntimeError::Rejected {
            error: Box::new(RuntimeError::WorkerBusy),
            upstream_code: "worker_busy".into(),
            upstream_message: Some("queue full".into()),
        };
        let e = api_error(&rejected, "lab", Some("w"));
        assert_eq!((e.status, e.code, e.extra.upstream_code.as_deref()), (409, "worker_busy", Some("worker_busy")));
        assert_eq!(e.extra.upstream_message.as_deref(), Some("queue full"));
        assert!(!e.message.contains("queue full"), "the message is the gateway's own");
        let teapot = RuntimeError::HttpStatus { status: 418, code: None, message: Some("short".into()) };
        let e = api_error(&teapot, "lab", None);
        assert_eq!((e.extra.upstream_status, e.extra.upstream_message.as_deref()), (Some(418), Some("short")));
        assert!(!e.retryable(), "the runtime refused the request as such: a retry gets the same");
        let broken = RuntimeError::HttpStatus { status: 500, code: None, message: None };
        assert!(api_error(&broken, "lab", None).retryable(), "a server error may pass");
    }
}

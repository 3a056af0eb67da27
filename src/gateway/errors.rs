//! Runtime errors → the gateway API's error table.

use crate::http::ApiError;
use crate::runtime::handle::RuntimeError;

/// Maps a runtime error for `runtime_id` (and `worker_id`) onto gateway-api.md's table.
pub fn api_error(error: &RuntimeError, runtime_id: &str, worker_id: Option<&str>) -> ApiError {
    let (status, code) = match error {
        RuntimeError::WorkerNotFound => (404, "worker_not_found"),
        RuntimeError::WorkerNotRunning(_) => (409, "worker_not_running"),
        RuntimeError::WorkerBusy => (409, "worker_busy"),
        RuntimeError::InvalidRequest(_) => (400, "invalid_request"),
        RuntimeError::LimitTooLarge(_) => (400, "limit_too_large"),
        RuntimeError::RuntimeStopped => (409, "runtime_stopped"),
        RuntimeError::Store(_) => (500, "store_io"),
    };
    let message = match (error, worker_id) {
        (RuntimeError::WorkerNotFound, Some(wid)) => {
            format!("worker `{wid}` not found in runtime `{runtime_id}`")
        }
        (RuntimeError::RuntimeStopped, _) => format!("runtime `{runtime_id}` is shutting down"),
        _ => error.to_string(),
    };
    ApiError::new(status, code, message).at(runtime_id, worker_id)
}

/// 404 `runtime_not_found`.
pub fn runtime_not_found(runtime_id: &str) -> ApiError {
    ApiError::new(
        404,
        "runtime_not_found",
        format!("no runtime `{runtime_id}` is configured"),
    )
    .at(runtime_id, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::types::WorkerStatus;

    #[test]
    fn table_statuses() {
        let cases = [
            (RuntimeError::WorkerNotFound, 404, "worker_not_found"),
            (
                RuntimeError::WorkerNotRunning(WorkerStatus::Stopped),
                409,
                "worker_not_running",
            ),
            (RuntimeError::WorkerBusy, 409, "worker_busy"),
            (
                RuntimeError::InvalidRequest("x".into()),
                400,
                "invalid_request",
            ),
            (RuntimeError::LimitTooLarge(300), 400, "limit_too_large"),
        ];
        for (error, status, code) in cases {
            let e = api_error(&error, "local", Some("w"));
            assert_eq!((e.status, e.code), (status, code));
            assert_eq!(e.extra.runtime_id.as_deref(), Some("local"));
        }
    }
}

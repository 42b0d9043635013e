//! One error type for every handler, mapped to an HTTP status once.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{what} {id} does not exist")]
    NotFound { what: &'static str, id: String },
    #[error("bad request: {field} = `{value}`: {expected}")]
    BadRequest { field: &'static str, value: String, expected: &'static str },
    #[error("unauthorized: {why}")]
    Unauthorized { why: &'static str },
    #[error("writes are disabled: no token is configured (set PARITYBENCH_SERVE_TOKEN)")]
    WritesDisabled,
    #[error("the serve token is {len} characters; it must be at least 16")]
    BadToken { len: usize },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("rendering the page: {0}")]
    Render(#[from] askama::Error),
    #[error("a background task failed: {0}")]
    Task(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::BadRequest { .. } | ApiError::BadToken { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::WritesDisabled => StatusCode::FORBIDDEN,
            ApiError::Store(StoreError::NotFound { .. }) => StatusCode::NOT_FOUND,
            ApiError::Store(_) | ApiError::Render(_) | ApiError::Task(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut resp = (status, axum::Json(serde_json::json!({ "error": self.to_string() }))).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

//! The one error type of the API and its mapping to status codes.

use hyper::StatusCode;

/// Every way a request can fail; `status` and `message` make the response.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error("invalid JSON: {0}")]
    BadJson(String),
    #[error("missing field {0}")]
    MissingField(&'static str),
    #[error("field {field} {problem}")]
    BadField {
        field: &'static str,
        problem: String,
    },
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    NoSuchEntity(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("feature store unavailable")]
    StoreUnavailable,
    #[error("feature row unreadable: {0}")]
    BadRow(String),
    #[error("model failed: {0}")]
    Model(String),
    #[error("shutting down")]
    ShuttingDown,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadJson(_) | ApiError::MissingField(_) | ApiError::BadField { .. } => {
                StatusCode::BAD_REQUEST
            }
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound | ApiError::NoSuchEntity(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::StoreUnavailable | ApiError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::BadRow(_) | ApiError::Model(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The field the error is about, for the `field` member of the body.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            ApiError::MissingField(f) | ApiError::BadField { field: f, .. } => Some(f),
            _ => None,
        }
    }

    /// The JSON body: `{"error": "...", "field": "..."}`.
    pub fn body(&self) -> serde_json::Value {
        let mut body = serde_json::json!({ "error": self.to_string() });
        if let Some(field) = self.field() {
            body["field"] = field.into();
        }
        body
    }
}

//! Request id: taken from `X-Request-Id` when it is sane, generated otherwise, echoed on
//! the response, recorded on every log line of the request and carried into events.

use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use tracing::Instrument;
use uuid::Uuid;

use crate::metrics::Metrics;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// The current request's id, available to handlers as an extractor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(String);

impl RequestId {
    /// Accepts a client-supplied id only if it is short and plainly printable, so it
    /// cannot forge log lines or bloat them.
    fn from_header(value: Option<&HeaderValue>) -> Self {
        value
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                (1..=128).contains(&v.len())
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            })
            .map_or_else(|| Self(Uuid::now_v7().to_string()), |v| Self(v.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromRequest for RequestId {
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let id = req.extensions().get::<RequestId>().cloned();
        // Only absent when the middleware is not mounted (some unit tests).
        std::future::ready(Ok(id.unwrap_or_else(|| Self::from_header(None))))
    }
}

/// Middleware: one span per request carrying the request id, one log line and one
/// metrics observation per completed request, and the id echoed in `X-Request-Id`.
pub async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let id = RequestId::from_header(req.headers().get(&REQUEST_ID_HEADER));
    let span = tracing::info_span!(
        "request",
        request_id = %id.as_str(),
        method = %req.method(),
        path = %req.path(),
    );
    req.extensions_mut().insert(id.clone());
    let metrics = req.app_data::<web::Data<Metrics>>().cloned();
    let started = Instant::now();
    let mut res = next.call(req).instrument(span.clone()).await?;
    let status = res.status().as_u16();
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(metrics) = metrics {
        // The route pattern, not the path: one series per route, not per uuid.
        let route = res.request().match_pattern();
        let route = route.as_deref().unwrap_or("unmatched");
        metrics.observe_request(res.request().method().as_str(), route, status, elapsed);
    }
    let latency_ms = elapsed * 1000.0;
    span.in_scope(|| tracing::info!(status, latency_ms, "request completed"));
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        res.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sane_client_ids_are_kept() {
        let v = HeaderValue::from_static("abc-123_x.y:z");
        assert_eq!(RequestId::from_header(Some(&v)).as_str(), "abc-123_x.y:z");
    }

    #[test]
    fn unsafe_or_oversized_ids_are_replaced() {
        for raw in ["", "has space", "new\\nline", &"a".repeat(129)] {
            let v = HeaderValue::from_str(raw).unwrap();
            let id = RequestId::from_header(Some(&v));
            assert_ne!(id.as_str(), raw);
            assert!(Uuid::parse_str(id.as_str()).is_ok());
        }
    }
}

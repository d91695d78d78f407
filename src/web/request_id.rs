//! Request id: taken from `X-Request-Id` when it is sane, generated otherwise, echoed on
//! the response, recorded on every log line of the request and carried into events.
//! The request's span joins the trace of an incoming W3C `traceparent` (or starts one)
//! and its context goes back in the response's `traceparent`.
//!
//! tracing-actix-web would give the span and the propagation too, but it makes its own
//! request ids and its own span around ours; one middleware keeps one span per request
//! with our id, our RED metrics and our log line.

use std::collections::BTreeMap;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use tracing::Instrument;
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::telemetry::{self, TRACEPARENT, TRACESTATE};

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
            .map_or_else(Self::generate, |v| Self(v.to_owned()))
    }

    /// A new id, for every request without a usable `X-Request-Id`: a UUIDv7 in its
    /// hyphenated lower-case form, encoded straight into the string rather than through
    /// `Display` and the formatting machinery.
    fn generate() -> Self {
        let mut buffer = Uuid::encode_buffer();
        Self(
            Uuid::now_v7()
                .hyphenated()
                .encode_lower(&mut buffer)
                .to_owned(),
        )
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
    // OpenTelemetry's HTTP server conventions; the name becomes "METHOD /route" once
    // the route is known.
    let span = tracing::info_span!(
        "request",
        request_id = %id.as_str(),
        method = %req.method(),
        path = %req.path(),
        otel.kind = "server",
        otel.name = %req.method(),
        otel.status_code = tracing::field::Empty,
        http.request.method = %req.method(),
        url.path = %req.path(),
        http.route = tracing::field::Empty,
        http.response.status_code = tracing::field::Empty,
    );
    // A log level above info turns request spans off, exporter or not: the span is
    // then disabled, and its trace context and names are skipped (they would be empty).
    let traced = !span.is_disabled();
    if traced {
        telemetry::set_parent_from(&span, &trace_context_of(req.headers()));
    }
    req.extensions_mut().insert(id.clone());
    let started = Instant::now();
    let mut res = next.call(req).instrument(span.clone()).await?;
    let status = res.status();
    let elapsed = started.elapsed().as_secs_f64();
    // The route pattern, not the path: one series per route, not per uuid.
    let pattern = res.request().match_pattern();
    let method = res.request().method().clone();
    if traced {
        if let Some(route) = &pattern {
            span.record("http.route", route.as_str());
            telemetry::rename_span(&span, format!("{method} {route}"));
        }
        span.record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            span.record("otel.status_code", "error");
        }
    }
    if let Some(metrics) = res.request().app_data::<web::Data<Metrics>>() {
        let route = pattern.as_deref().unwrap_or("unmatched");
        metrics.observe_request(method.as_str(), route, status.as_str(), elapsed);
    }
    let latency_ms = elapsed * 1000.0;
    span.in_scope(|| tracing::info!(status = status.as_u16(), latency_ms, "request completed"));
    if let Ok(value) = HeaderValue::from_str(id.as_str()) {
        res.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    if traced {
        for (name, value) in telemetry::context_headers(&span) {
            if let (Ok(name), Ok(value)) = (
                HeaderName::try_from(name.as_str()),
                HeaderValue::from_str(&value),
            ) {
                res.headers_mut().insert(name, value);
            }
        }
    }
    Ok(res)
}

/// The W3C trace context headers of a request, if it has any.
fn trace_context_of(headers: &actix_web::http::header::HeaderMap) -> BTreeMap<String, String> {
    [TRACEPARENT, TRACESTATE]
        .into_iter()
        .filter_map(|name| {
            let value = headers.get(name)?.to_str().ok()?;
            Some((name.to_owned(), value.to_owned()))
        })
        .collect()
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
            let uuid = Uuid::parse_str(id.as_str()).unwrap();
            assert_eq!(uuid.get_version_num(), 7);
            assert_eq!(id.as_str(), uuid.to_string(), "the canonical form");
        }
    }
}

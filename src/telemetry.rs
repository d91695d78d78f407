//! Tracing: the log subscriber (human-readable locally, one JSON object per line in
//! production) and OpenTelemetry spans, exported over OTLP/HTTP when
//! `telemetry.otlp_endpoint` is set, with W3C trace context carried in headers.
//!
//! Every span gets an OpenTelemetry context even when nothing is exported, so a
//! `traceparent` received on a request reaches the event headers, the relay and the
//! worker either way, and JSON log lines carry `trace_id` and `span_id`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Link, SpanKind, TraceContextExt, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::runtime;
use opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor;
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, SamplingResult, SdkTracerProvider, ShouldSample,
};
use tracing::Subscriber;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogFormat, LogSettings, TelemetrySettings};

/// Header names of the W3C trace context, as carried on HTTP and in event headers.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Paths whose request spans are never exported when they start a trace: scrapes and
/// probes arrive every few seconds and would bury the traces worth reading.
const UNTRACED_PATHS: [&str; 3] = ["/metrics", "/health", "/health/ready"];

/// The tracer provider of this process, once [`init`] has built one.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// What [`init`] installed; [`Telemetry::shutdown`] exports the spans still queued.
#[derive(Debug, Clone)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    exporting: bool,
}

impl Telemetry {
    /// True when spans are exported over OTLP.
    pub fn exporting(&self) -> bool {
        self.exporting
    }

    /// Exports what is still queued and stops the exporter, waiting at most `timeout`
    /// (an unreachable collector must not hold the process up).
    pub async fn shutdown(&self, timeout: Duration) {
        let Some(provider) = self.provider.clone().filter(|_| self.exporting) else {
            return;
        };
        // The SDK blocks the calling thread until the exporter's own thread answers.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(timeout));
        match tokio::time::timeout(timeout + Duration::from_millis(500), flushed).await {
            Ok(Ok(Ok(()))) => tracing::debug!("spans exported"),
            Ok(Ok(Err(error))) => eprintln!("userhub: exporting the last spans failed: {error}"),
            Ok(Err(error)) => eprintln!("userhub: exporting the last spans failed: {error}"),
            Err(_) => eprintln!("userhub: exporting the last spans timed out after {timeout:?}"),
        }
    }
}

/// Installs the global subscriber: logs to `writer` (`RUST_LOG` overrides `log.level`)
/// and OpenTelemetry spans, exported when `telemetry.otlp_endpoint` is set. Calling it
/// twice (as the test suite does) keeps the first subscriber and its exporter.
pub fn init<W>(log: &LogSettings, telemetry: &TelemetrySettings, writer: W) -> Telemetry
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    if let Some(provider) = PROVIDER.get() {
        return Telemetry {
            provider: Some(provider.clone()),
            exporting: false,
        };
    }
    let (provider, exporting) = match build_provider(telemetry) {
        Ok(built) => built,
        Err(error) => {
            eprintln!("userhub: tracing export disabled: {error}");
            (SdkTracerProvider::builder().build(), false)
        }
    };
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("userhub"))
        .with_level(true)
        .with_threads(false);
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer);
    let fmt = match log.format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .map_event_format(WithTraceIds)
            .boxed(),
        LogFormat::Pretty => fmt.compact().boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(otel)
        .with(fmt)
        .try_init()
        .is_ok();
    if installed {
        let _ = PROVIDER.set(provider.clone());
    }
    Telemetry {
        provider: Some(provider),
        exporting: exporting && installed,
    }
}

/// The OTLP traces URL for `endpoint`: the OTLP/HTTP base (`http://collector:4318`), to
/// which `/v1/traces` is added, or already the full traces URL.
pub fn traces_url(endpoint: &str) -> String {
    let endpoint = endpoint.trim().trim_end_matches('/');
    if endpoint.ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{endpoint}/v1/traces")
    }
}

fn build_provider(settings: &TelemetrySettings) -> anyhow::Result<(SdkTracerProvider, bool)> {
    let ratio = settings.sampling_ratio.clamp(0.0, 1.0);
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)));
    let resource = Resource::builder()
        .with_service_name(settings.service_name.clone())
        .with_attribute(KeyValue::new(
            opentelemetry_semantic_conventions::resource::SERVICE_VERSION,
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let builder = SdkTracerProvider::builder()
        .with_sampler(SkipProbes(sampler))
        .with_resource(resource);
    let endpoint = settings.otlp_endpoint.trim();
    if endpoint.is_empty() {
        return Ok((builder.build(), false));
    }
    // reqwest needs the rustls provider before its first client is built.
    crate::crypto::install_crypto_provider();
    let timeout = Duration::from_millis(settings.export_timeout_ms);
    let client = reqwest::Client::builder().timeout(timeout).build()?;
    let exporter = SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(traces_url(endpoint))
        .with_timeout(timeout)
        .with_http_client(client)
        .build()?;
    // The exporter runs on a thread of its own with its own runtime, so it outlives
    // whichever runtime built it and flushing never waits on a busy worker thread.
    let processor = BatchSpanProcessor::builder(exporter, runtime::TokioCurrentThread).build();
    Ok((builder.with_span_processor(processor).build(), true))
}

/// The configured sampler, except that a trace starting with a probe or a scrape (see
/// [`UNTRACED_PATHS`]) is dropped.
#[derive(Debug, Clone)]
struct SkipProbes(Sampler);

impl ShouldSample for SkipProbes {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let is_root = parent_context.is_none_or(|cx| !cx.has_active_span());
        let probe = is_root
            && attributes.iter().any(|kv| {
                kv.key.as_str() == "url.path"
                    && UNTRACED_PATHS.contains(&kv.value.as_str().as_ref())
            });
        if probe {
            return SamplingResult {
                decision: SamplingDecision::Drop,
                attributes: Vec::new(),
                trace_state: TraceState::default(),
            };
        }
        self.0
            .should_sample(parent_context, trace_id, name, span_kind, attributes, links)
    }
}

/// The W3C propagator; used directly rather than through the global one, so the
/// headers are the same whether or not [`init`] ran.
fn propagator() -> &'static TraceContextPropagator {
    static PROPAGATOR: OnceLock<TraceContextPropagator> = OnceLock::new();
    PROPAGATOR.get_or_init(TraceContextPropagator::new)
}

struct HeaderInjector<'a>(&'a mut BTreeMap<String, String>);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct HeaderExtractor<'a>(&'a BTreeMap<String, String>);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Adds the current span's trace context (`traceparent`, and `tracestate` when there
/// is one) to `headers`. Adds nothing outside a traced span.
pub fn inject_context(headers: &mut BTreeMap<String, String>) {
    inject_span_context(&tracing::Span::current(), headers);
}

/// Adds `span`'s trace context to `headers`.
pub fn inject_span_context(span: &tracing::Span, headers: &mut BTreeMap<String, String>) {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        propagator().inject_context(&cx, &mut HeaderInjector(headers));
    }
}

/// The trace context carried by `headers` (an empty context when there is none or it
/// is malformed).
pub fn extract_context(headers: &BTreeMap<String, String>) -> Context {
    propagator().extract(&HeaderExtractor(headers))
}

/// Makes the trace context in `headers` the parent of `span`, which must not have been
/// entered yet. Without a (valid) context the span starts a new trace.
pub fn set_parent_from(span: &tracing::Span, headers: &BTreeMap<String, String>) {
    let cx = extract_context(headers);
    if cx.span().span_context().is_valid() {
        // Fails only when the span was entered already: then it keeps its own trace.
        let _ = span.set_parent(cx);
    }
}

/// Renames `span` once more is known about it (an HTTP span learns its route only
/// after routing). tracing-opentelemetry applies a recorded `otel.name` only to spans
/// not yet started, so the started span is renamed directly.
pub fn rename_span(span: &tracing::Span, name: String) {
    span.context().span().update_name(name);
}

/// `span`'s trace context as W3C headers, for a response.
pub fn context_headers(span: &tracing::Span) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::new();
    inject_span_context(span, &mut headers);
    headers
}

/// The JSON log format with the current span's `trace_id` and `span_id` first.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let ids = ctx.lookup_current().and_then(|span| {
            let cx = tracing::dispatcher::get_default(|dispatch| {
                tracing_opentelemetry::get_otel_context(&span.id(), dispatch)
            })?;
            let span_context = cx.span().span_context().clone();
            span_context
                .is_valid()
                .then(|| (span_context.trace_id(), span_context.span_id()))
        });
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_url_is_added_to_a_base_endpoint_once() {
        assert_eq!(
            traces_url("http://collector:4318"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/"),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/v1/traces"),
            "http://c:4318/v1/traces"
        );
    }

    #[test]
    fn a_context_survives_the_trip_through_headers() {
        let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let headers = BTreeMap::from([
            (TRACEPARENT.to_owned(), traceparent.to_owned()),
            (TRACESTATE.to_owned(), "vendor=value".to_owned()),
        ]);
        let cx = extract_context(&headers);
        let span = cx.span();
        let span_context = span.span_context();
        assert!(span_context.is_valid());
        assert_eq!(
            span_context.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        let mut out = BTreeMap::new();
        propagator().inject_context(&cx, &mut HeaderInjector(&mut out));
        assert_eq!(out, headers);
    }

    #[test]
    fn malformed_or_missing_contexts_are_no_parent() {
        for value in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        ] {
            let headers = BTreeMap::from([(TRACEPARENT.to_owned(), value.to_owned())]);
            assert!(!extract_context(&headers).span().span_context().is_valid());
        }
        assert!(
            !extract_context(&BTreeMap::new())
                .span()
                .span_context()
                .is_valid()
        );
    }
}

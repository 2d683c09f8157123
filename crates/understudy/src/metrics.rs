//! `serve --metrics-listen ADDR`: Prometheus metrics over plain HTTP/1.1, `GET /metrics` only
//! (the text is [`host::Shared::metrics_text`]; every name is in docs/metrics.md). Read-only
//! and holding no secret, like a node exporter: bind it where your Prometheus can reach it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Response, StatusCode};
use hyper_util::rt::TokioIo;

use host::Shared;

/// Scrapes served at once; more connections wait for one to end. A Prometheus server uses one
/// connection; a few more leave room for curl and a second server without letting a flood of
/// connections pile up tasks.
const METRICS_CONNECTIONS_MAX: usize = 8;
/// Longest life of one metrics connection (keep-alive included): a client that opens a
/// connection and sends nothing releases its slot by then.
const METRICS_CONNECTION_MAX_TIME: Duration = Duration::from_secs(60);

/// The OpenMetrics content type Prometheus asks for (it parses `_total`, units and `# EOF`).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The classic Prometheus text format, for every other client.
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS_MAX));
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::pin!(stopped);
    loop {
        let permit = tokio::select! {
            _ = &mut stopped => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let stream = tokio::select! {
            _ = &mut stopped => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("metrics: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let s = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req| {
                let s = s.clone();
                async move { Ok::<_, std::convert::Infallible>(answer(&s, &req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc);
            let _ = tokio::time::timeout(METRICS_CONNECTION_MAX_TIME, conn).await;
        });
    }
}

fn answer<B>(shared: &Shared, req: &hyper::Request<B>) -> Response<Full<Bytes>> {
    // Prometheus asks for OpenMetrics in its Accept header; anything else (curl, promtool)
    // gets the classic text format.
    let openmetrics = req
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") if openmetrics => {
            (StatusCode::OK, OPENMETRICS, shared.metrics_text())
        }
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            PROMETHEUS_TEXT,
            host::metrics::prometheus_text(&shared.metrics_text()),
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "metrics are at /metrics\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static(content_type),
    );
    resp
}

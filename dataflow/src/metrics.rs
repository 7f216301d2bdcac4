//! The process's Prometheus registry and its `/metrics` endpoint (a tiny
//! HTTP/1.1 responder on its own thread and port).

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use sinks::kafka::DeadLetterMetrics;
use sinks::redis::SinkMetrics;

use operators::kafka::SourceMetrics;

/// Every metric of `sfs stream`, registered once per process and shared by its workers.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub source: SourceMetrics,
    pub sink: SinkMetrics,
    pub dead_letters: DeadLetterMetrics,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Creates and registers every metric under the `sfs_` prefix.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sfs");
        let source = SourceMetrics::default();
        let sink = SinkMetrics::default();
        let dead_letters = DeadLetterMetrics::default();
        source.register(&mut registry);
        sink.register(&mut registry);
        dead_letters.register(&mut registry);
        Metrics {
            source,
            sink,
            dead_letters,
            registry: Arc::new(registry),
        }
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("encoding into a String cannot fail");
        out
    }

    /// Serves `GET /metrics` on `addr` from a background thread.
    pub fn serve(&self, addr: &str) -> std::io::Result<std::net::SocketAddr> {
        let metrics = self.clone();
        serve_text(addr, move || metrics.encode())
    }
}

/// Serves `GET /metrics` on `addr` from a background thread, the body drawn
/// by `render` (OpenMetrics text) per request.
pub fn serve_text(
    addr: &str,
    render: impl Fn() -> String + Send + 'static,
) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(addr)?;
    let local = listener.local_addr()?;
    std::thread::Builder::new()
        .name("sfs-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                if let Err(error) = respond(stream, &render) {
                    tracing::debug!(%error, "metrics request failed");
                }
            }
        })?;
    tracing::info!(%local, "serving /metrics");
    Ok(local)
}

fn respond(stream: TcpStream, render: &impl Fn() -> String) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Drain the headers.
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    let mut stream = stream;
    let path = request_line.split_whitespace().nth(1).unwrap_or("");
    if path == "/metrics" {
        let body = render();
        write!(
            stream,
            "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    } else {
        stream
            .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn metrics_are_served_over_http() {
        let metrics = Metrics::new();
        metrics.sink.rows_written.inc_by(3);
        let addr = metrics.serve("127.0.0.1:0").unwrap();
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("sfs_sink_rows_written_total 3"), "{body}");
        assert!(
            body.contains("sfs_sink_feature_freshness_seconds_bucket"),
            "{body}"
        );
    }
}

//! Request metrics of a node, exported in Prometheus' text format at `/metrics`: a tower layer
//! counts every gRPC and HTTP request by method and outcome and records its latency in a fixed
//! set of buckets. Label values come from a closed set (known method names, status codes), and
//! the number of series is bounded by [`SERIES_MAX`].

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

/// Upper bounds of the latency buckets, in seconds (the last bucket, `+Inf`, is implicit).
pub const BUCKETS_S: [f64; 16] =
    [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
/// Revocations applied later than this after their stamp are counted as late, not as lag.
pub const LAG_LATE_MS: u64 = 60_000;
/// Distinct (api, method) and (api, method, code) series at most; later ones are counted under
/// method `other`.
pub const SERIES_MAX: usize = 256;

/// A latency histogram with Prometheus' cumulative buckets.
#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS_S.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// The buckets, sum and count of histogram `name` with `labels` (may be empty).
    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (b, n) in BUCKETS_S.iter().zip(&self.buckets) {
            cumulative += n.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {count}");
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braces} {sum}");
        let _ = writeln!(out, "{name}_count{braces} {count}");
    }

    fn record(&self, seconds: f64) {
        if let Some(i) = BUCKETS_S.iter().position(|b| seconds <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }
}

type Key = (&'static str, String);

/// Counters and histograms of the requests a node served.
#[derive(Default)]
pub struct Metrics {
    durations: RwLock<BTreeMap<Key, Arc<Histogram>>>,
    /// (api, method) → code → count.
    counts: RwLock<BTreeMap<(Key, String), Arc<AtomicU64>>>,
    /// Forward-auth answers by outcome.
    forward_auth: RwLock<BTreeMap<&'static str, Arc<AtomicU64>>>,
    /// Revocation stamped by its leader → applied on this replica (node clocks may differ).
    revocation_lag: Histogram,
    /// Revocations applied more than [`LAG_LATE_MS`] after their stamp (replays at start-up,
    /// catch-up after a partition): counted apart so they do not drown the live lag.
    revocation_late: AtomicU64,
    /// Callers refused by authentication, by API and reason.
    auth_refused: RwLock<BTreeMap<(&'static str, &'static str), Arc<AtomicU64>>>,
}

/// Look `key` up, inserting `V::default()` if there is room (or `overflow`: the catch-all series
/// beyond the bound); `None` when the map is full.
fn entry<K: Ord + Clone, V: Default>(
    map: &RwLock<BTreeMap<K, Arc<V>>>,
    key: &K,
    overflow: bool,
) -> Option<Arc<V>> {
    if let Some(v) = map.read().unwrap_or_else(|p| p.into_inner()).get(key) {
        return Some(v.clone());
    }
    let mut w = map.write().unwrap_or_else(|p| p.into_inner());
    if w.len() >= SERIES_MAX && !overflow && !w.contains_key(key) {
        return None;
    }
    Some(w.entry(key.clone()).or_default().clone())
}

impl Metrics {
    /// Count one request of `method` on `api` ("grpc" or "http") ending with `code`.
    pub fn record(&self, api: &'static str, method: &str, code: &str, elapsed_s: f64) {
        let key = (api, method.to_owned());
        let other = || (api, "other".to_owned());
        let h = entry(&self.durations, &key, false).or_else(|| entry(&self.durations, &other(), true));
        if let Some(h) = h {
            h.record(elapsed_s);
        }
        let c = entry(&self.counts, &(key, code.to_owned()), false)
            .or_else(|| entry(&self.counts, &(other(), code.to_owned()), true));
        if let Some(c) = c {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count one forward-auth answer.
    pub fn forward_auth(&self, outcome: &'static str) {
        if let Some(c) = entry(&self.forward_auth, &outcome, true) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One revocation applied on this replica `lag_ms` after its leader stamped it.
    pub fn revocation_applied(&self, lag_ms: u64) {
        if lag_ms > LAG_LATE_MS {
            self.revocation_late.fetch_add(1, Ordering::Relaxed);
        } else {
            self.revocation_lag.record(lag_ms as f64 / 1000.0);
        }
    }

    /// Count one refused caller.
    pub fn auth_refused(&self, api: &'static str, reason: &'static str) {
        if let Some(c) = entry(&self.auth_refused, &(api, reason), true) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The request metrics in Prometheus' text format.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP cascade_requests_total Requests served, by API, method and status code.\n");
        out.push_str("# TYPE cascade_requests_total counter\n");
        for (((api, method), code), n) in self.counts.read().unwrap_or_else(|p| p.into_inner()).iter() {
            let n = n.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "cascade_requests_total{{api=\"{api}\",method=\"{}\",code=\"{}\"}} {n}",
                escape(method),
                escape(code)
            );
        }
        out.push_str("# HELP cascade_request_duration_seconds Time to answer a request (gRPC: to the response headers).\n");
        out.push_str("# TYPE cascade_request_duration_seconds histogram\n");
        for ((api, method), h) in self.durations.read().unwrap_or_else(|p| p.into_inner()).iter() {
            let labels = format!("api=\"{api}\",method=\"{}\"", escape(method));
            h.render(out, "cascade_request_duration_seconds", &labels);
        }
        out.push_str("# HELP cascade_forward_auth_total Forward-auth answers, by outcome.\n");
        out.push_str("# TYPE cascade_forward_auth_total counter\n");
        for (outcome, n) in self.forward_auth.read().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "cascade_forward_auth_total{{outcome=\"{outcome}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP cascade_revocation_apply_lag_seconds From a revocation's stamp by its leader to its apply on this replica (includes clock offset between nodes).\n");
        out.push_str("# TYPE cascade_revocation_apply_lag_seconds histogram\n");
        self.revocation_lag.render(out, "cascade_revocation_apply_lag_seconds", "");
        out.push_str("# HELP cascade_revocation_applied_late_total Revocations applied here over 60 s after their stamp (start-up replay, catch-up).\n");
        out.push_str("# TYPE cascade_revocation_applied_late_total counter\n");
        let _ = writeln!(
            out,
            "cascade_revocation_applied_late_total {}",
            self.revocation_late.load(Ordering::Relaxed)
        );
        out.push_str("# HELP cascade_auth_refused_total Callers refused: no or unknown key (unauthenticated), or a key without the role (permission_denied).\n");
        out.push_str("# TYPE cascade_auth_refused_total counter\n");
        for ((api, reason), n) in self.auth_refused.read().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(
                out,
                "cascade_auth_refused_total{{api=\"{api}\",reason=\"{reason}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
    }
}

/// A label value with Prometheus' escapes.
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The method a gRPC path names (`/cascade.v1.Cascade/CheckSession` → `Cascade/CheckSession`);
/// paths of no known service count as `other`.
fn grpc_method(path: &str) -> &str {
    const SERVICES: [&str; 4] =
        ["/cascade.v1.", "/cascade.raft.v1.", "/grpc.health.v1.", "/grpc.reflection.v1."];
    match SERVICES.iter().find_map(|prefix| path.strip_prefix(prefix)) {
        Some(rest) if rest.len() <= 64 => rest,
        _ => "other",
    }
}

/// A tower layer that records every request of the service it wraps into [`Metrics`].
#[derive(Clone)]
pub struct MetricsLayer {
    pub metrics: Arc<Metrics>,
    pub api: Api,
}

/// Which API a [`MetricsLayer`] wraps, and so how it names methods and outcomes.
#[derive(Clone, Copy)]
pub enum Api {
    /// Method from the gRPC path; code from `grpc-status` in the response headers (`OK` when it
    /// comes later, in trailers).
    Grpc,
    /// Method given by the route (see `http::route_name`); code is the HTTP status.
    Http(fn(&str) -> &'static str),
}

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> MetricsService<S> {
        MetricsService { inner, layer: self.clone() }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    layer: MetricsLayer,
}

impl<S, B, R> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (api, method) = match self.layer.api {
            Api::Grpc => ("grpc", grpc_method(request.uri().path()).to_owned()),
            Api::Http(name) => ("http", name(request.uri().path()).to_owned()),
        };
        let grpc = matches!(self.layer.api, Api::Grpc);
        let metrics = self.layer.metrics.clone();
        let start = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                Ok(r) if grpc => match r.headers().get("grpc-status").and_then(|v| v.to_str().ok()) {
                    Some(c) => grpc_code_name(c),
                    None => "OK",
                }
                .to_owned(),
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => "transport_error".to_owned(),
            };
            metrics.record(api, &method, &code, start.elapsed().as_secs_f64());
            response
        })
    }
}

/// The name of a numeric gRPC status code (`"14"` → `UNAVAILABLE`).
fn grpc_code_name(code: &str) -> &'static str {
    match code {
        "0" => "OK",
        "1" => "CANCELLED",
        "2" => "UNKNOWN",
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "5" => "NOT_FOUND",
        "6" => "ALREADY_EXISTS",
        "7" => "PERMISSION_DENIED",
        "8" => "RESOURCE_EXHAUSTED",
        "9" => "FAILED_PRECONDITION",
        "10" => "ABORTED",
        "11" => "OUT_OF_RANGE",
        "12" => "UNIMPLEMENTED",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        "15" => "DATA_LOSS",
        "16" => "UNAUTHENTICATED",
        _ => "INVALID_CODE",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = Metrics::default();
        m.record("grpc", "Cascade/CheckSession", "OK", 0.0003);
        m.record("grpc", "Cascade/CheckSession", "OK", 0.02);
        m.record("grpc", "Cascade/CheckSession", "UNAVAILABLE", 20.0);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out
            .contains("cascade_requests_total{api=\"grpc\",method=\"Cascade/CheckSession\",code=\"OK\"} 2"));
        assert!(out.contains("code=\"UNAVAILABLE\"} 1"));
        assert!(out.contains("method=\"Cascade/CheckSession\",le=\"0.0005\"} 1\n"));
        assert!(out.contains("method=\"Cascade/CheckSession\",le=\"0.025\"} 2\n"));
        assert!(out.contains("method=\"Cascade/CheckSession\",le=\"10\"} 2\n"));
        assert!(out.contains("method=\"Cascade/CheckSession\",le=\"+Inf\"} 3\n"));
        assert!(out.contains(
            "cascade_request_duration_seconds_count{api=\"grpc\",method=\"Cascade/CheckSession\"} 3"
        ));
    }

    #[test]
    fn series_are_bounded() {
        let m = Metrics::default();
        for i in 0..(SERIES_MAX * 2) {
            m.record("http", &format!("m{i}"), "200", 0.001);
        }
        assert_eq!(m.counts.read().unwrap().len(), SERIES_MAX + 1);
        assert_eq!(m.durations.read().unwrap().len(), SERIES_MAX + 1);
        let mut out = String::new();
        m.render(&mut out);
        let other = format!("method=\"other\",code=\"200\"}} {}", SERIES_MAX);
        assert!(out.contains(&other), "{out}");
    }

    #[test]
    fn grpc_methods_come_from_known_services_only() {
        assert_eq!(grpc_method("/cascade.v1.Cascade/CheckSession"), "Cascade/CheckSession");
        assert_eq!(grpc_method("/evil.Service/x"), "other");
        assert_eq!(grpc_method(&format!("/cascade.v1.{}", "x".repeat(100))), "other");
    }
}

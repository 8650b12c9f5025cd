//! The gateway's Prometheus metrics, per deployment and replica. Label values come only from the
//! head's deployments (a request for an unknown model is counted under `deployment=""`), so a
//! client cannot make up series.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub deployment: String,
    pub replica: String,
    /// The HTTP status the client got.
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaLabels {
    pub deployment: String,
    pub replica: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub deployment: String,
    pub replica: String,
    /// `connect`, `upstream_5xx`, `reset_before_first_byte`, `reset_while_streaming`, ...
    pub kind: String,
}

#[derive(Clone, Copy)]
pub struct Buckets;

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        // 1 ms to ~2 min.
        Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 18))
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub retries: Family<ReplicaLabels, Counter>,
    pub in_flight: Family<ReplicaLabels, Gauge>,
    pub latency: Family<ReplicaLabels, Histogram, Buckets>,
    pub ttfb: Family<ReplicaLabels, Histogram, Buckets>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut m = Metrics {
            registry: Registry::default(),
            requests: Family::default(),
            errors: Family::default(),
            retries: Family::default(),
            in_flight: Family::default(),
            latency: Family::new_with_constructor(Buckets),
            ttfb: Family::new_with_constructor(Buckets),
        };
        let r = &mut m.registry;
        r.register(
            "tessera_gateway_requests",
            "Requests answered, by deployment, replica and status",
            m.requests.clone(),
        );
        r.register(
            "tessera_gateway_request_errors",
            "Requests to a replica that failed, by kind (a failure before the first byte is retried elsewhere)",
            m.errors.clone(),
        );
        r.register("tessera_gateway_retries", "Requests sent again to another replica", m.retries.clone());
        r.register("tessera_gateway_in_flight", "Requests in flight to each replica", m.in_flight.clone());
        r.register_with_unit(
            "tessera_gateway_request_duration",
            "Time from the request to the end of its response",
            prometheus_client::registry::Unit::Seconds,
            m.latency.clone(),
        );
        r.register_with_unit(
            "tessera_gateway_time_to_first_byte",
            "Time from the request to the first byte of its response body",
            prometheus_client::registry::Unit::Seconds,
            m.ttfb.clone(),
        );
        m
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

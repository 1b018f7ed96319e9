//! The proxy's Prometheus metrics (names from the contract in DESIGN.md), registered on the
//! registry the binary creates and passes in.

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use crate::route::Site;

/// Latency buckets for forwarded requests and probes: 0.5 ms .. 30 s.
const BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Every metric the proxy exports.
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    /// `gsb_active_site{site}`: 1 for the site serving traffic, 0 for the other.
    pub active_site: IntGaugeVec,
    /// `gsb_site_state{site,state}`: 1 for the site's current verdict (healthy/degraded/down).
    pub site_state: IntGaugeVec,
    /// `gsb_component_up{site,component}`: 1 when the component's probe is up (after rise/fall).
    pub component_up: IntGaugeVec,
    /// `gsb_probe_duration_seconds{site,component}`.
    pub probe_duration: HistogramVec,
    /// `gsb_failovers_total{from,to,reason}`: every move of the active site.
    pub failovers: IntCounterVec,
    /// `gsb_requests_total{site,code}`: answers sent to clients, by the site that served them.
    pub requests: IntCounterVec,
    /// `gsb_request_duration_seconds{site}`: time to response headers.
    pub request_duration: HistogramVec,
    /// `gsb_upstream_errors_total{site,kind}`: connect, timeout, reset, protocol, ...
    pub upstream_errors: IntCounterVec,
    /// `gsb_retries_total{from,to}`: requests retried on the other site.
    pub retries: IntCounterVec,
    /// `gsb_degraded_alert{site}`: 1 while a site is degraded (partial failure, needs an operator).
    pub degraded_alert: IntGaugeVec,
    /// `gsb_forced_state`: 1 while an operator's forced route (failover/pin/manual failback) holds.
    pub forced: IntGauge,
    /// `gsb_client_connections`: client connections currently open.
    pub client_connections: IntGauge,
    /// `gsb_failback_blocked`: 1 while failback waits for the replicator's backlog to drain.
    pub failback_blocked: IntGauge,
    /// `gsb_probe_round_duration_seconds`: one probe round of both sites.
    pub probe_round: Histogram,
    /// `gsb_proxy_ready`: 0 while `/healthz` answers 503 (e.g. cut off from the active site).
    pub ready: IntGauge,
    /// The fleet's metrics, registered only with `[coordination]`.
    pub fleet: Option<FleetMetrics>,
}

/// The fleet metrics (fleet mode only, so a single proxy never alerts on a missing etcd).
#[derive(Clone, Debug)]
pub struct FleetMetrics {
    /// `gsb_coordination_up`: 1 while a session with etcd holds.
    pub up: IntGauge,
    /// `gsb_fleet_decider`: 1 on the proxy that decides.
    pub decider: IntGauge,
    /// `gsb_fleet_members{state="fresh"|"stale"}`: members by the age of their vote.
    pub members: IntGaugeVec,
    /// `gsb_fleet_votes{site,verdict}`: fresh votes per site and verdict (`unknown` included).
    pub votes: IntGaugeVec,
    /// `gsb_fleet_decision_revision`: the etcd revision of the decision this proxy routes on.
    pub decision_revision: IntGauge,
    /// `gsb_fleet_fenced_writes_total`: this proxy's writes refused by the fence.
    pub fenced_writes: IntCounter,
    /// `gsb_fleet_dissent{member,region,site}`: 1 for a member that sees a site down while the
    /// fleet does not (its own path to that site is broken).
    pub dissent: IntGaugeVec,
}

impl ProxyMetrics {
    /// Creates and registers every metric on `registry` (the fleet's too with `fleet`).
    pub fn register(registry: &Registry, fleet: bool) -> prometheus::Result<Self> {
        fn gauge_vec(
            r: &Registry,
            name: &str,
            help: &str,
            labels: &[&str],
        ) -> prometheus::Result<IntGaugeVec> {
            let m = IntGaugeVec::new(Opts::new(name, help), labels)?;
            r.register(Box::new(m.clone()))?;
            Ok(m)
        }
        fn counter_vec(
            r: &Registry,
            name: &str,
            help: &str,
            labels: &[&str],
        ) -> prometheus::Result<IntCounterVec> {
            let m = IntCounterVec::new(Opts::new(name, help), labels)?;
            r.register(Box::new(m.clone()))?;
            Ok(m)
        }
        fn hist_vec(
            r: &Registry,
            name: &str,
            help: &str,
            labels: &[&str],
        ) -> prometheus::Result<HistogramVec> {
            let m = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()),
                labels,
            )?;
            r.register(Box::new(m.clone()))?;
            Ok(m)
        }
        fn gauge(r: &Registry, name: &str, help: &str) -> prometheus::Result<IntGauge> {
            let m = IntGauge::new(name, help)?;
            r.register(Box::new(m.clone()))?;
            Ok(m)
        }
        let probe_round = Histogram::with_opts(
            HistogramOpts::new(
                "gsb_probe_round_duration_seconds",
                "Duration of one probe round of both sites.",
            )
            .buckets(BUCKETS.to_vec()),
        )?;
        registry.register(Box::new(probe_round.clone()))?;
        let m = ProxyMetrics {
            active_site: gauge_vec(
                registry,
                "gsb_active_site",
                "1 for the site serving traffic.",
                &["site"],
            )?,
            site_state: gauge_vec(
                registry,
                "gsb_site_state",
                "1 for each site's current verdict.",
                &["site", "state"],
            )?,
            component_up: gauge_vec(
                registry,
                "gsb_component_up",
                "1 when a site component is up.",
                &["site", "component"],
            )?,
            probe_duration: hist_vec(
                registry,
                "gsb_probe_duration_seconds",
                "Duration of one component probe.",
                &["site", "component"],
            )?,
            failovers: counter_vec(
                registry,
                "gsb_failovers_total",
                "Moves of the active site.",
                &["from", "to", "reason"],
            )?,
            requests: counter_vec(
                registry,
                "gsb_requests_total",
                "Responses sent to clients.",
                &["site", "code"],
            )?,
            request_duration: hist_vec(
                registry,
                "gsb_request_duration_seconds",
                "Time from request to response headers.",
                &["site"],
            )?,
            upstream_errors: counter_vec(
                registry,
                "gsb_upstream_errors_total",
                "Failed exchanges with a site.",
                &["site", "kind"],
            )?,
            retries: counter_vec(
                registry,
                "gsb_retries_total",
                "Requests retried on the other site.",
                &["from", "to"],
            )?,
            degraded_alert: gauge_vec(
                registry,
                "gsb_degraded_alert",
                "1 while a site is degraded (partial failure).",
                &["site"],
            )?,
            forced: gauge(
                registry,
                "gsb_forced_state",
                "1 while an operator's forced route holds.",
            )?,
            client_connections: gauge(
                registry,
                "gsb_client_connections",
                "Client connections open.",
            )?,
            failback_blocked: gauge(
                registry,
                "gsb_failback_blocked",
                "1 while failback waits for replication to drain.",
            )?,
            probe_round,
            ready: gauge(
                registry,
                "gsb_proxy_ready",
                "0 while this proxy reports itself not ready (GET /healthz 503).",
            )?,
            fleet: if fleet {
                Some(FleetMetrics {
                    up: gauge(
                        registry,
                        "gsb_coordination_up",
                        "1 while this proxy has a session with the fleet's etcd.",
                    )?,
                    decider: gauge(
                        registry,
                        "gsb_fleet_decider",
                        "1 on the proxy that decides for the fleet.",
                    )?,
                    members: gauge_vec(
                        registry,
                        "gsb_fleet_members",
                        "Fleet members by the age of their vote.",
                        &["state"],
                    )?,
                    votes: gauge_vec(
                        registry,
                        "gsb_fleet_votes",
                        "Fresh votes per site and verdict.",
                        &["site", "verdict"],
                    )?,
                    decision_revision: gauge(
                        registry,
                        "gsb_fleet_decision_revision",
                        "etcd revision of the fleet decision this proxy routes on.",
                    )?,
                    fenced_writes: {
                        let c = IntCounter::new(
                            "gsb_fleet_fenced_writes_total",
                            "Writes of this proxy refused by the decision fence.",
                        )?;
                        registry.register(Box::new(c.clone()))?;
                        c
                    },
                    dissent: gauge_vec(
                        registry,
                        "gsb_fleet_dissent",
                        "1 for a member that sees a site down while the fleet does not.",
                        &["member", "region", "site"],
                    )?,
                })
            } else {
                None
            },
        };
        m.ready.set(1);
        for site in Site::ALL {
            m.active_site.with_label_values(&[site.as_str()]).set(0);
            m.degraded_alert.with_label_values(&[site.as_str()]).set(0);
        }
        Ok(m)
    }
}

//! Counters and gauges, and their Prometheus text rendering.
//!
//! The loop bumps plain integers (no atomics, no locks: it is the only thread that
//! touches them); a scrape of the separate metrics listener renders them with the gauges
//! the server computes at that moment. Pure: no I/O here.

use crate::auth::TokenError;
use crate::event::Kind;
use crate::process_stats::ProcessStats;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Every token refusal cause, in a fixed order for the counters.
pub const TOKEN_ERRORS: [TokenError; 8] = [
    TokenError::Malformed,
    TokenError::Algorithm,
    TokenError::Signature,
    TokenError::Expired,
    TokenError::NotYetValid,
    TokenError::WrongRepo,
    TokenError::ClientTokenOnEvents,
    TokenError::BadClaim,
];

fn token_index(e: TokenError) -> usize {
    TOKEN_ERRORS.iter().position(|t| *t == e).unwrap_or(0)
}

const KINDS: [Kind; 4] = [
    Kind::RepoUpdate,
    Kind::FileLockChanged,
    Kind::FolderPermChanged,
    Kind::CommentUpdate,
];

/// Upper bounds (seconds) of the loop turn time histogram.
const TURN_BUCKETS: [f64; 7] = [0.000_05, 0.000_2, 0.001, 0.005, 0.02, 0.1, 1.0];

/// Upper bounds (seconds) of the flush queue wait histogram (measured in whole ms, so
/// the first bucket holds everything flushed in the turn that queued it).
const FLUSH_WAIT_BUCKETS: [f64; 7] = [0.001, 0.005, 0.02, 0.05, 0.1, 0.5, 1.0];

/// A Prometheus histogram with fixed bucket bounds (cumulative counts).
#[derive(Debug, Clone)]
pub struct Histogram {
    bounds: [f64; 7],
    buckets: [u64; 7],
    count: u64,
    sum: f64,
}

impl Histogram {
    const fn new(bounds: [f64; 7]) -> Histogram {
        Histogram {
            bounds,
            buckets: [0; 7],
            count: 0,
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, seconds: f64) {
        self.count += 1;
        self.sum += seconds;
        for (bound, n) in self.bounds.iter().zip(self.buckets.iter_mut()) {
            if seconds <= *bound {
                *n += 1;
            }
        }
    }

    /// The `_bucket`, `_sum` and `_count` samples.
    fn samples(&self) -> Vec<(String, String)> {
        let mut out: Vec<_> = self
            .bounds
            .iter()
            .zip(self.buckets.iter())
            .map(|(b, n)| (format!("_bucket{{le=\"{b}\"}}"), n.to_string()))
            .collect();
        out.push(("_bucket{le=\"+Inf\"}".into(), self.count.to_string()));
        out.push(("_sum".into(), format!("{:.6}", self.sum)));
        out.push(("_count".into(), self.count.to_string()));
        out
    }
}

/// Everything counted since start.
#[derive(Debug, Clone)]
pub struct Stats {
    pub accepted: u64,
    pub http_requests: u64,
    events: [u64; 4],
    pub events_ignored: u64,
    pub events_invalid: u64,
    /// `/events` requests refused because the sender is not in `events_allow`.
    pub events_forbidden: u64,
    pub deliveries: u64,
    /// Times unsent output reached `max_output_bytes` and ingest paused.
    pub output_budget_hits: u64,
    event_token_rejections: [u64; 8],
    client_token_rejections: [u64; 8],
    closes: BTreeMap<&'static str, u64>,
    turns: Histogram,
    /// How long websockets waited in the flush queue.
    pub flush_wait: Histogram,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            accepted: 0,
            http_requests: 0,
            events: [0; 4],
            events_ignored: 0,
            events_invalid: 0,
            events_forbidden: 0,
            deliveries: 0,
            output_budget_hits: 0,
            event_token_rejections: [0; 8],
            client_token_rejections: [0; 8],
            closes: BTreeMap::new(),
            turns: Histogram::new(TURN_BUCKETS),
            flush_wait: Histogram::new(FLUSH_WAIT_BUCKETS),
        }
    }
}

impl Stats {
    pub fn event(&mut self, kind: Kind) {
        if let Some(n) = KINDS
            .iter()
            .position(|k| *k == kind)
            .and_then(|i| self.events.get_mut(i))
        {
            *n += 1;
        }
    }

    pub fn event_token_rejected(&mut self, e: TokenError) {
        if let Some(n) = self.event_token_rejections.get_mut(token_index(e)) {
            *n += 1;
        }
    }

    pub fn client_token_rejected(&mut self, e: TokenError) {
        if let Some(n) = self.client_token_rejections.get_mut(token_index(e)) {
            *n += 1;
        }
    }

    pub fn closed(&mut self, reason: &'static str) {
        *self.closes.entry(reason).or_default() += 1;
    }

    /// Records how long one loop turn took.
    pub fn turn(&mut self, seconds: f64) {
        self.turns.observe(seconds);
    }
}

/// What the server is holding right now.
#[derive(Debug, Default, Clone)]
pub struct Gauges {
    pub http_connections: u64,
    pub websocket_connections: u64,
    pub closing_connections: u64,
    pub subscriptions: u64,
    pub repos: u64,
    pub held_events: u64,
    pub pending_group_lookups: u64,
    /// The group gate's counters (lookups, failures, drops) since start.
    pub groups: crate::gate::GroupCounts,
    /// Websockets with output waiting for their turn in the time-sliced flush.
    pub flush_queue: u64,
    /// Memory held for unsent websocket output (frames and queue entries).
    pub output_bytes: u64,
    /// Frames queued on websockets and not yet written.
    pub pending_deliveries: u64,
    /// Output is over `max_output_bytes`: no new events are taken.
    pub output_over_budget: bool,
    /// Seconds spent over `max_output_bytes` since start, the current episode included.
    pub output_over_budget_seconds: f64,
    /// HTTP connections waiting for the server to take events again.
    pub ingest_waiting: u64,
    pub accept_paused: bool,
    pub draining: bool,
    pub group_database: bool,
    /// `max_connections` as configured (or derived from the open-file limit).
    pub max_connections: u64,
    /// `max_output_bytes` as configured: the budget `output_bytes` is held to.
    pub max_output_bytes: u64,
    /// CPU, memory and descriptors, read at scrape time.
    pub process: ProcessStats,
    /// The Redis bus, when configured.
    pub bus: Option<BusGauges>,
}

/// The Redis bus's state and counters.
#[derive(Debug, Default, Clone)]
pub struct BusGauges {
    pub connected: bool,
    pub published: u64,
    pub received: u64,
    pub dropped: u64,
    pub ignored: u64,
    /// Outgoing messages Redis answered PUBLISH for with an error.
    pub refused: u64,
}

/// Renders the Prometheus text exposition format (version 0.0.4).
pub fn render(s: &Stats, g: &Gauges) -> String {
    let mut out = String::with_capacity(4096);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |v: u64| vec![(String::new(), v.to_string())];
    metric(
        "notification_connections",
        "gauge",
        "Open connections by state.",
        &[
            ("{state=\"http\"}".into(), g.http_connections.to_string()),
            ("{state=\"websocket\"}".into(), g.websocket_connections.to_string()),
            ("{state=\"closing\"}".into(), g.closing_connections.to_string()),
        ],
    );
    metric(
        "notification_subscriptions",
        "gauge",
        "Library subscriptions over all websockets.",
        &one(g.subscriptions),
    );
    metric(
        "notification_repos",
        "gauge",
        "Libraries with at least one subscriber.",
        &one(g.repos),
    );
    metric(
        "notification_accepted_connections_total",
        "counter",
        "Connections accepted.",
        &one(s.accepted),
    );
    metric(
        "notification_http_requests_total",
        "counter",
        "HTTP requests answered.",
        &one(s.http_requests),
    );
    let events: Vec<_> = KINDS
        .iter()
        .zip(s.events.iter())
        .map(|(k, n)| (format!("{{type=\"{}\"}}", k.name()), n.to_string()))
        .collect();
    metric(
        "notification_events_received_total",
        "counter",
        "Events accepted for delivery, by type.",
        &events,
    );
    metric(
        "notification_events_refused_total",
        "counter",
        "/events requests answered without delivery: ignored (200: unknown type, bad content), invalid (500), forbidden (403: sender not in events_allow). Bad tokens are in notification_token_rejections_total.",
        &[
            ("{outcome=\"ignored\"}".into(), s.events_ignored.to_string()),
            ("{outcome=\"invalid\"}".into(), s.events_invalid.to_string()),
            ("{outcome=\"forbidden\"}".into(), s.events_forbidden.to_string()),
        ],
    );
    metric(
        "notification_deliveries_total",
        "counter",
        "Event messages queued to subscribers.",
        &one(s.deliveries),
    );
    let mut rejections = Vec::new();
    for (kind, counts) in [
        ("event", &s.event_token_rejections),
        ("client", &s.client_token_rejections),
    ] {
        for (e, n) in TOKEN_ERRORS.iter().zip(counts.iter()) {
            rejections.push((format!("{{token=\"{kind}\",cause=\"{}\"}}", e.label()), n.to_string()));
        }
    }
    metric(
        "notification_token_rejections_total",
        "counter",
        "Refused tokens by kind and cause.",
        &rejections,
    );
    let closes: Vec<_> = s
        .closes
        .iter()
        .map(|(r, n)| (format!("{{reason=\"{r}\"}}"), n.to_string()))
        .collect();
    metric(
        "notification_closes_total",
        "counter",
        "Connections closed, by reason.",
        &closes,
    );
    metric(
        "notification_group_lookups_total",
        "counter",
        "Group membership lookups sent to the database.",
        &one(g.groups.lookups),
    );
    metric(
        "notification_group_lookup_failures_total",
        "counter",
        "Group lookups that failed after retries.",
        &one(g.groups.lookup_failures),
    );
    metric(
        "notification_group_events_dropped_total",
        "counter",
        "Group-scoped events dropped (no database, failed lookup, too many pending).",
        &one(g.groups.group_events_dropped),
    );
    metric(
        "notification_held_events",
        "gauge",
        "Events waiting behind a group lookup.",
        &one(g.held_events),
    );
    metric(
        "notification_held_events_dropped_total",
        "counter",
        "Events dropped because too many were held.",
        &one(g.groups.held_events_dropped),
    );
    metric(
        "notification_pending_group_lookups",
        "gauge",
        "Group lookups in flight.",
        &one(g.pending_group_lookups),
    );
    metric(
        "notification_flush_queue",
        "gauge",
        "Websockets with output waiting for their turn to be flushed (above 0 only while fan-out outruns the sockets).",
        &one(g.flush_queue),
    );
    metric(
        "notification_output_bytes",
        "gauge",
        "Memory held for delivery, what max_output_bytes bounds: unsent websocket output (shared frames, queue entries, replies, control frames) and events held for a group lookup or released and not yet fanned out.",
        &one(g.output_bytes),
    );
    metric(
        "notification_pending_deliveries",
        "gauge",
        "Frames queued on websockets and not yet written.",
        &one(g.pending_deliveries),
    );
    metric(
        "notification_output_over_budget",
        "gauge",
        "1 while unsent output is over max_output_bytes and no new events are taken.",
        &one(g.output_over_budget as u64),
    );
    metric(
        "notification_output_over_budget_seconds_total",
        "counter",
        "Seconds spent over max_output_bytes (holding /events back), the current episode included.",
        &[(String::new(), format!("{:.3}", g.output_over_budget_seconds))],
    );
    metric(
        "notification_output_budget_hits_total",
        "counter",
        "Times unsent output reached max_output_bytes.",
        &one(s.output_budget_hits),
    );
    metric(
        "notification_ingest_waiting",
        "gauge",
        "HTTP connections holding an /events request until the server takes events again (budget or pacing).",
        &one(g.ingest_waiting),
    );
    metric(
        "notification_group_database_configured",
        "gauge",
        "1 when a group database is configured.",
        &one(g.group_database as u64),
    );
    metric(
        "notification_accept_paused",
        "gauge",
        "1 while accepting is paused (connection cap or no descriptors).",
        &one(g.accept_paused as u64),
    );
    metric(
        "notification_draining",
        "gauge",
        "1 while shutting down.",
        &one(g.draining as u64),
    );
    metric(
        "notification_loop_turn_seconds",
        "histogram",
        "Time the event loop spent per turn (between polls).",
        &s.turns.samples(),
    );
    metric(
        "notification_flush_wait_seconds",
        "histogram",
        "Time a websocket waited in the flush queue for its write (ms resolution; fan-out under load shows here).",
        &s.flush_wait.samples(),
    );
    metric(
        "notification_max_connections",
        "gauge",
        "max_connections: the connection cap (accepting pauses at it).",
        &one(g.max_connections),
    );
    metric(
        "notification_max_output_bytes",
        "gauge",
        "max_output_bytes: the budget for notification_output_bytes (no new events are taken at it).",
        &one(g.max_output_bytes),
    );
    metric(
        "notification_build_info",
        "gauge",
        "Always 1; the version of this server in a label.",
        &[(format!("{{version=\"{}\"}}", env!("CARGO_PKG_VERSION")), "1".into())],
    );
    if let Some(bus) = &g.bus {
        metric(
            "notification_bus_connected",
            "gauge",
            "1 while both Redis connections of the bus (subscriber and publisher) are up.",
            &one(bus.connected as u64),
        );
        metric(
            "notification_bus_published_total",
            "counter",
            "Events published to the Redis channel for the other instances.",
            &one(bus.published),
        );
        metric(
            "notification_bus_received_total",
            "counter",
            "Events received from the other instances through the Redis channel.",
            &one(bus.received),
        );
        metric(
            "notification_bus_refused_total",
            "counter",
            "Events Redis refused to publish (an error reply, e.g. an ACL without +publish): delivered locally only.",
            &one(bus.refused),
        );
        metric(
            "notification_bus_dropped_total",
            "counter",
            "Bus messages dropped: outgoing ones while Redis was away too long, incoming ones while the loop fell behind.",
            &one(bus.dropped),
        );
        metric(
            "notification_bus_ignored_total",
            "counter",
            "Messages on the Redis channel that were malformed or foreign.",
            &one(bus.ignored),
        );
    }
    for (name, kind, help, value) in g.process.metrics() {
        metric(name, kind, help, &[(String::new(), value)]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let mut s = Stats::default();
        s.event(Kind::RepoUpdate);
        s.event(Kind::RepoUpdate);
        s.client_token_rejected(TokenError::Expired);
        s.events_forbidden = 4;
        s.closed("pong_timeout");
        s.turn(0.0001);
        s.turn(2.0);
        let g = Gauges {
            websocket_connections: 3,
            ..Gauges::default()
        };
        let text = render(&s, &g);
        assert!(text.contains("notification_connections{state=\"websocket\"} 3\n"));
        assert!(text.contains("notification_events_received_total{type=\"repo-update\"} 2\n"));
        assert!(text.contains("notification_token_rejections_total{token=\"client\",cause=\"expired\"} 1\n"));
        assert!(text.contains("notification_closes_total{reason=\"pong_timeout\"} 1\n"));
        assert!(text.contains("notification_events_refused_total{outcome=\"forbidden\"} 4\n"));
        assert!(text.contains("notification_loop_turn_seconds_bucket{le=\"0.0002\"} 1\n"));
        assert!(text.contains("notification_loop_turn_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("# TYPE notification_deliveries_total counter\n"));
        // Every sample line is "name{labels} value" or "name value".
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(
                name.starts_with("notification_") || name.starts_with("process_"),
                "{line}"
            );
        }
    }

    #[test]
    fn renders_limits_build_info_and_process_metrics() {
        let g = Gauges {
            max_connections: 65472,
            max_output_bytes: 67_108_864,
            process: ProcessStats {
                open_fds: 9,
                max_fds: 65536,
                ..ProcessStats::default()
            },
            ..Gauges::default()
        };
        let text = render(&Stats::default(), &g);
        assert!(text.contains("notification_max_connections 65472\n"));
        assert!(text.contains("notification_max_output_bytes 67108864\n"));
        let version = env!("CARGO_PKG_VERSION");
        assert!(text.contains(&format!("notification_build_info{{version=\"{version}\"}} 1\n")));
        for line in [
            "# TYPE process_cpu_seconds_total counter\n",
            "process_open_fds 9\n",
            "process_max_fds 65536\n",
            "# TYPE process_start_time_seconds gauge\n",
            "# TYPE process_resident_memory_bytes gauge\n",
            "# TYPE process_virtual_memory_bytes gauge\n",
        ] {
            assert!(text.contains(line), "{line:?} missing in\n{text}");
        }
        // No bus configured: no bus metrics (an alert on them stays quiet).
        assert!(!text.contains("notification_bus_"), "{text}");
    }

    #[test]
    fn renders_the_bus_when_configured() {
        let g = Gauges {
            bus: Some(BusGauges {
                connected: true,
                published: 5,
                received: 7,
                dropped: 1,
                ignored: 2,
                refused: 3,
            }),
            ..Gauges::default()
        };
        let text = render(&Stats::default(), &g);
        for line in [
            "notification_bus_connected 1\n",
            "notification_bus_published_total 5\n",
            "notification_bus_received_total 7\n",
            "notification_bus_dropped_total 1\n",
            "notification_bus_ignored_total 2\n",
            "notification_bus_refused_total 3\n",
            "# TYPE notification_bus_received_total counter\n",
        ] {
            assert!(text.contains(line), "{line:?} missing in\n{text}");
        }
        let down = Gauges {
            bus: Some(BusGauges::default()),
            ..Gauges::default()
        };
        assert!(render(&Stats::default(), &down).contains("notification_bus_connected 0\n"));
    }
}

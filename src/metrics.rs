//! Every metric rotd exposes, in one place: names, help texts, and the Prometheus
//! text-format rendering served on `[daemon] metrics` `/metrics`.
//!
//! Labels carry secret NAMES and outcomes only — never a value, a fingerprint, a user
//! or a key id. Counters only go up for the life of the process.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

pub const ROTATIONS_TOTAL: &str = "rotd_rotations_total";
pub const LAST_SUCCESS: &str = "rotd_last_success_timestamp_seconds";
pub const SECRET_AGE: &str = "rotd_secret_age_seconds";
pub const NEXT_ROTATION: &str = "rotd_next_rotation_timestamp_seconds";
pub const ROTATION_DURATION: &str = "rotd_rotation_duration_seconds";
pub const PENDING_RETIREMENTS: &str = "rotd_pending_retirements";
pub const SCHEDULE_ERRORS: &str = "rotd_schedule_errors";
pub const RELOADS_TOTAL: &str = "rotd_schedule_reloads_total";
pub const REMOTE_REFUSED: &str = "rotd_remote_refused";
pub const CONSUMERS_LAGGING: &str = "rotd_consumers_lagging";

/// The metrics of `rotd agent` (its own `/metrics`, `metrics = "ADDR:PORT"` in
/// agent.toml; rendered by `agent::state::render_metrics`).
pub mod agent {
    pub const PASSES_TOTAL: &str = "rotd_agent_passes_total";
    pub const PASSES_TOTAL_HELP: &str =
        "Agent passes (sync, deliver, acknowledge) since start, by result.";
    pub const DELIVERIES_TOTAL: &str = "rotd_agent_deliveries_total";
    pub const DELIVERIES_TOTAL_HELP: &str =
        "Deliveries of a new rotation (files written, reloads, probe) since start, by result.";
    pub const LAST_PASS: &str = "rotd_agent_last_pass_timestamp_seconds";
    pub const LAST_PASS_HELP: &str = "When the last pass ended (Unix time).";
    pub const LAST_SUCCESS: &str = "rotd_agent_last_success_timestamp_seconds";
    pub const LAST_SUCCESS_HELP: &str = "When the last pass that succeeded ended (Unix time).";
    pub const REMOTE_REFUSED: &str = "rotd_agent_remote_refused";
    pub const REMOTE_REFUSED_HELP: &str =
        "1 while the store remote holds commits this host refuses to adopt (unsigned, foreign-signed, rewritten).";
    pub const DELIVERED: &str = "rotd_agent_delivered_timestamp_seconds";
    pub const DELIVERED_HELP: &str =
        "When the rotation this host holds of a secret was delivered (Unix time).";
    pub const FAILING: &str = "rotd_agent_delivery_failing";
    pub const FAILING_HELP: &str =
        "1 while the last delivery of the store's rotation of a secret failed (the previous files are in place, nothing is acknowledged).";
    pub const UNACKNOWLEDGED: &str = "rotd_agent_unacknowledged";
    pub const UNACKNOWLEDGED_HELP: &str =
        "1 while the rotation this host delivered is not what the remote's acknowledgement of this host names.";
}

/// Histogram buckets of a rotation's duration (seconds).
const BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

#[derive(Default)]
struct Inner {
    rotations: BTreeMap<(String, String), u64>,
    durations: BTreeMap<String, Histogram>,
    reloads: BTreeMap<String, u64>,
}

/// The daemon's counters and histograms; gauges are computed at scrape time.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// One secret's gauges (unix times and seconds).
#[derive(Default, Clone, Copy)]
pub struct SecretGauges {
    pub last_success: Option<i64>,
    pub age: Option<i64>,
    pub next_rotation: Option<i64>,
    /// Consumer hosts that have not acknowledged the current rotation while the old
    /// credential waits (None: the secret has no consumers).
    pub consumers_lagging: Option<usize>,
}

/// Gauge values read at scrape time.
#[derive(Default)]
pub struct Gauges {
    pub secrets: BTreeMap<String, SecretGauges>,
    pub pending_retirements: usize,
    pub schedule_errors: usize,
    /// The store remote holds a state this clone refused to adopt.
    pub remote_refused: bool,
}

impl Metrics {
    pub fn rotation(&self, secret: &str, outcome: &str, seconds: f64) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *m.rotations
            .entry((secret.to_owned(), outcome.to_owned()))
            .or_default() += 1;
        let h = m
            .durations
            .entry(secret.to_owned())
            .or_insert_with(|| Histogram {
                counts: vec![0; BUCKETS.len()],
                ..Default::default()
            });
        for (i, b) in BUCKETS.iter().enumerate() {
            if seconds <= *b {
                h.counts[i] += 1;
            }
        }
        h.sum += seconds;
        h.count += 1;
    }

    pub fn reload(&self, outcome: &str) {
        let mut m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        *m.reloads.entry(outcome.to_owned()).or_default() += 1;
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self, g: &Gauges) -> String {
        let m = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        let head = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut out,
            ROTATIONS_TOTAL,
            "counter",
            "Rotations finished, by secret and outcome.",
        );
        for ((s, o), v) in &m.rotations {
            let _ = writeln!(
                out,
                "{ROTATIONS_TOTAL}{{secret=\"{}\",outcome=\"{}\"}} {v}",
                esc(s),
                esc(o)
            );
        }
        head(
            &mut out,
            ROTATION_DURATION,
            "histogram",
            "Duration of a rotation, from plan to the succeeded or rolled-back commit.",
        );
        for (s, h) in &m.durations {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "{ROTATION_DURATION}_bucket{{secret=\"{}\",le=\"{b}\"}} {}",
                    esc(s),
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "{ROTATION_DURATION}_bucket{{secret=\"{}\",le=\"+Inf\"}} {}",
                esc(s),
                h.count
            );
            let _ = writeln!(
                out,
                "{ROTATION_DURATION}_sum{{secret=\"{}\"}} {}",
                esc(s),
                h.sum
            );
            let _ = writeln!(
                out,
                "{ROTATION_DURATION}_count{{secret=\"{}\"}} {}",
                esc(s),
                h.count
            );
        }
        head(
            &mut out,
            LAST_SUCCESS,
            "gauge",
            "Time of the last succeeded rotation or import of the current credential.",
        );
        for (s, sg) in &g.secrets {
            if let Some(t) = sg.last_success {
                let _ = writeln!(out, "{LAST_SUCCESS}{{secret=\"{}\"}} {t}", esc(s));
            }
        }
        head(
            &mut out,
            SECRET_AGE,
            "gauge",
            "Age of the current credential.",
        );
        for (s, sg) in &g.secrets {
            if let Some(a) = sg.age {
                let _ = writeln!(out, "{SECRET_AGE}{{secret=\"{}\"}} {a}", esc(s));
            }
        }
        head(
            &mut out,
            NEXT_ROTATION,
            "gauge",
            "When the scheduler next starts a rotation (jitter included).",
        );
        for (s, sg) in &g.secrets {
            if let Some(n) = sg.next_rotation {
                let _ = writeln!(out, "{NEXT_ROTATION}{{secret=\"{}\"}} {n}", esc(s));
            }
        }
        head(
            &mut out,
            CONSUMERS_LAGGING,
            "gauge",
            "Consumer hosts that have not acknowledged the current rotation; the old credential is kept for them (waiting-acks).",
        );
        for (s, sg) in &g.secrets {
            if let Some(n) = sg.consumers_lagging {
                let _ = writeln!(out, "{CONSUMERS_LAGGING}{{secret=\"{}\"}} {n}", esc(s));
            }
        }
        head(
            &mut out,
            PENDING_RETIREMENTS,
            "gauge",
            "Old credentials still valid, waiting for their grace to pass.",
        );
        let _ = writeln!(out, "{PENDING_RETIREMENTS} {}", g.pending_retirements);
        head(
            &mut out,
            SCHEDULE_ERRORS,
            "gauge",
            "Schedule files that are invalid now (their previous valid version keeps running).",
        );
        let _ = writeln!(out, "{SCHEDULE_ERRORS} {}", g.schedule_errors);
        head(
            &mut out,
            REMOTE_REFUSED,
            "gauge",
            "1 while the store remote holds commits rotd refuses to adopt (unsigned, signed by a key not allowed, or not a fast-forward); the local store is kept.",
        );
        let _ = writeln!(out, "{REMOTE_REFUSED} {}", u8::from(g.remote_refused));
        head(
            &mut out,
            RELOADS_TOTAL,
            "counter",
            "Schedule reloads, by outcome.",
        );
        for (o, v) in &m.reloads {
            let _ = writeln!(out, "{RELOADS_TOTAL}{{outcome=\"{}\"}} {v}", esc(o));
        }
        out
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histograms_and_gauges() {
        let m = Metrics::default();
        m.rotation("a", "succeeded", 0.3);
        m.rotation("a", "rolled-back", 2.0);
        let mut g = Gauges::default();
        let sg = SecretGauges {
            last_success: Some(100),
            age: Some(5),
            next_rotation: Some(200),
            consumers_lagging: None,
        };
        g.secrets.insert("a".into(), sg);
        let text = m.render(&g);
        assert!(text.contains("rotd_rotations_total{secret=\"a\",outcome=\"succeeded\"} 1"));
        assert!(text.contains("rotd_rotation_duration_seconds_bucket{secret=\"a\",le=\"0.5\"} 1"));
        assert!(text.contains("rotd_rotation_duration_seconds_count{secret=\"a\"} 2"));
        assert!(text.contains("rotd_secret_age_seconds{secret=\"a\"} 5"));
        assert!(text.contains("rotd_schedule_errors 0"));
        assert!(text.contains("rotd_remote_refused 0"));
        g.remote_refused = true;
        assert!(m.render(&g).contains("rotd_remote_refused 1"));
    }

    #[test]
    fn consumers_lagging_is_set_only_for_secrets_with_consumers() {
        let m = Metrics::default();
        let mut g = Gauges::default();
        let with = |n| SecretGauges {
            last_success: None,
            age: None,
            next_rotation: None,
            consumers_lagging: n,
        };
        g.secrets.insert("shared".into(), with(Some(2)));
        g.secrets.insert("acked".into(), with(Some(0)));
        g.secrets.insert("local".into(), with(None));
        let text = m.render(&g);
        assert!(text.contains("# TYPE rotd_consumers_lagging gauge"));
        assert!(text.contains("rotd_consumers_lagging{secret=\"shared\"} 2"));
        assert!(text.contains("rotd_consumers_lagging{secret=\"acked\"} 0"));
        assert!(!text.contains("rotd_consumers_lagging{secret=\"local\"}"));
    }
}

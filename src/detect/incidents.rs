//! Per-minute anomaly scoring of each service and incident tracking. Consumes
//! the first emission of every window (requests, error rate, p95 latency per
//! service); produces one [`Anomaly`] per scored (window, service, metric) whose
//! flag is set, and [`Alert`]s per incident, not per minute: one when a service
//! turns anomalous, one when it has been quiet for `recover_windows` windows.
//! A service with no row in a window is scored with zero requests, so traffic
//! drops are seen. Pure code: detectors are the shared [`crate::detect`] ones.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::detect::drift::{DriftConfig, DriftMonitor, DriftRow};
use crate::detect::{Detector, DetectorConfig};
use datafusion::arrow::array::{Float64Array, StringArray, TimestampMillisecondArray};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;

use crate::model::MinuteRow;

/// The series scored per service.
pub const METRICS: [&str; 3] = ["requests", "error_rate", "latency_p95_ms"];

#[derive(Debug, Clone, PartialEq)]
pub struct Anomaly {
    pub window_start_ms: i64,
    pub service: String,
    pub metric: &'static str,
    pub value: f64,
    pub score: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Alert {
    /// "start" or "recover" of an incident; "drift" when a service's hourly
    /// distribution of a feature (in `metrics`) moved from its reference.
    pub kind: &'static str,
    pub service: String,
    /// Window that opened (or closed) the incident.
    pub window_start_ms: i64,
    /// The metrics flagged during the incident so far.
    pub metrics: Vec<&'static str>,
    /// Highest score seen in the incident.
    pub score: f64,
}

/// A service's incident status as the dashboard shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceStatus {
    pub service: String,
    pub anomalous: bool,
    /// Window that opened (or closed) the incident.
    pub since_ms: i64,
    pub metrics: Vec<&'static str>,
    pub score: f64,
}

impl ServiceStatus {
    /// The status an incident's alert sets; `None` for a drift alert (it
    /// leaves the service's incident status as it is).
    pub fn of_alert(a: &Alert) -> Option<Self> {
        (a.kind != "drift").then(|| ServiceStatus {
            service: a.service.clone(),
            anomalous: a.kind == "start",
            since_ms: a.window_start_ms,
            metrics: a.metrics.clone(),
            score: a.score,
        })
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ServiceState {
    detectors: Vec<Detector>,
    incident: Option<Incident>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Incident {
    since_ms: i64,
    #[serde(with = "metric_names")]
    metrics: Vec<&'static str>,
    score: f64,
    quiet: u32,
}

/// [`METRICS`] names stored as strings (unknown ones are dropped when read).
mod metric_names {
    use super::METRICS;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &[&'static str], s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<&'static str>, D::Error> {
        let names = Vec::<String>::deserialize(d)?;
        Ok(names
            .iter()
            .filter_map(|n| METRICS.iter().find(|m| **m == n.as_str()).copied())
            .collect())
    }
}

/// Detectors and incident state of every service seen. The whole state
/// serializes, so scoring can move to another process without warming up
/// again ([`AnomalyTracker::is_compatible`] tells whether a stored one
/// scores as this configuration would).
#[derive(Debug, Serialize, Deserialize)]
pub struct AnomalyTracker {
    cfg: DetectorConfig,
    recover_windows: u32,
    services: BTreeMap<String, ServiceState>,
    last_window: Option<i64>,
    /// Hourly distributions for drift detection (absent in state stored
    /// before it existed: it starts empty).
    #[serde(default)]
    drift: DriftMonitor,
    /// Drift settings (from the configuration, not stored); `None`: off.
    #[serde(skip)]
    drift_cfg: Option<DriftConfig>,
}

impl AnomalyTracker {
    pub fn new(cfg: DetectorConfig, recover_windows: u32) -> Self {
        AnomalyTracker {
            cfg,
            recover_windows: recover_windows.max(1),
            services: BTreeMap::new(),
            last_window: None,
            drift: DriftMonitor::default(),
            drift_cfg: None,
        }
    }

    /// Compares every service's hourly distributions (see [`DriftMonitor`]).
    pub fn with_drift(mut self, cfg: Option<DriftConfig>) -> Self {
        self.drift_cfg = cfg;
        self
    }

    /// The drift settings in force.
    pub fn drift_config(&self) -> Option<&DriftConfig> {
        self.drift_cfg.as_ref()
    }

    /// A tracker with this one's settings and no history.
    pub fn fresh(&self) -> Self {
        AnomalyTracker::new(self.cfg.clone(), self.recover_windows)
            .with_drift(self.drift_cfg.clone())
    }

    /// Adds a scored window's distributions (rows with [`MinuteRow::dist`])
    /// to the hour's; when the window opens a new hour, returns the closed
    /// hour's comparisons and drift alerts. Call after
    /// [`AnomalyTracker::observe_window`] with the same rows.
    pub fn observe_drift(
        &mut self,
        window_start_ms: i64,
        rows: &[&MinuteRow],
    ) -> (Vec<DriftRow>, Vec<Alert>) {
        let Some(cfg) = &self.drift_cfg else {
            return (Vec::new(), Vec::new());
        };
        let (rows, onsets) = self.drift.observe(
            cfg,
            window_start_ms,
            rows.iter()
                .filter_map(|r| Some((r.service.as_str(), r.dist.as_deref()?))),
        );
        let alerts = onsets
            .into_iter()
            .map(|o| Alert {
                kind: "drift",
                service: o.service,
                window_start_ms: o.hour_start_ms,
                metrics: vec![o.feature],
                score: o.psi,
            })
            .collect();
        (rows, alerts)
    }

    /// (service, feature) pairs drifting as of the last closed hour.
    pub fn drifting(&self) -> Vec<(String, String)> {
        self.drift
            .drifting()
            .map(|(s, f)| (s.to_string(), f.to_string()))
            .collect()
    }

    /// Whether this (restored) tracker scores as `other` would.
    pub fn same_settings(&self, other: &AnomalyTracker) -> bool {
        self.is_compatible(&other.cfg, other.recover_windows)
    }

    /// Whether this (restored) tracker was built with the given settings.
    pub fn is_compatible(&self, cfg: &DetectorConfig, recover_windows: u32) -> bool {
        self.cfg == *cfg && self.recover_windows == recover_windows.max(1)
    }

    /// The last window scored.
    pub fn last_window(&self) -> Option<i64> {
        self.last_window
    }

    /// Services tracked.
    pub fn services(&self) -> usize {
        self.services.len()
    }

    /// The names of the services tracked.
    pub fn service_names(&self) -> impl Iterator<Item = &str> {
        self.services.keys().map(String::as_str)
    }

    /// Scores one window's rows (all services of one window_start). Windows
    /// must come in increasing order; an older or repeated one is ignored.
    pub fn observe_window(
        &mut self,
        window_start_ms: i64,
        rows: &[&MinuteRow],
    ) -> (Vec<Anomaly>, Vec<Alert>) {
        if self.last_window.is_some_and(|w| window_start_ms <= w) {
            return (Vec::new(), Vec::new());
        }
        self.last_window = Some(window_start_ms);
        for r in rows {
            if !self.services.contains_key(&r.service) {
                let st = ServiceState {
                    detectors: METRICS
                        .iter()
                        .map(|_| Detector::new(self.cfg.clone()))
                        .collect(),
                    incident: None,
                };
                self.services.insert(r.service.clone(), st);
            }
        }
        let mut anomalies = Vec::new();
        let mut alerts = Vec::new();
        // By name: a scan of the rows per service was quadratic in services.
        let by_service: std::collections::HashMap<&str, &MinuteRow> =
            rows.iter().map(|r| (r.service.as_str(), *r)).collect();
        for (svc, st) in self.services.iter_mut() {
            let row = by_service.get(svc.as_str());
            let values: [Option<f64>; 3] = match row {
                Some(r) => [
                    Some(r.requests as f64),
                    Some(r.error_rate),
                    r.latency_p95_ms,
                ],
                None => [Some(0.0), None, None],
            };
            let mut flagged = Vec::new();
            let mut top = 0.0f64;
            for (i, v) in values.iter().enumerate() {
                let Some(v) = v else { continue };
                let p = st.detectors[i].update(window_start_ms, *v);
                if p.flagged {
                    flagged.push(METRICS[i]);
                    top = top.max(p.score);
                    anomalies.push(Anomaly {
                        window_start_ms,
                        service: svc.clone(),
                        metric: METRICS[i],
                        value: *v,
                        score: p.score,
                    });
                }
            }
            match (&mut st.incident, flagged.is_empty()) {
                (None, false) => {
                    alerts.push(Alert {
                        kind: "start",
                        service: svc.clone(),
                        window_start_ms,
                        metrics: flagged.clone(),
                        score: top,
                    });
                    st.incident = Some(Incident {
                        since_ms: window_start_ms,
                        metrics: flagged,
                        score: top,
                        quiet: 0,
                    });
                }
                (Some(inc), false) => {
                    inc.quiet = 0;
                    inc.score = inc.score.max(top);
                    for m in flagged {
                        if !inc.metrics.contains(&m) {
                            inc.metrics.push(m);
                        }
                    }
                }
                (Some(inc), true) => {
                    inc.quiet += 1;
                    if inc.quiet >= self.recover_windows {
                        alerts.push(Alert {
                            kind: "recover",
                            service: svc.clone(),
                            window_start_ms,
                            metrics: inc.metrics.clone(),
                            score: inc.score,
                        });
                        st.incident = None;
                    }
                }
                (None, true) => {}
            }
        }
        (anomalies, alerts)
    }

    /// Every service's status; one without an incident is `ok` as of the
    /// last window scored.
    pub fn statuses(&self) -> Vec<ServiceStatus> {
        let last = self.last_window.unwrap_or(0);
        self.services
            .iter()
            .map(|(svc, st)| match &st.incident {
                Some(i) => ServiceStatus {
                    service: svc.clone(),
                    anomalous: true,
                    since_ms: i.since_ms,
                    metrics: i.metrics.clone(),
                    score: i.score,
                },
                None => ServiceStatus {
                    service: svc.clone(),
                    anomalous: false,
                    since_ms: last,
                    metrics: Vec::new(),
                    score: 0.0,
                },
            })
            .collect()
    }

    /// Services currently in an incident.
    pub fn open_incidents(&self) -> Vec<&str> {
        self.services
            .iter()
            .filter(|(_, s)| s.incident.is_some())
            .map(|(k, _)| k.as_str())
            .collect()
    }
}

/// The `anomalies` batch of flagged points.
pub fn anomalies_batch(a: &[Anomaly]) -> Result<RecordBatch, ArrowError> {
    RecordBatch::try_new(
        crate::model::anomalies_schema(),
        vec![
            Arc::new(
                TimestampMillisecondArray::from(
                    a.iter().map(|x| x.window_start_ms).collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from(
                a.iter().map(|x| x.service.as_str()).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                a.iter().map(|x| x.metric).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                a.iter().map(|x| x.value).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                a.iter().map(|x| x.score).collect::<Vec<_>>(),
            )),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A detector that warms up in 20 windows.
    fn quick_config() -> DetectorConfig {
        DetectorConfig {
            threshold: 0.8,
            warmup: 20,
            window: 60,
            suppress: 5,
            ..DetectorConfig::default()
        }
    }

    fn row(ws: i64, svc: &str, requests: i64, errors: i64) -> MinuteRow {
        MinuteRow {
            window_start_ms: ws,
            service: svc.into(),
            requests,
            errors,
            client_errors: 0,
            error_rate: errors as f64 / requests.max(1) as f64,
            latency_mean_ms: Some(30.0),
            latency_p50_ms: Some(25.0),
            latency_p95_ms: Some(60.0 + (ws / 60_000 % 3) as f64),
            latency_p99_ms: Some(90.0),
            latency_max_ms: Some(120.0),
            unique_users: 10,
            is_final: true,
            partition: -1,
            dist: None,
        }
    }

    #[test]
    fn a_restored_tracker_scores_on_exactly_as_the_original() {
        let cfg = quick_config();
        let window = |m: i64| {
            let ws = m * 60_000;
            let noise = (m * 7919 % 11) - 5;
            let errors = if (70..74).contains(&m) {
                400
            } else {
                5 + noise.abs() % 3
            };
            vec![
                row(ws, "a", 1000 + noise, errors),
                row(ws, "b", 500 - noise, 2),
            ]
        };
        let mut t = AnomalyTracker::new(cfg.clone(), 8);
        for m in 0..68 {
            let rows = window(m);
            t.observe_window(m * 60_000, &rows.iter().collect::<Vec<_>>());
        }
        let mut bytes = Vec::new();
        ciborium::into_writer(&t, &mut bytes).unwrap();
        let mut r: AnomalyTracker = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert!(r.is_compatible(&cfg, 8));
        assert!(!r.is_compatible(&DetectorConfig::default(), 8));
        assert_eq!((r.last_window(), r.services()), (Some(67 * 60_000), 2));
        let mut fresh = AnomalyTracker::new(cfg, 8);
        let (mut got, mut want, mut cold) = (Vec::new(), Vec::new(), Vec::new());
        for m in 68..100 {
            let rows = window(m);
            let refs: Vec<&MinuteRow> = rows.iter().collect();
            want.push(t.observe_window(m * 60_000, &refs));
            got.push(r.observe_window(m * 60_000, &refs));
            cold.push(fresh.observe_window(m * 60_000, &refs));
        }
        assert_eq!(got, want, "restored state scores as the original");
        let starts = |v: &[(Vec<Anomaly>, Vec<Alert>)]| {
            v.iter()
                .flat_map(|(_, al)| al.iter().filter(|a| a.kind == "start"))
                .map(|a| a.window_start_ms / 60_000)
                .collect::<Vec<_>>()
        };
        assert_eq!(starts(&got), vec![70], "the incident is flagged at once");
        assert!(
            starts(&cold).is_empty(),
            "a cold tracker is still warming up"
        );
    }

    #[test]
    fn one_alert_per_incident_start_and_recovery_and_missing_rows_count_as_zero() {
        let cfg = quick_config();
        let mut t = AnomalyTracker::new(cfg, 8);
        let mut alerts = Vec::new();
        for m in 0..120i64 {
            let ws = m * 60_000;
            let noise = (m * 7919 % 11) - 5;
            let a = row(ws, "a", 1000 + noise, 5 + noise.abs() % 3);
            // service b disappears for one minute at 90: a traffic drop
            let b = row(ws, "b", 500 + noise, 2);
            let errors_a = if (60..64).contains(&m) { 400 } else { a.errors };
            let a = MinuteRow {
                errors: errors_a,
                error_rate: errors_a as f64 / a.requests as f64,
                ..a
            };
            let rows: Vec<&MinuteRow> = if m == 90 { vec![&a] } else { vec![&a, &b] };
            let (_, al) = t.observe_window(ws, &rows);
            alerts.extend(al);
        }
        let a_alerts: Vec<_> = alerts.iter().filter(|x| x.service == "a").collect();
        assert_eq!(a_alerts.len(), 2, "{alerts:?}");
        assert_eq!(
            (a_alerts[0].kind, a_alerts[0].window_start_ms),
            ("start", 60 * 60_000)
        );
        assert!(a_alerts[0].metrics.contains(&"error_rate"));
        assert_eq!(a_alerts[1].kind, "recover");
        let b_start = alerts
            .iter()
            .find(|x| x.service == "b" && x.kind == "start");
        assert_eq!(
            b_start.map(|x| x.window_start_ms),
            Some(90 * 60_000),
            "{alerts:?}"
        );
        // an old window is ignored
        assert!(t.observe_window(0, &[]).0.is_empty());
        assert!(t.open_incidents().len() <= 1);
    }
}

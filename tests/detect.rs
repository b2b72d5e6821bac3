//! Anomaly detection end to end: two simulated hours from the generator with
//! its planted incidents, through the whole pipeline (no services needed).

mod common;

use pulse::app::{self, SourceSpec};
use pulse::config::{Config, Secrets};
use pulse::sink::store::{MemoryStore, Store};
use pulse::source::generator::{GenParams, Generator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_incidents_are_flagged_quickly_and_quiet_services_stay_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::load_with_env(None, &[]).unwrap();
    cfg.parquet.data_dir = dir.path().to_path_buf();
    let hours = 2.0;
    let p = GenParams {
        events: 120_000,
        seed: 3,
        rate_per_sec: 120_000.0 / (hours * 3600.0),
        ..GenParams::default()
    };
    let incidents = Generator::new(p.clone()).incidents;
    assert_eq!(incidents.len(), 2);
    let mem = MemoryStore::default();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let s = app::run(
        &cfg,
        &Secrets::default(),
        SourceSpec::Generator(p),
        Store::Memory(mem.clone()),
        rx,
    )
    .await
    .unwrap();
    let starts: Vec<_> = s.alerts.iter().filter(|a| a.kind == "start").collect();
    for inc in &incidents {
        let hit = starts.iter().find(|a| {
            a.service == inc.service
                && a.window_start_ms >= inc.start_ms
                && a.window_start_ms <= inc.start_ms + 120_000
        });
        assert!(
            hit.is_some(),
            "{} on {} not flagged within 2 minutes: {starts:?}",
            inc.kind,
            inc.service
        );
    }
    // false alarms: starts that are not at a planted incident
    for svc in pulse::source::generator::SERVICES {
        let false_alarms = starts
            .iter()
            .filter(|a| a.service == svc)
            .filter(|a| {
                !incidents.iter().any(|i| {
                    i.service == svc
                        && a.window_start_ms >= i.start_ms - 60_000
                        && a.window_start_ms < i.end_ms + 60_000
                })
            })
            .count();
        assert!(
            false_alarms <= 1,
            "{svc}: {false_alarms} false alarms in {hours} hours: {starts:?}"
        );
    }
    // anomalies are in Parquet and in the store
    let rows = common::sql(dir.path(), "SELECT service, metric FROM anomalies").await;
    let n: usize = rows.iter().map(|b| b.num_rows()).sum();
    assert_eq!(n as u64, s.anomalies);
    assert!(n >= 2);
    assert_eq!(mem.snapshot().anomalies.len() as u64, s.anomalies);
}

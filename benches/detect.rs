//! Anomaly detection cost: one detector step on a warmed-up series, and a
//! whole scored minute of 1,000 services (three series each, as the live
//! pipeline scores them). Run with `cargo bench --bench detect`; the second
//! figure divided by 1,000 is the cost per service per window.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use pulse::detect::incidents::AnomalyTracker;
use pulse::detect::{Detector, DetectorConfig};
use pulse::model::MinuteRow;
use rand::{Rng, SeedableRng};

const MINUTE: i64 = 60_000;

/// A noisy, daily-seasonal request count at one-minute steps.
fn series(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let day = (i as f64 / 1440.0 * std::f64::consts::TAU).sin();
            (1000.0 + 300.0 * day + rng.random_range(-50.0..50.0)).round()
        })
        .collect()
}

fn detect(c: &mut Criterion) {
    let warm = 3_000;
    let xs = series(warm + 20_000, 7);
    let mut d = Detector::new(DetectorConfig::default());
    for (i, x) in xs[..warm].iter().enumerate() {
        d.update(i as i64 * MINUTE, *x);
    }
    let mut g = c.benchmark_group("detect");
    g.throughput(Throughput::Elements(1));
    let mut i = warm;
    g.bench_function("detector_step", |b| {
        b.iter(|| {
            let p = d.update(i as i64 * MINUTE, xs[i % xs.len()]);
            i += 1;
            p
        })
    });

    // 1,000 services, each warmed up over 2,000 minutes.
    let services = 1_000;
    let rows_at = |w: usize| -> Vec<MinuteRow> {
        (0..services)
            .map(|s| MinuteRow {
                window_start_ms: w as i64 * MINUTE,
                service: format!("svc-{s:04}"),
                requests: (xs[(w + s * 7) % xs.len()]) as i64,
                errors: 3,
                error_rate: 0.003 + ((w + s) % 5) as f64 * 1e-4,
                latency_mean_ms: None,
                latency_p50_ms: None,
                latency_p95_ms: Some(80.0 + ((w * 31 + s) % 17) as f64),
                latency_p99_ms: None,
                latency_max_ms: None,
                client_errors: 0,
                unique_users: 0,
                is_final: true,
                partition: -1,
                dist: None,
            })
            .collect()
    };
    let mut tracker = AnomalyTracker::new(DetectorConfig::default(), 5);
    let mut w = 0;
    while w < 2_000 {
        let rows = rows_at(w);
        let refs: Vec<&MinuteRow> = rows.iter().collect();
        tracker.observe_window(w as i64 * MINUTE, &refs);
        w += 1;
    }
    g.throughput(Throughput::Elements(services as u64));
    g.sample_size(20);
    g.bench_function("window_of_1000_services", |b| {
        b.iter_batched(
            || {
                w += 1;
                (w, rows_at(w))
            },
            |(w, rows)| {
                let refs: Vec<&MinuteRow> = rows.iter().collect();
                tracker.observe_window(w as i64 * MINUTE, &refs)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, detect);
criterion_main!(benches);

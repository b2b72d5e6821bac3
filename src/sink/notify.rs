//! Alert delivery to the outside: consumes [`Alert`]s; produces a JSON POST to
//! `detect.webhook_url` and/or a JSON message on `detect.alerts_topic`.
//! Off the pipeline's path, in order, at least once: a webhook that fails or
//! is down is retried with backoff (up to 30 s between tries) until it takes
//! the alert; the alerts topic's producer retries without a time limit. Up
//! to [`ALERT_QUEUE`] alerts wait; past that the pipeline waits too
//! (backpressure) rather than drop one. Alerts still queued when the run
//! stops (after a short drain) are logged and counted; they are durable in
//! Redis and in the `anomalies` Parquet table regardless.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::config::{DetectConfig, KafkaConfig, Secrets};
use crate::detect::incidents::Alert;
use crate::sink::store::alert_json;

/// Alerts waiting for delivery before the pipeline waits for them.
pub const ALERT_QUEUE: usize = 10_000;
/// Longest wait between two webhook attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct Notifier {
    tx: mpsc::Sender<String>,
    /// Alerts queued or being delivered.
    pending: Arc<AtomicUsize>,
}

impl Notifier {
    /// `None` when neither a webhook nor an alerts topic is configured.
    pub fn from_config(d: &DetectConfig, k: &KafkaConfig, secrets: &Secrets) -> Option<Notifier> {
        if d.webhook_url.is_empty() && d.alerts_topic.is_empty() {
            return None;
        }
        let producer = if d.alerts_topic.is_empty() {
            None
        } else {
            // No delivery deadline: the broker may be away for a while.
            match crate::source::kafka::EventProducer::with_properties(
                k,
                secrets,
                &d.alerts_topic,
                &[("message.timeout.ms", "0")],
            ) {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot create the alerts producer");
                    None
                }
            }
        };
        let (tx, mut rx) = mpsc::channel::<String>(ALERT_QUEUE);
        let pending = Arc::new(AtomicUsize::new(0));
        let left = pending.clone();
        let url = d.webhook_url.clone();
        tokio::spawn(async move {
            while let Some(body) = rx.recv().await {
                if let Some(p) = &producer {
                    let p = p.clone();
                    let b = body.clone();
                    let sent = tokio::task::spawn_blocking(move || p.send(b"alert", b.as_bytes()))
                        .await
                        .map_err(|e| e.to_string())
                        .and_then(|r| r.map_err(|e| e.to_string()));
                    if let Err(e) = sent {
                        tracing::warn!(error = %e, "alert not produced to Kafka");
                        metrics::counter!("pulse_alert_delivery_failures_total", "to" => "kafka")
                            .increment(1);
                    }
                }
                if !url.is_empty() {
                    deliver(&url, &body).await;
                }
                let n = left.fetch_sub(1, Ordering::AcqRel) - 1;
                metrics::gauge!("pulse_alerts_pending").set(n as f64);
            }
        });
        Some(Notifier { tx, pending })
    }

    /// Queues alerts for delivery, waiting while [`ALERT_QUEUE`] are queued.
    pub async fn notify(&self, alerts: &[Alert]) {
        for a in alerts {
            let n = self.pending.fetch_add(1, Ordering::AcqRel) + 1;
            metrics::gauge!("pulse_alerts_pending").set(n as f64);
            if self.tx.send(alert_json(a)).await.is_err() {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                metrics::counter!("pulse_alert_delivery_failures_total", "to" => "queue")
                    .increment(1);
            }
        }
    }

    /// Waits up to `timeout` for the queued alerts; returns how many were left.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let t0 = Instant::now();
        while self.pending.load(Ordering::Acquire) > 0 && t0.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.pending.load(Ordering::Acquire);
        if left > 0 {
            metrics::counter!("pulse_alert_delivery_failures_total", "to" => "shutdown")
                .increment(left as u64);
            tracing::error!(
                alerts = left,
                "stopping with alerts not delivered (they are in Redis and the anomalies table)"
            );
        }
        left
    }
}

/// POSTs one alert until the webhook takes it, with backoff.
async fn deliver(url: &str, body: &str) {
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1u64;
    loop {
        match post_json(url, body).await {
            Ok(()) => return,
            Err(e) => {
                if attempt == 1 || attempt.is_power_of_two() {
                    tracing::warn!(error = %e, attempt, "webhook delivery failed, retrying");
                }
                metrics::counter!("pulse_alert_delivery_failures_total", "to" => "webhook")
                    .increment(1);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
                attempt += 1;
            }
        }
    }
}

/// Minimal HTTP/1.1 POST of a JSON body to an `http://host[:port]/path` URL;
/// succeeds on a 2xx status.
pub async fn post_json(url: &str, body: &str) -> std::io::Result<()> {
    let err = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, m);
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| err(format!("not an http:// URL: {url}")))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let io = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await?;
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {hostport}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let head = String::from_utf8_lossy(&buf[..buf.len().min(64)]).to_string();
        let code: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        if (200..300).contains(&code) {
            Ok(())
        } else {
            Err(std::io::Error::other(format!("webhook answered {head:?}")))
        }
    };
    tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "webhook timed out"))?
}

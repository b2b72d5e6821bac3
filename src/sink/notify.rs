//! Alert delivery to the outside: consumes [`Alert`]s; produces a JSON POST to
//! `detect.webhook_url` and/or a JSON message on `detect.alerts_topic`.
//! Best effort with retries, off the pipeline's path (a bounded queue; when
//! full, an alert is counted as dropped here — it is still durable in Redis and
//! in the `anomalies` Parquet table).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::config::{DetectConfig, KafkaConfig, Secrets};
use crate::detect::incidents::Alert;
use crate::sink::store::alert_json;

pub struct Notifier {
    tx: mpsc::Sender<String>,
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
            match crate::source::kafka::EventProducer::new(k, secrets, &d.alerts_topic) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::error!(error = %e, "cannot create the alerts producer");
                    None
                }
            }
        };
        let (tx, mut rx) = mpsc::channel::<String>(1024);
        let url = d.webhook_url.clone();
        tokio::spawn(async move {
            while let Some(body) = rx.recv().await {
                if let Some(p) = &producer
                    && let Err(e) = p.send(b"alert", body.as_bytes())
                {
                    tracing::warn!(error = %e, "alert not produced to Kafka");
                    metrics::counter!("pulse_alert_delivery_failures_total", "to" => "kafka")
                        .increment(1);
                }
                if !url.is_empty() {
                    let mut delay = Duration::from_millis(200);
                    for attempt in 1..=4 {
                        match post_json(&url, &body).await {
                            Ok(()) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, attempt, "webhook delivery failed");
                                if attempt == 4 {
                                    metrics::counter!("pulse_alert_delivery_failures_total", "to" => "webhook").increment(1);
                                }
                                tokio::time::sleep(delay).await;
                                delay *= 2;
                            }
                        }
                    }
                }
            }
        });
        Some(Notifier { tx })
    }

    pub fn notify(&self, alerts: &[Alert]) {
        for a in alerts {
            if self.tx.try_send(alert_json(a)).is_err() {
                metrics::counter!("pulse_alert_delivery_failures_total", "to" => "queue")
                    .increment(1);
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

//! Recommendations end to end against real services: generator → Kafka
//! (tansu) → `pulse run` → factors in Redis → `/recommend` over HTTP.

mod common;

use std::collections::{HashMap, HashSet};

use pulse::config::Config;
use pulse::serve::{ServeState, serve};
use pulse::source::generator::{GenParams, Generator, item_genre, user_genres};
use redis::AsyncCommands;
use serde_json::Value;

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let (code, body) = common::http_get(addr, path).await;
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn factors_flow_from_kafka_to_recommendations() {
    let brokers = common::service("PULSE_TEST_BROKERS");
    let redis_url = common::service("PULSE_TEST_REDIS");
    let dir = tempfile::tempdir().unwrap();
    let topic = common::unique("reco");
    let prefix = common::unique("r");
    let mut cfg = Config::load_with_env(None, &[]).unwrap();
    cfg.parquet.data_dir = dir.path().join("data");
    cfg.kafka.brokers = brokers;
    cfg.kafka.topic = topic.clone();
    cfg.kafka.group = common::unique("g");
    cfg.pipeline.idle_exit_ms = 3000;
    cfg.redis.url = redis_url.clone();
    cfg.redis.prefix = prefix.clone();

    // generated events, keyed by user
    let mut g = Generator::new(GenParams {
        events: 60_000,
        seed: 9,
        invalid_fraction: 0.0,
        ..GenParams::default()
    });
    let mut lines = Vec::new();
    let mut per_user: HashMap<u64, usize> = HashMap::new();
    let mut items_of: HashMap<u64, Vec<u64>> = HashMap::new();
    loop {
        let mut l = Vec::new();
        if g.next_into(&mut l).is_none() {
            break;
        }
        let v: Value = serde_json::from_slice(&l).unwrap();
        let user = v["user_id"].as_u64().unwrap();
        *per_user.entry(user).or_default() += 1;
        items_of
            .entry(user)
            .or_default()
            .push(v["item_id"].as_u64().unwrap());
        lines.push((user, l));
    }
    let recent_len = cfg.reco.model_config().recent_len;
    assert!(recent_len > 0);
    common::produce(&cfg, 4, lines).await;
    let s = common::run_kafka(&cfg).await;
    assert_eq!(s.trained, 60_000, "every event trains the model once");

    // the documented layout
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let meta: HashMap<String, String> = con.hgetall(format!("{prefix}:reco:meta")).await.unwrap();
    assert_eq!(meta["version"], "60000");
    let n_items: usize = con.hlen(format!("{prefix}:reco:item")).await.unwrap();
    let n_users: usize = con.hlen(format!("{prefix}:reco:user")).await.unwrap();
    assert!(
        n_items > 1000 && n_users > 1000,
        "{n_items} items, {n_users} users"
    );

    let state = ServeState::new(
        Some(
            redis::aio::ConnectionManager::new(client.clone())
                .await
                .unwrap(),
        ),
        &prefix,
        None,
    );
    assert_eq!(state.refresh_items().await.unwrap(), n_items);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, state, std::future::pending()));

    // heavy users get personal recommendations, mostly from their planted genres
    let mut users: Vec<(u64, usize)> = per_user.into_iter().collect();
    users.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut in_taste = 0;
    let mut total = 0;
    for &(u, _) in users.iter().take(20) {
        let (code, v) = get(addr, &format!("/recommend/{u}?k=10")).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["fallback"], false, "user {u} is known");
        let items: Vec<u64> = v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["item_id"].as_u64().unwrap())
            .collect();
        assert_eq!(items.len(), 10);
        let hist: Vec<u8> = con.hget(format!("{prefix}:reco:hist"), u).await.unwrap();
        let hist = pulse::factors::packed::decode_items(&hist);
        // a user's events share a key, so the model saw them in order: the
        // history is the distinct items of the last `recent_len`, newest first
        let mut want: Vec<u64> = Vec::new();
        for &i in items_of[&u].iter().rev().take(recent_len) {
            if !want.contains(&i) {
                want.push(i);
            }
        }
        assert_eq!(hist, want, "user {u}'s recent items");
        let hist: HashSet<u64> = hist.into_iter().collect();
        assert!(
            items.iter().all(|i| !hist.contains(i)),
            "recent history is excluded"
        );
        let (g1, g2) = user_genres(u, 8);
        in_taste += items
            .iter()
            .filter(|&&i| [g1, g2].contains(&item_genre(i, 8)))
            .count();
        total += items.len();
    }
    let share = in_taste as f64 / total as f64;
    // a random or popularity list lands in a user's two genres of eight about 25% of the time
    assert!(
        share > 0.5,
        "share of recommended items in the users' planted genres: {share:.2}"
    );

    // unknown users get trending items
    let (code, v) = get(addr, "/recommend/987654321987?k=5").await;
    assert_eq!(code, 200);
    assert_eq!(v["fallback"], true);
    assert_eq!(v["items"].as_array().unwrap().len(), 5);
    // bad input
    for path in [
        "/recommend/abc",
        "/recommend/1?k=0",
        "/recommend/1?k=1000",
        "/recommend/-4",
    ] {
        let (code, v) = get(addr, path).await;
        assert_eq!(code, 400, "{path}");
        assert!(v["error"].is_string(), "{path}");
    }
}

/// The model writer lease against a real redis-server: one holder at a
/// time, a renewal by a holder whose token is stale is refused, and a
/// lease held under an instance's own name (an acquisition of its own
/// that Redis ran after the client gave up waiting) is taken again under a
/// new token at once instead of being waited out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_writer_lease_has_one_holder_and_fences_stale_tokens() {
    use pulse::factors::lease::Lease;
    use std::time::Duration;
    let url = common::service("PULSE_TEST_REDIS");
    let client = redis::Client::open(url.as_str()).unwrap();
    let conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let prefix = common::unique("lease");
    let lease = |name: &str| {
        Lease::new(
            Some(conn.clone()),
            &prefix,
            Duration::from_secs(30),
            Duration::from_secs(2),
        )
        .named(name)
    };
    let (a, b) = (lease("a"), lease("b"));

    let t1 = a.acquire().await.unwrap().expect("a free lease is taken");
    assert_eq!(b.acquire().await.unwrap(), None, "b waits while a holds it");
    assert!(a.renew(t1).await.unwrap());
    assert!(!b.renew(t1).await.unwrap(), "b never held it");

    // A's earlier acquisition ran unbeknown to it: it takes the lease again.
    let t2 = a
        .acquire()
        .await
        .unwrap()
        .expect("a's own lease is taken again");
    assert!(t2 > t1, "a new term, a new token: {t1} -> {t2}");
    assert!(
        !a.renew(t1).await.unwrap(),
        "the older term's token is fenced"
    );
    assert!(a.renew(t2).await.unwrap());
    assert_eq!(b.acquire().await.unwrap(), None);

    // Released, the lease goes to the next one asking, under a newer token.
    a.release().await;
    let t3 = b
        .acquire()
        .await
        .unwrap()
        .expect("a released lease is taken");
    assert!(t3 > t2);
    assert!(
        !a.renew(t2).await.unwrap(),
        "a's term ended with its release"
    );
    assert_eq!(a.acquire().await.unwrap(), None);
}

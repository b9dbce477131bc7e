//! One budget across replicas and restarts: the shared ledger on a real Redis (the machine's,
//! or one a test starts and kills itself), and the local ledger's grant log.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use crm_quota_proxy::sim::{Sim, SimConfig};
use http::{Method, StatusCode};
use serde_json::Value;

use crate::support::{
    HttpClient, OwnRedis, Process, Reply, Served, TOKEN, client, eventually, metric_value,
    redis_url, send, ticket_body, unique_prefix,
};

/// A replica's config: creates park, the one quota is synced to the CRM's account headers.
fn replica_yaml(
    sim: &Sim,
    redis: &str,
    prefix: &str,
    id: &str,
    limit: u32,
    window: &str,
) -> String {
    format!(
        "upstream: {{ url: \"{}\", crm: zendesk }}\n\
         queue: {{ max_entries: 5000 }}\n\
         ledger: {{ store: redis, url: \"{redis}\", key_prefix: {prefix}, replicas: 3, replica_id: {id} }}\n\
         quotas:\n  - {{ name: calls, limit: {limit}, window: {window}, sync: account, margin: 100ms }}\n\
         routes:\n  - {{ name: ticket-create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }}\n",
        sim.url()
    )
}

async fn create(client: &HttpClient, base: &str, subject: &str) -> Option<Reply> {
    let url = format!("{base}/api/v2/tickets.json");
    let req = http::Request::post(&url)
        .header("authorization", TOKEN)
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(ticket_body(
            subject,
        ))))
        .unwrap();
    let resp = client.request(req).await.ok()?;
    let (parts, body) = resp.into_parts();
    let body = http_body_util::BodyExt::collect(body)
        .await
        .ok()?
        .to_bytes();
    Some(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// Offers `count` creates at `per_second`, round robin over `replicas`; the 202 ids by replica.
async fn offer(
    client: &HttpClient,
    replicas: &[String],
    count: usize,
    per_second: f64,
    name: &str,
) -> Vec<(usize, String)> {
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..count {
        tokio::time::sleep_until(start + Duration::from_secs_f64(i as f64 / per_second)).await;
        let (client, base) = (client.clone(), replicas[i % replicas.len()].clone());
        let subject = format!("{name}-{i:04}");
        tasks.push(tokio::spawn(async move {
            (i % 3, create(&client, &base, &subject).await)
        }));
    }
    let mut parked = Vec::new();
    for t in tasks {
        let (r, reply) = t.await.unwrap();
        let reply = reply.expect("a replica answered");
        match reply.status {
            StatusCode::ACCEPTED => {
                parked.push((r, reply.json()["id"].as_str().unwrap().to_string()))
            }
            StatusCode::CREATED => {}
            other => panic!("unexpected {other}: {:?}", reply.body),
        }
    }
    parked
}

fn tickets_once(sim: &Sim, expected: usize) {
    let mut per_subject: HashMap<String, usize> = HashMap::new();
    for t in sim.tickets() {
        *per_subject.entry(t.subject).or_default() += 1;
    }
    let twice: Vec<_> = per_subject.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert_eq!(per_subject.len(), expected, "every write delivered");
}

async fn until_done(
    client: &HttpClient,
    replicas: &[String],
    parked: &[(usize, String)],
    limit: Duration,
) {
    for (r, id) in parked {
        let url = format!("{}/_proxy/requests/{id}", replicas[*r]);
        eventually(&format!("{id} to be done"), limit, || {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let v: Value = send(&client, Method::GET, &url, &[("authorization", TOKEN)], "")
                    .await
                    .json();
                match v["status"].as_str() {
                    Some("done") => Some(()),
                    Some("failed") | Some("expired") => panic!("{url}: {v}"),
                    _ => None,
                }
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_never_spend_more_than_one_budget() {
    let redis = redis_url();
    let sim = Sim::start(SimConfig::new(20, Duration::from_secs(2)))
        .await
        .unwrap();
    let prefix = unique_prefix("three");
    let mut replicas = Vec::new();
    for id in ["r1", "r2", "r3"] {
        replicas.push(Served::start(&replica_yaml(&sim, &redis, &prefix, id, 20, "2s")).await);
    }
    let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    let client = client();
    // Three times the budget, over three windows, spread over the replicas.
    let parked = offer(&client, &urls, 180, 30.0, "three").await;
    until_done(&client, &urls, &parked, Duration::from_secs(60)).await;
    let stats = sim.stats();
    assert_eq!(stats.throttled, 0, "the CRM never answered 429: {stats:?}");
    assert!(stats.max_in_fixed_window <= 20, "{stats:?}");
    tickets_once(&sim, 180);
    assert!(parked.len() >= 100, "{} parked", parked.len());
    for r in replicas {
        r.stop().await;
    }
}

/// A replica as an operator runs it: its own process and data directory.
fn replica_config(
    dir: &Path,
    redis: Option<(&str, &str, &str)>,
    limit: u32,
    window: &str,
) -> std::path::PathBuf {
    let ledger = match redis {
        Some((url, prefix, id)) => format!(
            "ledger: {{ store: redis, url: \"{url}\", key_prefix: {prefix}, replicas: 3, replica_id: {id} }}\n"
        ),
        None => String::new(),
    };
    let path = dir.join("proxy.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: {{ data: 127.0.0.1:0, admin: 127.0.0.1:0 }}\n\
             upstream: {{ url: http://127.0.0.1:9, crm: zendesk }}\n\
             queue: {{ store: disk, data_dir: {}, max_entries: 5000 }}\n\
             {ledger}\
             quotas:\n  - {{ name: calls, limit: {limit}, window: {window}, sync: account, margin: 100ms }}\n\
             routes:\n  - {{ name: ticket-create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s, idempotency_key: true }}\n  - {{ name: search, methods: [GET], path: /api/v2/search.json, on_limit: reject }}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_and_restarted_mid_run_keeps_the_budget_and_its_writes() {
    let redis = redis_url();
    let sim = Sim::start(SimConfig::new(20, Duration::from_secs(2)))
        .await
        .unwrap();
    let prefix = unique_prefix("kill");
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let configs: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            replica_config(
                d.path(),
                Some((&redis, &prefix, &format!("r{i}"))),
                20,
                "2s",
            )
        })
        .collect();
    let mut procs = Vec::new();
    for c in &configs {
        procs.push(Process::start(c, &sim.url()).await);
    }
    let client = client();
    let urls: Vec<String> = procs.iter().map(|p| p.data.clone()).collect();
    // First half of the load, then replica 2 dies (SIGKILL) and comes back on its data.
    let mut parked = offer(&client, &urls, 90, 30.0, "kill-a").await;
    let victim = procs.remove(2);
    let (_, _) = victim.signal("KILL");
    let restarted = Process::start(&configs[2], &sim.url()).await;
    // Ids are kept with the write; the restarted replica answers for its old ones.
    let mut urls = urls;
    urls[2] = restarted.data.clone();
    procs.push(restarted);
    parked.extend(offer(&client, &urls, 90, 30.0, "kill-b").await.into_iter());
    until_done(&client, &urls, &parked, Duration::from_secs(90)).await;
    let stats = sim.stats();
    assert_eq!(stats.throttled, 0, "the CRM never answered 429: {stats:?}");
    tickets_once(&sim, 180);
    drop(procs);
}

/// Three replicas in this process against the CRM, sharing the ledger at `redis_url`, while
/// `outage` does what it does to Redis after the first windows. What the CRM saw, and the
/// replicas' metrics at the end.
async fn run_through_an_outage(
    redis: &mut OwnRedis,
    name: &str,
) -> (crm_quota_proxy::sim::SimStats, Vec<String>, Sim) {
    let sim = Sim::start(SimConfig::new(20, Duration::from_secs(2)))
        .await
        .unwrap();
    let prefix = unique_prefix(name);
    let mut replicas = Vec::new();
    for id in ["r1", "r2", "r3"] {
        let yaml = replica_yaml(&sim, &redis.url(), &prefix, id, 20, "2s");
        replicas.push(Served::start(&yaml).await);
    }
    let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    let client = client();
    let mut parked = offer(&client, &urls, 90, 30.0, &format!("{name}-a")).await;
    redis.kill();
    parked.extend(offer(&client, &urls, 45, 30.0, &format!("{name}-b")).await);
    redis.restart().await;
    parked.extend(offer(&client, &urls, 45, 30.0, &format!("{name}-c")).await);
    until_done(&client, &urls, &parked, Duration::from_secs(90)).await;
    let mut metrics = Vec::new();
    for r in &replicas {
        let text = send(
            &client,
            Method::GET,
            &format!("{}/metrics", r.admin),
            &[],
            "",
        )
        .await;
        metrics.push(String::from_utf8(text.body.to_vec()).unwrap());
    }
    for r in replicas {
        r.stop().await;
    }
    tickets_once(&sim, 180);
    (sim.stats(), metrics, sim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_redis_killed_and_restarted_keeps_the_limit_and_is_rejoined() {
    let mut redis = OwnRedis::start(true).await;
    let (stats, metrics, _sim) = run_through_an_outage(&mut redis, "aof").await;
    assert_eq!(stats.throttled, 0, "the CRM never answered 429: {stats:?}");
    assert!(stats.max_in_fixed_window <= 20, "{stats:?}");
    let fallback: f64 = metrics
        .iter()
        .map(|m| metric_value(m, "crm_proxy_ledger_fallback_seconds_total").unwrap())
        .sum();
    assert!(
        fallback > 0.0,
        "the replicas decided on their own while Redis was down"
    );
    for m in &metrics {
        assert_eq!(
            metric_value(m, "crm_proxy_ledger_shared"),
            Some(1.0),
            "rejoined"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_lost_its_state_is_reseeded_and_the_limit_holds() {
    let mut redis = OwnRedis::start(false).await;
    let (stats, metrics, _sim) = run_through_an_outage(&mut redis, "lost").await;
    assert_eq!(stats.throttled, 0, "the CRM never answered 429: {stats:?}");
    assert!(stats.max_in_fixed_window <= 20, "{stats:?}");
    for m in &metrics {
        assert_eq!(
            metric_value(m, "crm_proxy_ledger_shared"),
            Some(1.0),
            "rejoined"
        );
    }
}

/// A day whose budget is spent, then a restart late in it: nothing more is sent that day.
async fn restart_late_in_the_day(redis: Option<(&str, &str)>) {
    let sim = Sim::start(SimConfig::new(1_000, Duration::from_secs(60)))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = {
        let path = replica_config(dir.path(), redis.map(|(u, p)| (u, p, "day")), 5, "1h");
        // A quota the CRM never reports: only the proxy's own count protects it.
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(", sync: account", "");
        std::fs::write(&path, text).unwrap();
        path
    };
    let client = client();
    let search = |base: &str| format!("{base}/api/v2/search.json?query=x");
    let first = Process::start(&config, &sim.url()).await;
    for _ in 0..5 {
        let r = send(
            &client,
            Method::GET,
            &search(&first.data),
            &[("authorization", TOKEN)],
            "",
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let r = send(
        &client,
        Method::GET,
        &search(&first.data),
        &[("authorization", TOKEN)],
        "",
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "the day's budget is spent"
    );
    // Grants reach the grant log within 50 ms; the kill comes after that.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, _) = first.signal("KILL");
    let calls = sim.stats().calls;
    let second = Process::start(&config, &sim.url()).await;
    let r = send(
        &client,
        Method::GET,
        &search(&second.data),
        &[("authorization", TOKEN)],
        "",
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::TOO_MANY_REQUESTS,
        "after the restart the day's budget is still spent"
    );
    assert_eq!(sim.stats().calls, calls, "nothing more reached the CRM");
    drop(second);
}

#[tokio::test]
async fn a_restart_late_in_the_day_sends_nothing_more_with_the_local_ledger() {
    restart_late_in_the_day(None).await;
}

#[tokio::test]
async fn a_restart_late_in_the_day_sends_nothing_more_with_the_shared_ledger() {
    let redis = redis_url();
    let prefix = unique_prefix("day");
    restart_late_in_the_day(Some((&redis, &prefix))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_start_a_synced_quota_probes_before_sending_in_parallel() {
    // The CRM's window is already spent (by another app, or by this proxy before a restart):
    // a freshly started proxy must not send its backlog into it all at once.
    let sim = Sim::start(SimConfig::new(20, Duration::from_secs(10)))
        .await
        .unwrap();
    sim.spend_elsewhere(20);
    let yaml = format!(
        "upstream: {{ url: \"{}\", crm: zendesk }}\n\
         queue: {{ max_in_flight: 8 }}\n\
         quotas:\n  - {{ name: calls, limit: 20, window: 10s, sync: account, margin: 100ms }}\n\
         routes:\n  - {{ name: ticket-create, methods: [POST], path: /api/v2/tickets.json, on_limit: queue, max_wait: 0s }}\n",
        sim.url()
    );
    let proxy = Served::start(&yaml).await;
    let client = client();
    let creates: Vec<_> = (0..8)
        .map(|i| {
            let (client, base) = (client.clone(), proxy.url.clone());
            tokio::spawn(async move { create(&client, &base, &format!("probe-{i}")).await })
        })
        .collect();
    for c in creates {
        assert!(c.await.unwrap().is_some());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stats = sim.stats();
    assert!(
        stats.throttled <= 1,
        "one probe met the spent window, the rest waited for its answer: {stats:?}"
    );
    proxy.stop().await;
}

/// Two replicas on one Redis ledger and one scheduled "day" (40 calls per 10 s, released evenly
/// to parked writes): the parked writes of both never spend beyond what the schedule released,
/// counted across the account, while searches go past it at once; a replica's forecast counts
/// the account's spend, not only its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_keep_to_one_release_schedule_and_forecast_the_account() {
    let redis = redis_url();
    let sim = Sim::start(SimConfig::new(1000, Duration::from_secs(60)))
        .await
        .unwrap();
    let prefix = unique_prefix("schedule");
    let yaml = |id: &str| {
        format!(
            "upstream: {{ url: \"{}\" }}\n\
             ledger: {{ store: redis, url: \"{redis}\", key_prefix: {prefix}, replicas: 2, replica_id: {id} }}\n\
             fairness: {{ read_reserve: 0%, live_reserve: 0%, drain_min: 0% }}\n\
             quotas:\n  - {{ name: day, limit: 40, window: 10s, kind: fixed, margin: 100ms, schedule: {{}} }}\n\
             routes:\n  - {{ name: create, methods: [POST], path: /api/v2/tickets.json, max_wait: 0s }}\n  - {{ name: search, methods: [GET], path: /api/v2/search.json, class: read, on_limit: reject }}\n",
            sim.url()
        )
    };
    let replicas = [
        Served::start(&yaml("r1")).await,
        Served::start(&yaml("r2")).await,
    ];
    let client = client();
    // The day begins at the next multiple of 10 s since the epoch (the quota is fixed).
    let day = 10_000_000_000u64;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let day_start = (now / day + 1) * day;
    let at = |ns: u64| tokio::time::Instant::now() + Duration::from_nanos(day_start + ns - now);
    let (begin, half, end) = (at(20_000_000), at(day / 2), at(day));
    tokio::time::sleep_until(begin).await;
    // Ten searches through r1: answered at once, though the schedule has released nothing yet.
    for i in 0..10 {
        let url = format!("{}/api/v2/search.json?query=c{i}", replicas[0].url);
        let r = send(&client, Method::GET, &url, &[("authorization", TOKEN)], "").await;
        assert_eq!(r.status, StatusCode::OK, "search {i}");
    }
    // Forty writes, twenty through each replica: all parked for the schedule.
    let mut parked = Vec::new();
    for i in 0..40 {
        let reply = create(&client, &replicas[i % 2].url, &format!("paced-{i:02}"))
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::ACCEPTED, "write {i}");
        parked.push((i % 2, reply.json()["id"].as_str().unwrap().to_string()));
    }
    // Half-way: r2, which served no search, forecasts from the account's count.
    tokio::time::sleep_until(half).await;
    let status = send(
        &client,
        Method::GET,
        &format!("{}/status", replicas[1].admin),
        &[],
        "",
    )
    .await
    .json();
    let own = status["quotas"][0]["used"].as_u64().unwrap();
    let account = status["forecasts"][0]["used"].as_u64().unwrap();
    assert!(account >= own + 10, "r2 counts r1's searches too: {status}");
    assert!(
        status["forecasts"][0]["backlog_calls"].as_u64().unwrap() > 0,
        "{status}"
    );
    tokio::time::sleep_until(end).await;
    // At the CRM: the searches first, then each write only once the schedule had released
    // more than the whole account had spent; all of the day by its end.
    let in_day: Vec<u64> = sim
        .accepted_times()
        .into_iter()
        .filter(|t| (day_start..day_start + day).contains(t))
        .collect();
    let span = day - 100_000_000;
    for (k, &t) in in_day.iter().enumerate().skip(10) {
        let released = (40 * (t - day_start)).div_ceil(span).min(40);
        assert!(
            k < released as usize,
            "call {k} went at {} ms with {released} released",
            (t - day_start) / 1_000_000
        );
    }
    assert_eq!(in_day.len(), 40, "the day spent by its end");
    until_done(
        &client,
        &[replicas[0].url.clone(), replicas[1].url.clone()],
        &parked,
        Duration::from_secs(30),
    )
    .await;
    tickets_once(&sim, 40);
    for r in replicas {
        r.stop().await;
    }
}

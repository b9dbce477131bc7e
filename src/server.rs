//! Running the proxy: binding its listeners, opening its store and restoring the queue, serving
//! data and admin traffic, and stopping gracefully (drain for `shutdown_grace`, report what was
//! left undelivered).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin;
use crate::clock::SharedClock;
use crate::clock::Time;
use crate::config::{Config, LedgerConfig};
use crate::data_plane;
use crate::dispatch;
use crate::ids::QuotaId;
use crate::listener::{ConnLimits, accept_loop, raise_descriptor_limit};
use crate::proxy::{Phase, Proxy};
use crate::quota::window::Shadow;
use crate::store::{GrantLog, LoggedGrant, Recovered, Store};

/// The two sockets the proxy serves: client traffic and admin.
pub struct Listeners {
    pub data: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> std::io::Result<Listeners> {
        Ok(Listeners {
            data: TcpListener::bind(config.listen.data).await?,
            admin: TcpListener::bind(config.listen.admin).await?,
        })
    }
}

/// What was left when the proxy stopped.
#[derive(Debug)]
pub struct Stopped {
    /// Parked writes the proxy had accepted (202) but not delivered.
    pub undelivered: usize,
}

/// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish and
/// parked writes drain for up to `shutdown_grace`, and reports what was left undelivered.
pub async fn serve(
    config: Config,
    listeners: Listeners,
    clock: SharedClock,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped, String> {
    let grace = config.shutdown_grace;
    let data_dir = config.queue.data_dir.clone();
    let data_limits = fit_connections(&config);
    let admin_limits = ConnLimits::admin(&config.listen);
    let (proxy, recovered) = prepare(config, clock)?;
    let proxy = Arc::new(proxy);
    let (stop_tx, stop_rx) = watch::channel(false);

    let admin_proxy = proxy.clone();
    let admin_addr = listeners.admin.local_addr();
    let mut admin_stop = stop_rx.clone();
    let admin = tokio::spawn(accept_loop(
        listeners.admin,
        admin_limits,
        proxy.admin_conns.clone(),
        move |_peer, activity| {
            let p = admin_proxy.clone();
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let (p, activity) = (p.clone(), activity.clone());
                async move {
                    let _busy = activity.begin();
                    Ok::<_, Infallible>(admin::handle(p, req).await)
                }
            })
        },
        async move {
            let _ = admin_stop.wait_for(|stop| *stop).await;
        },
        Duration::from_secs(1),
    ));

    // The admin listener answers (`/readyz`: 503) while the queue is rebuilt; data waits.
    if let Some((recovered, dir)) = recovered {
        let p = proxy.clone();
        tokio::task::spawn_blocking(move || restore(&p, recovered, &dir))
            .await
            .map_err(|e| format!("restoring the queue failed: {e}"))?;
    }
    if let (Ok(data), Ok(admin)) = (listeners.data.local_addr(), admin_addr) {
        tracing::info!(
            %data,
            %admin,
            upstream = %proxy.config.upstream.url,
            quotas = proxy.config.quotas.len(),
            routes = proxy.config.routes.len(),
            store = if data_dir.is_some() { "disk" } else { "memory" },
            "crm-quota-proxy listening"
        );
    }
    // The first requests are decided by the shared ledger when there is one: join it first.
    proxy.shared.start(&proxy.ledger).await;
    // The tasks the proxy cannot serve without: if one dies (a panic), the process stops with
    // an error instead of answering 202 for writes nobody would send.
    let (died_tx, mut died) = tokio::sync::mpsc::unbounded_channel::<String>();
    let shared = {
        let p = proxy.clone();
        let stop = stop_rx.clone();
        critical("the shared-ledger task", &died_tx, async move {
            p.shared.run(&p.ledger, stop).await
        })
    };
    proxy.set_phase(Phase::Ready);
    proxy.metrics.set_up(true);
    let mut dispatcher = critical(
        "the dispatcher",
        &died_tx,
        dispatch::run(proxy.clone(), stop_rx.clone()),
    );
    let grant_log = critical(
        "the grant-log task",
        &died_tx,
        keep_grant_log(proxy.clone(), stop_rx.clone()),
    );
    let failure: Arc<std::sync::Mutex<Option<String>>> = Arc::default();
    let failed = failure.clone();

    let data_proxy = proxy.clone();
    let drain_proxy = proxy.clone();
    let (began_tx, began_rx) = tokio::sync::oneshot::channel();
    accept_loop(
        listeners.data,
        data_limits,
        proxy.data_conns.clone(),
        move |peer: SocketAddr, activity| {
            let p = data_proxy.clone();
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let (p, activity) = (p.clone(), activity.clone());
                async move {
                    let _busy = activity.begin();
                    Ok::<_, Infallible>(data_plane::handle(p, req, peer).await)
                }
            })
        },
        async move {
            tokio::select! {
                _ = shutdown => {}
                Some(why) = died.recv() => {
                    tracing::error!("{why}; stopping (the process exits with an error)");
                    *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                }
            }
            drain_proxy.set_phase(Phase::Stopping);
            drain_proxy.queue.close();
            drain_proxy.metrics.set_up(false);
            let _ = began_tx.send(tokio::time::Instant::now());
            tracing::info!(grace = ?grace, "shutting down: no new connections; finishing in-flight requests and draining parked writes");
        },
        grace,
    )
    .await;

    // In-flight requests are done (or out of time); give the drain what is left of the grace.
    let deadline = began_rx
        .await
        .unwrap_or_else(|_| tokio::time::Instant::now())
        + grace;
    if tokio::time::timeout_at(deadline, &mut dispatcher)
        .await
        .is_err()
    {
        let _ = stop_tx.send(true);
        let _ = dispatcher.await;
    }
    let _ = stop_tx.send(true);
    let _ = grant_log.await;
    let _ = shared.await;
    let undelivered = proxy.queue.undelivered();
    if let Err(e) = proxy.queue.sync().await {
        tracing::error!(error = %e, "the last records could not be written to the parked-write log");
    }
    if undelivered.is_empty() {
        tracing::info!("stopped; every accepted parked write was delivered");
    } else if let Some(dir) = &data_dir {
        tracing::warn!(
            count = undelivered.len(),
            data_dir = %dir.display(),
            "stopped with accepted parked writes undelivered; they are kept in the store and sent after restart"
        );
    } else {
        tracing::error!(
            count = undelivered.len(),
            "STOPPING WITH {} ACCEPTED PARKED WRITES UNDELIVERED: they were answered 202 and are lost with this process (the queue is in memory)",
            undelivered.len()
        );
        for id in &undelivered {
            tracing::warn!(request_id = %id, "undelivered parked write");
        }
    }
    let _ = admin.await;
    if let Some(why) = failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(why);
    }
    Ok(Stopped {
        undelivered: undelivered.len(),
    })
}

/// Spawns a task the proxy cannot serve without; if it panics, `died` hears why.
fn critical<F>(
    name: &'static str,
    died: &tokio::sync::mpsc::UnboundedSender<String>,
    task: F,
) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let died = died.clone();
    tokio::spawn(async move {
        if let Err(e) = tokio::spawn(task).await
            && e.is_panic()
        {
            let panic = e.into_panic();
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let _ = died.send(format!("{name} panicked: {msg}"));
        }
    })
}

/// The data listener's connection limits, `max_connections` lowered to what the process's
/// file-descriptor limit leaves once everything else the proxy opens is set aside (the limit is
/// raised to its hard maximum first when that helps).
fn fit_connections(config: &Config) -> ConnLimits {
    let mut limits = ConnLimits::data(&config.listen);
    // Upstream connections (one per request in process, per drained write, kept idle), the
    // admin listener's, the store's files, and some room for the runtime and libraries.
    let reserved = (config.listen.max_concurrent_requests
        + config.queue.max_in_flight
        + config.upstream.pool_max_idle
        + crate::listener::ADMIN_MAX_CONNECTIONS
        + 64) as u64;
    let wanted = limits.max_connections as u64 + reserved;
    match raise_descriptor_limit(wanted) {
        Ok(limit) => {
            if let Some(cap) = limits.fit(limit, reserved) {
                tracing::warn!(
                    configured = config.listen.max_connections,
                    max_connections = cap,
                    descriptor_limit = limit,
                    "listen.max_connections lowered to what the file-descriptor limit allows (raise it with ulimit -n or LimitNOFILE)"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the file-descriptor limit"),
    }
    limits
}

/// The proxy as it starts, not yet serving: its config's store opened (the data directory
/// locked) and its queue rebuilt from the log.
pub fn open(config: Config, clock: SharedClock) -> Result<Proxy, String> {
    let (proxy, recovered) = prepare(config, clock)?;
    if let Some((recovered, dir)) = recovered {
        restore(&proxy, recovered, &dir);
    }
    Ok(proxy)
}

/// What the log held, still to be restored, and where it lives.
type Pending = Option<(Recovered, std::path::PathBuf)>;

/// The proxy with its config's store opened (the data directory locked), and what the log held.
fn prepare(config: Config, clock: SharedClock) -> Result<(Proxy, Pending), String> {
    let Some(dir) = config.queue.data_dir.clone() else {
        return Ok((Proxy::new(config, clock, Store::memory())?, None));
    };
    let (store, recovered) = Store::open(&dir).map_err(|e| e.to_string())?;
    warn_if_open(&dir);
    let mut proxy = Proxy::new(config, clock, store)?;
    if proxy.config.ledger == LedgerConfig::Local {
        // The local ledger keeps its grants in the data directory too, so a restart knows what
        // the windows still open had spent.
        let (log, logged) = GrantLog::open(&dir).map_err(|e| e.to_string())?;
        let grants: Vec<_> = logged
            .iter()
            .filter_map(|(name, at, n)| {
                let q = proxy.config.quotas.iter().position(|c| &c.name == name)?;
                Some((QuotaId(q), Time::from_nanos(*at), *n))
            })
            .collect();
        let counted = proxy.ledger.replay(&grants, proxy.clock.now());
        if counted > 0 {
            tracing::info!(
                grants = counted,
                "restored the grants of quota windows still open from the grant log"
            );
        }
        proxy.ledger.journal(true);
        proxy.grant_log = Some(Arc::new(log));
    }
    Ok((proxy, Some((recovered, dir))))
}

/// How often the ledger's new grants are appended to the grant log.
const GRANT_LOG_EVERY: Duration = Duration::from_millis(50);

/// Moves the ledger's new grants into the grant log every [`GRANT_LOG_EVERY`] (and once more
/// when `stop` turns true), rewriting the log to what the open windows count once it has grown
/// past twice that.
async fn keep_grant_log(proxy: Arc<Proxy>, mut stop: watch::Receiver<bool>) {
    let Some(log) = proxy.grant_log.clone() else {
        return;
    };
    let mut compacted: u64 = 0;
    loop {
        let stopping = tokio::select! {
            _ = tokio::time::sleep(GRANT_LOG_EVERY) => false,
            _ = stop.changed() => true,
        } || *stop.borrow();
        let names = |q: QuotaId| proxy.config.quotas[q.0].name.clone();
        let batch: Vec<LoggedGrant> = proxy
            .ledger
            .take_journal()
            .into_iter()
            .map(|(q, at)| (names(q), at.as_nanos(), 1))
            .collect();
        let writer = log.clone();
        let size = tokio::task::spawn_blocking(move || writer.append(&batch)).await;
        match size {
            Ok(Ok(size)) if size > 2 * compacted + (1 << 20) => {
                let live = open_window_grants(&proxy);
                let writer = log.clone();
                match tokio::task::spawn_blocking(move || writer.rewrite(&live)).await {
                    Ok(Ok(())) => compacted = log.size(),
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot rewrite the grant log"),
                    Err(e) => tracing::warn!(error = %e, "cannot rewrite the grant log"),
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot append to the grant log; a restart may not know every grant")
            }
            Err(e) => tracing::warn!(error = %e, "cannot append to the grant log"),
        }
        if stopping {
            return;
        }
    }
}

/// What the open windows count, as grant log entries.
fn open_window_grants(proxy: &Proxy) -> Vec<LoggedGrant> {
    let now = proxy.clock.now();
    let mut out = Vec::new();
    for (q, shadow) in proxy.ledger.shadow(now) {
        let name = &proxy.config.quotas[q.0].name;
        match shadow {
            Shadow::Times(times) => {
                out.extend(times.into_iter().map(|t| (name.clone(), t.as_nanos(), 1)));
            }
            Shadow::Count { start, count, .. } if count > 0 => {
                out.push((name.clone(), start.as_nanos(), count));
            }
            Shadow::Count { .. } => {}
            Shadow::Buckets { width, counts } => {
                out.extend(
                    counts
                        .into_iter()
                        .map(|(b, n)| (name.clone(), b.saturating_mul(width), n)),
                );
            }
        }
    }
    out
}

/// Rebuilds the queue from the log and says what it found.
fn restore(proxy: &Proxy, recovered: Recovered, dir: &std::path::Path) {
    if recovered.discarded_bytes > 0 {
        tracing::error!(
            bytes = recovered.discarded_bytes,
            data_dir = %dir.display(),
            "the parked-write log ended in a torn or corrupt record (a crash mid-write); cut it off. \
             A write in it was never answered 202, so its client saw an error and nothing accepted is lost"
        );
    }
    let started = std::time::Instant::now();
    let report = proxy.queue.restore(recovered.entries, proxy.clock.now());
    tracing::info!(
        records = recovered.records,
        queued = report.queued,
        resent = report.resent,
        ambiguous = report.ambiguous,
        finished = report.finished,
        took_ms = started.elapsed().as_millis() as u64,
        data_dir = %dir.display(),
        "restored parked writes from the log"
    );
    if report.ambiguous > 0 {
        tracing::warn!(
            count = report.ambiguous,
            "writes that were being sent when the proxy stopped, with no safe way to resend, are \
             marked failed (ambiguous): check the CRM, then retry or discard each"
        );
    }
}

/// Warns when the data directory can be read by others: it holds request bodies and credentials.
fn warn_if_open(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(dir)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            data_dir = %dir.display(),
            mode = format!("{:o}", meta.permissions().mode() & 0o777),
            "the data directory is readable by other users; it holds request bodies and credentials (chmod 700)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_critical_task_that_panics_is_reported_with_its_message() {
        let (tx, mut died) = tokio::sync::mpsc::unbounded_channel();
        let ended = critical("the dispatcher", &tx, async {
            panic!("window arithmetic overflowed");
        });
        ended.await.unwrap();
        assert_eq!(
            died.recv().await.as_deref(),
            Some("the dispatcher panicked: window arithmetic overflowed")
        );
        critical("a task", &tx, async {}).await.unwrap();
        drop(tx);
        assert_eq!(died.recv().await, None, "a task that ends is not a death");
    }
}

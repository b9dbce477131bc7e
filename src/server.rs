//! Running the proxy: binding its listeners, opening its store and restoring the queue, serving
//! data and admin traffic, and stopping gracefully (drain for `shutdown_grace`, report what was
//! left undelivered).

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin;
use crate::clock::SharedClock;
use crate::clock::Time;
use crate::config::{Config, LedgerConfig};
use crate::data_plane;
use crate::dispatch;
use crate::ids::QuotaId;
use crate::listener::{ConnLimits, RequestBody, accept_loop, raise_descriptor_limit};
use crate::message::Peer;
use crate::proxy::{Phase, Proxy, Reloader, SetLogLevel};
use crate::quota::shadow_grants;
use crate::store::{GrantLog, LoggedGrant, Recovered, Store, StoreError};
use crate::workers::DataThreads;
use std::path::PathBuf;

/// The two sockets the proxy serves: client traffic and admin.
pub struct Listeners {
    pub data: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds both listeners; a failure names the listener, its address and the fix.
    pub async fn bind(config: &Config) -> Result<Listeners, Failure> {
        Ok(Listeners {
            data: bind("listen.data", config.listen.data).await?,
            admin: bind("listen.admin", config.listen.admin).await?,
        })
    }
}

async fn bind(key: &str, addr: SocketAddr) -> Result<TcpListener, Failure> {
    TcpListener::bind(addr).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => Failure::InUse(format!(
            "{key}: {addr} is already in use by another process; stop it or choose another port"
        )),
        std::io::ErrorKind::PermissionDenied => Failure::Io(format!(
            "{key}: not allowed to listen on {addr} (ports below 1024 need privileges); choose a port above 1023"
        )),
        std::io::ErrorKind::AddrNotAvailable => Failure::Io(format!(
            "{key}: {addr} is not an address of this host; use 0.0.0.0 or one of its addresses"
        )),
        _ => Failure::Io(format!("{key}: cannot listen on {addr}: {e}")),
    })
}

/// What was left when the proxy stopped.
#[derive(Debug)]
pub struct Stopped {
    /// Parked writes the proxy had accepted (202) but not delivered.
    pub undelivered: usize,
    /// Whether those are kept in the disk store (sent after the next start) or lost.
    pub kept: bool,
}

/// Why the proxy could not start or had to stop, by the class an operator acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Something else holds what the proxy needs: its data directory, a listen address.
    InUse(String),
    /// The system refused: a file or directory, a permission, an unsafe data directory.
    Io(String),
    /// The proxy itself failed (a task it cannot serve without panicked).
    Internal(String),
}

impl Failure {
    /// The process's exit status for this failure (sysexits: 75 temporary, 74 I/O, 70 software).
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::InUse(_) => 75,
            Failure::Io(_) => 74,
            Failure::Internal(_) => 70,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::InUse(m) | Failure::Io(m) | Failure::Internal(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Failure {}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        let msg = format!("queue.data_dir: {e}");
        match e {
            StoreError::Locked(_) => Failure::InUse(format!(
                "{msg}; stop the other process, or give this one its own data_dir"
            )),
            _ => Failure::Io(msg),
        }
    }
}

/// How a running proxy is steered besides its shutdown: where its config file is (for reloads
/// and the hash `/status` shows), the reload requests (SIGHUP), and how to set the log level.
#[derive(Default)]
pub struct Control {
    pub config_path: Option<PathBuf>,
    pub reload: Option<tokio::sync::mpsc::UnboundedReceiver<()>>,
    pub log_level: Option<SetLogLevel>,
}

/// [`serve_with`] without a config file, reloads or log level control (tests, the demo).
pub async fn serve(
    config: Config,
    listeners: Listeners,
    clock: SharedClock,
    shutdown: impl Future<Output = ()>,
) -> Result<Stopped, Failure> {
    serve_with(config, listeners, clock, shutdown, Control::default()).await
}

/// Serves until `shutdown` completes, then stops accepting, lets in-flight requests finish and
/// parked writes drain for up to `shutdown_grace`, and reports what was left undelivered.
pub async fn serve_with(
    config: Config,
    listeners: Listeners,
    clock: SharedClock,
    shutdown: impl Future<Output = ()>,
    control: Control,
) -> Result<Stopped, Failure> {
    let grace = config.shutdown_grace;
    let data_dir = config.queue.data_dir.clone();
    let data_limits = fit_connections(&config);
    let admin_limits = ConnLimits::admin(&config.listen);
    let (proxy, recovered) = prepare(config, clock)?;
    if let Some(path) = control.config_path {
        proxy.set_reloader(Reloader {
            path,
            log_level: control.log_level,
        });
    }
    let proxy = Arc::new(proxy);
    if let Some(mut requests) = control.reload {
        let p = proxy.clone();
        tokio::spawn(async move {
            while requests.recv().await.is_some() {
                p.reload_from_file();
            }
        });
    }
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
            hyper::service::service_fn(move |req: Request<RequestBody>| {
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
        &[],
    ));

    // The admin listener answers (`/readyz`: 503) while the queue is rebuilt; data waits.
    if let Some((recovered, dir)) = recovered {
        let p = proxy.clone();
        tokio::task::spawn_blocking(move || restore(&p, recovered, &dir))
            .await
            .map_err(|e| Failure::Internal(format!("restoring the queue failed: {e}")))?;
    }
    if let (Ok(data), Ok(admin)) = (listeners.data.local_addr(), admin_addr) {
        tracing::info!(
            %data,
            %admin,
            upstream = %proxy.config().upstream.url,
            quotas = proxy.config().quotas.len(),
            routes = proxy.config().routes.len(),
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

    let data_threads = DataThreads::start(proxy.config().listen.data_threads)
        .map_err(|e| Failure::Io(format!("listen.data_threads: cannot start a thread: {e}")))?;
    let data_proxy = proxy.clone();
    let drain_proxy = proxy.clone();
    let (began_tx, began_rx) = tokio::sync::oneshot::channel();
    accept_loop(
        listeners.data,
        data_limits,
        proxy.data_conns.clone(),
        move |peer: SocketAddr, activity| {
            let p = data_proxy.clone();
            let peer = Peer::new(peer);
            hyper::service::service_fn(move |req: Request<RequestBody>| {
                data_plane::handle(p.clone(), req, peer.clone(), activity.begin())
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
        data_threads.handles(),
    )
    .await;
    data_threads.stop().await;

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
        return Err(Failure::Internal(why));
    }
    Ok(Stopped {
        undelivered: undelivered.len(),
        kept: data_dir.is_some(),
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
pub fn open(config: Config, clock: SharedClock) -> Result<Proxy, Failure> {
    let (proxy, recovered) = prepare(config, clock)?;
    if let Some((recovered, dir)) = recovered {
        restore(&proxy, recovered, &dir);
    }
    Ok(proxy)
}

/// What the log held, still to be restored, and where it lives.
type Pending = Option<(Recovered, std::path::PathBuf)>;

/// The proxy with its config's store opened (the data directory locked), and what the log held.
fn prepare(config: Config, clock: SharedClock) -> Result<(Proxy, Pending), Failure> {
    let Some(dir) = config.queue.data_dir.clone() else {
        let proxy = Proxy::new(config, clock, Store::memory()).map_err(Failure::Io)?;
        return Ok((proxy, None));
    };
    let (store, recovered) = Store::open(&dir)?;
    let mut proxy = Proxy::new(config, clock, store).map_err(Failure::Io)?;
    if proxy.config().ledger == LedgerConfig::Local {
        // The local ledger keeps its grants in the data directory too, so a restart knows what
        // the windows still open had spent.
        let (log, logged) = GrantLog::open(&dir)?;
        let grants: Vec<_> = logged
            .iter()
            .filter_map(|(name, at, n)| {
                let q = proxy.config().quotas.iter().position(|c| &c.name == name)?;
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
        let names = |q: QuotaId| proxy.config().quotas[q.0].name.clone();
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
    let configs = proxy.ledger.configs();
    let mut out = Vec::new();
    for (q, shadow) in proxy.ledger.shadow(now) {
        let name = &configs[q.0].name;
        out.extend(
            shadow_grants(shadow, now)
                .into_iter()
                .map(|(t, n)| (name.clone(), t.as_nanos(), n)),
        );
    }
    out
}

/// Rebuilds the queue from the log and says what it found.
fn restore(proxy: &Proxy, recovered: Recovered, dir: &std::path::Path) {
    if recovered.discarded_bytes > 0 {
        tracing::warn!(
            bytes = recovered.discarded_bytes,
            data_dir = %dir.display(),
            "the parked-write log ended in a torn record (a crash mid-write, or zeros a power loss \
             left); cut it off. A write in it was never answered 202"
        );
    }
    if recovered.upgraded {
        tracing::info!(data_dir = %dir.display(), "rewrote the parked-write log in the current format");
    }
    let id = |i: Option<u128>| i.map_or("none".to_string(), |i| format!("{i:032x}"));
    for q in &recovered.quarantined {
        tracing::error!(
            offset = q.offset,
            bytes = q.bytes,
            after_request = %id(q.after),
            before_request = %id(q.before),
            quarantine = %dir.join(crate::store::QUARANTINE_FILE).display(),
            "a damaged stretch of the parked-write log was skipped and moved to the quarantine file; \
             the records around it were kept. A write whose records were in it may be missing: check \
             the requests named"
        );
    }
    proxy.metrics.set_quarantined(
        recovered.quarantined.len() as u64,
        recovered.quarantined.iter().map(|q| q.bytes).sum(),
    );
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

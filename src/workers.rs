//! The data plane's threads (`listen.data_threads`): each runs a single-threaded runtime of its
//! own. The first accepts the data listener's connections and serves each itself, or hands it to
//! the least busy thread when it serves more than that one (`listener::accept`). The
//! connection's requests, and the CRM calls they make (each thread keeps its own CRM
//! connection pool: [`upstream::use_thread_pool`]), then all run on that one thread, with no
//! wake-up crossing threads; the ledger and the queue stay shared. There is one listening
//! socket: a second process cannot join the port unnoticed, as it could with `SO_REUSEPORT`.

use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::upstream;

pub struct DataThreads {
    handles: Vec<Handle>,
    threads: Vec<(std::thread::JoinHandle<()>, oneshot::Sender<()>)>,
}

impl DataThreads {
    /// `configured` threads (`None`: one per core; 0: none, the shared runtime serves).
    pub fn start(configured: Option<usize>) -> std::io::Result<DataThreads> {
        let n = configured.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        let mut started = DataThreads {
            handles: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
        };
        for i in 0..n {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("crm-proxy-data-{i}"))
                .spawn(move || {
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = handle_tx.send(Err(e));
                            return;
                        }
                    };
                    upstream::use_thread_pool();
                    let _ = handle_tx.send(Ok(runtime.handle().clone()));
                    // Serves what is spawned on it until stopped (or the proxy is gone).
                    runtime.block_on(async {
                        let _ = stop_rx.await;
                    });
                })?;
            let handle = handle_rx.recv().map_err(|_| {
                std::io::Error::other("a data thread ended before its runtime started")
            })??;
            started.handles.push(handle);
            started.threads.push((thread, stop_tx));
        }
        Ok(started)
    }

    /// The runtimes connections are handed to (none: the caller's runtime serves them).
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// Stops every thread (what still runs on them is dropped) and waits for them to end.
    pub async fn stop(self) {
        let threads: Vec<_> = self
            .threads
            .into_iter()
            .map(|(thread, stop)| {
                let _ = stop.send(());
                thread
            })
            .collect();
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::DataThreads;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn each_data_thread_runs_what_is_handed_to_it_until_stopped() {
        let threads = DataThreads::start(Some(2)).unwrap();
        assert_eq!(threads.handles().len(), 2);
        let mut names = Vec::new();
        for h in threads.handles() {
            let name = h
                .spawn(async { std::thread::current().name().map(str::to_string) })
                .await
                .unwrap();
            names.push(name.unwrap());
        }
        assert_eq!(names, ["crm-proxy-data-0", "crm-proxy-data-1"]);
        let kept = threads.handles()[0].clone();
        threads.stop().await;
        // A stopped thread's runtime runs nothing more.
        assert!(kept.spawn(async {}).await.is_err());
        assert_eq!(DataThreads::start(Some(0)).unwrap().handles().len(), 0);
    }
}

//! The access log: one structured line per request on the data listener (log target `access`,
//! in the process's log format), written when the request ends, or when its client goes away
//! before the answer. It names the method, the path without its query, the route, class,
//! client, outcome, status, the time the proxy held the request apart from the CRM's own, the
//! CRM's latency and the request id; never a header's value but the client's `X-Request-Id`.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};

use crate::config::{ACCESS_TARGET, AccessLog, Class};
use crate::ids::EntryId;
use crate::listener::RequestBody;
use crate::proxy::Proxy;
use crate::response::Body;
use crate::route::Route;

tokio::task_local! {
    static NOTE: RefCell<Note>;
}

/// What is known of one request so far; logged when it is dropped.
pub(super) struct Note {
    settings: AccessLog,
    /// This request's place in the access sequence (the sample is spread evenly by it).
    seq: u64,
    started: tokio::time::Instant,
    peer: SocketAddr,
    method: Method,
    path: String,
    route: String,
    class: &'static str,
    client: Option<String>,
    outcome: &'static str,
    status: Option<StatusCode>,
    crm: Option<Duration>,
    id: Option<EntryId>,
    client_request_id: Option<String>,
}

/// Answers one request with `handle`, logging it at the end (the access log is on).
pub(super) async fn logged<F>(
    p: &Proxy,
    settings: AccessLog,
    req: Request<RequestBody>,
    peer: SocketAddr,
    handle: impl FnOnce(Request<RequestBody>) -> F,
) -> Response<Body>
where
    F: Future<Output = Response<Body>>,
{
    let headers = req.headers();
    let note = Note {
        settings,
        seq: p.access_seq.fetch_add(1, Ordering::Relaxed),
        started: tokio::time::Instant::now(),
        peer,
        method: req.method().clone(),
        path: shortened(req.uri().path()),
        route: String::new(),
        class: "",
        client: None,
        outcome: "gone",
        status: None,
        crm: None,
        id: None,
        client_request_id: headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                v.len() <= 128
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            })
            .map(str::to_string),
    };
    NOTE.scope(RefCell::new(note), async {
        let resp = handle(req).await;
        with(|n| n.status = Some(resp.status()));
        resp
    })
    .await
}

/// Paths longer than this are logged cut, with `…`.
const PATH_LOGGED: usize = 512;

fn shortened(path: &str) -> String {
    if path.len() <= PATH_LOGGED {
        return path.to_string();
    }
    let mut end = PATH_LOGGED;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &path[..end])
}

fn with(f: impl FnOnce(&mut Note)) {
    let _ = NOTE.try_with(|n| f(&mut n.borrow_mut()));
}

/// The route the request was classified as.
pub(super) fn route(name: &str, class: Class) {
    with(|n| {
        n.route = name.to_string();
        n.class = class.name();
    });
}

/// The client (integration) the request was identified as.
pub(super) fn client(name: &str) {
    with(|n| n.client = Some(name.to_string()));
}

/// How the request ended; counted in `crm_proxy_requests_total` too.
pub(super) fn outcome(p: &Proxy, route: &str, outcome: &'static str) {
    p.metrics.request(route, outcome);
    with(|n| n.outcome = outcome);
}

/// [`outcome`] for a classified request: its route's series are held, not looked up.
pub(super) fn route_outcome(p: &Proxy, route: &Route, outcome: &'static str) {
    route.series(&p.metrics).request(outcome);
    with(|n| n.outcome = outcome);
}

/// How long the CRM took to answer (or to fail).
pub(super) fn crm(latency: Duration) {
    with(|n| n.crm = Some(latency));
}

/// The proxy's id of the request (a write that went through the queue).
pub(super) fn id(id: EntryId) {
    with(|n| n.id = Some(id));
}

/// Whether request number `seq` is in a sample of `share` (0 < share ≤ 1), spread evenly: the
/// integer part of `seq × share` steps up on exactly the sampled requests.
fn sampled(seq: u64, share: f64) -> bool {
    let at = |k: u64| (k as f64 * share).floor();
    at(seq + 1) > at(seq)
}

impl Drop for Note {
    fn drop(&mut self) {
        let error = self.status.is_none_or(|s| s.as_u16() >= 400);
        if !(sampled(self.seq, self.settings.sample) || error && self.settings.all_errors) {
            return;
        }
        let total = self.started.elapsed();
        let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
        let waited = total.saturating_sub(self.crm.unwrap_or_default());
        tracing::info!(
            target: ACCESS_TARGET,
            method = %self.method,
            path = %self.path,
            route = %self.route,
            class = %self.class,
            client = self.client.as_deref().map(display),
            outcome = %self.outcome,
            status = self.status.map(|s| s.as_u16()),
            waited_ms = ms(waited),
            crm_ms = self.crm.map(ms),
            total_ms = ms(total),
            request_id = self.id.map(display),
            x_request_id = self.client_request_id.as_deref().map(display),
            peer = %self.peer.ip(),
            "request"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::sampled;

    #[test]
    fn long_paths_are_cut() {
        assert_eq!(super::shortened("/api/v2/x"), "/api/v2/x");
        let long = format!("/{}", "é".repeat(400));
        let cut = super::shortened(&long);
        assert!(cut.ends_with('…') && cut.len() <= super::PATH_LOGGED + '…'.len_utf8());
    }

    #[test]
    fn the_sample_is_spread_evenly() {
        for (share, every) in [(1.0, 1), (0.5, 2), (0.1, 10), (0.25, 4)] {
            let picked: Vec<u64> = (0..100).filter(|&k| sampled(k, share)).collect();
            assert_eq!(picked.len(), 100 / every, "{share}");
            for pair in picked.windows(2) {
                assert_eq!(pair[1] - pair[0], every as u64, "{share}: {picked:?}");
            }
        }
        // A share that does not divide evenly still keeps its proportion.
        let n = (0..1000).filter(|&k| sampled(k, 0.3)).count();
        assert_eq!(n, 300);
    }
}

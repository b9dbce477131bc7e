//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/status`, and the operator's tools
//! for parked writes under `/requests`. Never on the data listener.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use serde::Serialize;

use crate::breaker::BreakerView;
use crate::ids::EntryId;
use crate::proxy::{ClientView, KeysView, Loaded, Phase, Proxy};
use crate::queue::Filter;
use crate::queue::{OpError, QueueStatus};
use crate::quota::{Forecast, QuotaStatus};
use crate::response::{self, Body};
use crate::shared_ledger::LedgerView;
use crate::status::{FailReason, Status as EntryStatus};
use crate::status_page;
use crate::upstream::Health;

#[derive(Serialize)]
struct Status {
    version: &'static str,
    ready: bool,
    /// `false`: shadow mode for the whole proxy (routes and quotas say their own).
    enforce: bool,
    now: String,
    upstream: Health,
    quotas: Vec<QuotaStatus>,
    /// Daily (long fixed) quotas: when each is forecast to run out, and its backlog's outlook.
    forecasts: Vec<Forecast>,
    /// Keyed quotas: keys tracked and overflow.
    keyed_quotas: Vec<KeysView>,
    clients: Vec<ClientView>,
    queue: QueueStatus,
    /// Where grants are decided: this process, or the ledger the replicas share.
    ledger: LedgerView,
    /// The config in force: its file's SHA-256 and when it was loaded.
    config: Loaded,
    /// Whether the drain is paused because the CRM fails as a whole.
    breaker: BreakerView,
}

pub async fn handle<B>(proxy: Arc<Proxy>, req: Request<B>) -> Response<Body> {
    if let Some(refusal) = proxy.admin_guard.check(&req) {
        return refusal;
    }
    let path = req.uri().path();
    if path == "/requests" || path.starts_with("/requests/") {
        return requests(&proxy, req.method(), path, req.uri().query()).await;
    }
    if let Some(rest) = path.strip_prefix("/quotas/") {
        return quota_action(&proxy, req.method(), rest);
    }
    if path == "/reload" {
        if req.method() != Method::POST {
            return response::method_not_allowed("POST");
        }
        let p = proxy.clone();
        let report = tokio::task::spawn_blocking(move || p.reload_from_file())
            .await
            .expect("the reload does not panic");
        let status = if report.result == "invalid" {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::OK
        };
        return response::json_response(status, &report);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return response::method_not_allowed("GET, HEAD");
    }
    if let Some(page) = status_page::serve(path, proxy.admin_guard.protected()) {
        return page;
    }
    match path {
        "/healthz" => match proxy.stuck() {
            None => response::text(StatusCode::OK, "ok\n"),
            Some(why) => response::text(StatusCode::SERVICE_UNAVAILABLE, format!("stuck: {why}\n")),
        },
        "/readyz" => match proxy.phase() {
            Phase::Ready => response::text(StatusCode::OK, "ready\n"),
            Phase::Starting => response::text(
                StatusCode::SERVICE_UNAVAILABLE,
                "starting: restoring parked writes\n",
            ),
            Phase::Stopping => response::text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n"),
        },
        "/metrics" => {
            proxy.refresh_metrics(proxy.clock.now());
            let mut resp = response::text(StatusCode::OK, proxy.metrics.encode());
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/status" => {
            let now = proxy.clock.now();
            let queue = proxy.queue.overview(&proxy.ledger, now);
            let status = Status {
                version: env!("CARGO_PKG_VERSION"),
                ready: proxy.is_ready(),
                enforce: proxy.config().enforce,
                now: now.to_string(),
                upstream: proxy.upstream().health(),
                quotas: proxy.ledger.snapshot(now),
                forecasts: proxy.forecasts(now),
                keyed_quotas: proxy.keys_views(),
                clients: proxy.client_views(&queue, now),
                queue,
                ledger: proxy.shared.view(),
                config: (*proxy.loaded()).clone(),
                breaker: proxy.breaker.view(),
            };
            response::json_response(StatusCode::OK, &status)
        }
        _ => response::admin_not_found(),
    }
}

/// `POST /quotas/{name}/resume`: lifts a pause (or a ceiling) the CRM's answers put on a quota,
/// here and, with the shared ledger, for every replica. The next request finds out from the CRM
/// whether it really has room.
fn quota_action(proxy: &Proxy, method: &Method, rest: &str) -> Response<Body> {
    let Some((name, "resume")) = rest.split_once('/') else {
        return response::not_found();
    };
    let Some(q) = proxy.config().quotas.iter().position(|c| c.name == name) else {
        return response::not_found();
    };
    if method != Method::POST {
        return response::method_not_allowed("POST");
    }
    let q = crate::ids::QuotaId(q);
    let was_paused = proxy.ledger.resume(q, proxy.clock.now());
    proxy.shared.resume(q);
    proxy.queue.wake();
    tracing::warn!(
        quota = name,
        was_paused,
        "an operator lifted the quota's pause"
    );
    response::json_response(
        StatusCode::OK,
        &serde_json::json!({ "quota": name, "was_paused": was_paused }),
    )
}

/// Most entries one listing returns unless `limit` says otherwise.
const LIST_LIMIT: usize = 100;

/// The operator's view of parked writes:
/// - `GET /requests?status=S&limit=N`: the proxy's parked writes, oldest first;
/// - `GET /requests/{id}`: one in full, credentials redacted;
/// - `POST /requests/{id}/retry`: send a failed or expired one again;
/// - `DELETE /requests/{id}`: give a failed or expired one up;
/// - `POST /requests/retry?…` and `POST /requests/discard?…`: the same for every dead letter a
///   filter selects (see [`bulk`]).
async fn requests(
    proxy: &Proxy,
    method: &Method,
    path: &str,
    query: Option<&str>,
) -> Response<Body> {
    let rest = path.trim_start_matches("/requests").trim_start_matches('/');
    if rest.is_empty() {
        if method != Method::GET && method != Method::HEAD {
            return response::method_not_allowed("GET, HEAD");
        }
        return match list_params(query) {
            Ok((status, limit)) => {
                let all = proxy.queue.list(status);
                let total = all.len();
                let requests: Vec<_> = all.into_iter().take(limit).collect();
                response::json_response(
                    StatusCode::OK,
                    &serde_json::json!({ "total": total, "requests": requests }),
                )
            }
            Err(e) => response::problem(StatusCode::BAD_REQUEST, "bad_query", e),
        };
    }
    if let "retry" | "discard" = rest {
        if method != Method::POST {
            return response::method_not_allowed("POST");
        }
        return bulk(proxy, rest == "retry", query).await;
    }
    let (id_text, action) = match rest.split_once('/') {
        Some((id, action)) => (id, Some(action)),
        None => (rest, None),
    };
    let Ok(id) = id_text.parse::<EntryId>() else {
        return response::not_found();
    };
    let commit = match (action, method) {
        (None, &Method::GET | &Method::HEAD) => {
            return match proxy.queue.inspect(id) {
                Some(detail) => response::json_response(StatusCode::OK, &detail),
                None => response::not_found(),
            };
        }
        (None, &Method::DELETE) => proxy.queue.discard(id),
        (None, _) => return response::method_not_allowed("GET, HEAD, DELETE"),
        (Some("retry"), &Method::POST) => {
            let ambiguous = proxy
                .queue
                .inspect(id)
                .is_some_and(|d| d.summary.reason == Some(FailReason::Ambiguous));
            if ambiguous && !confirms_ambiguous(query) {
                return response::problem(
                    StatusCode::CONFLICT,
                    "ambiguous",
                    "the CRM may already have applied this write; sending it again may apply it twice. Check the CRM, then POST again with confirm_ambiguous=true",
                );
            }
            proxy.queue.retry(id, proxy.clock.now())
        }
        (Some("retry"), _) => return response::method_not_allowed("POST"),
        (Some(_), _) => return response::not_found(),
    };
    let commit = match commit {
        Ok(c) => c,
        Err(OpError::NotFound) => return response::not_found(),
        Err(e @ OpError::WrongState(_)) => {
            return response::problem(StatusCode::CONFLICT, "wrong_state", e);
        }
    };
    if let Err(e) = commit.durable().await {
        return response::problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_stored",
            format!(
                "done in memory, but the log could not record it ({e}); it may be undone by a restart"
            ),
        );
    }
    match proxy.queue.inspect(id) {
        Some(detail) => response::json_response(StatusCode::OK, &detail.summary),
        None => response::json_response(
            StatusCode::OK,
            &serde_json::json!({ "id": id.to_string(), "status": "discarded" }),
        ),
    }
}

/// A bulk retry or discard. Without `confirm` it only counts (a dry run: how many, how many of
/// them ambiguous, the first ids); with `confirm=N` it acts, if the filter still selects exactly
/// N (otherwise 409 with the new count, nothing done).
async fn bulk(proxy: &Proxy, retry: bool, query: Option<&str>) -> Response<Body> {
    let mut filter = Filter::default();
    let mut confirm = None;
    let mut problems = Vec::new();
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let set = match &*key {
            "confirm_ambiguous" => Ok(()),
            "confirm" => value
                .parse::<usize>()
                .map(|n| confirm = Some(n))
                .map_err(|_| format!("confirm={value:?} is not a count")),
            _ => filter.set(&key, &value),
        };
        if let Err(e) = set {
            problems.push(e);
        }
    }
    let selection = proxy.queue.select(&filter);
    if let Err(e) = &selection {
        problems.push(e.clone());
    }
    let selection = match problems.is_empty() {
        true => selection,
        false => Err(problems.join("; ")),
    };
    let selection = match selection {
        Ok(s) => s,
        Err(e) => return response::problem(StatusCode::BAD_REQUEST, "bad_query", e),
    };
    let matched = selection.ids.len();
    let action = if retry { "retry" } else { "discard" };
    // Sending ambiguous writes again may apply them twice: the operator says so explicitly.
    let needs_ambiguous = retry && selection.ambiguous > 0 && !confirms_ambiguous(query);
    let Some(confirm) = confirm else {
        let first: Vec<String> = selection
            .ids
            .iter()
            .take(LIST_LIMIT)
            .map(|id| id.to_string())
            .collect();
        return response::json_response(
            StatusCode::OK,
            &serde_json::json!({
                "dry_run": true,
                "action": action,
                "matched": matched,
                "ambiguous": selection.ambiguous,
                "ids": first,
                "to_act": if needs_ambiguous {
                    format!("POST again with confirm={matched}&confirm_ambiguous=true (the CRM may already have applied the {} ambiguous ones)", selection.ambiguous)
                } else {
                    format!("POST again with confirm={matched}")
                },
            }),
        );
    };
    if needs_ambiguous {
        return response::problem(
            StatusCode::CONFLICT,
            "ambiguous",
            format!(
                "{} of the selected writes are ambiguous: the CRM may already have applied them. Check the CRM, then add confirm_ambiguous=true; nothing was done",
                selection.ambiguous
            ),
        );
    }
    if confirm != matched {
        return response::problem(
            StatusCode::CONFLICT,
            "selection_changed",
            format!(
                "the filter now selects {matched} dead letters, not {confirm}; nothing was done"
            ),
        );
    }
    let (result, commits) = if retry {
        proxy.queue.retry_all(&selection.ids, proxy.clock.now())
    } else {
        proxy.queue.discard_all(&selection.ids)
    };
    tracing::warn!(
        action,
        done = result.done,
        skipped = result.skipped,
        ?filter,
        "an operator acted on dead letters in bulk"
    );
    for c in commits {
        if let Err(e) = c.durable().await {
            return response::problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_stored",
                format!(
                    "done in memory, but the log could not record it ({e}); it may be undone by a restart"
                ),
            );
        }
    }
    response::json_response(
        StatusCode::OK,
        &serde_json::json!({ "action": action, "matched": matched, "done": result.done, "skipped": result.skipped }),
    )
}

/// Whether the query confirms that ambiguous writes may be sent again.
fn confirms_ambiguous(query: Option<&str>) -> bool {
    form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .any(|(k, v)| k == "confirm_ambiguous" && v == "true")
}

/// `status` and `limit` of a listing; anything else is an error.
fn list_params(query: Option<&str>) -> Result<(Option<EntryStatus>, usize), String> {
    let mut status = None;
    let mut limit = LIST_LIMIT;
    for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*key {
            "status" => status = Some(value.parse()?),
            "limit" => {
                limit = value
                    .parse()
                    .map_err(|_| format!("limit {value:?} is not a number"))?;
            }
            _ => return Err(format!("unknown parameter {key:?} (status, limit)")),
        }
    }
    Ok((status, limit))
}

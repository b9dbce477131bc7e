//! The binary's `queue` subcommand: list, show, retry and discard parked writes in a data
//! directory (one by id, or every dead letter a filter selects).

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use crm_quota_proxy::clock::SystemClock;
use crm_quota_proxy::config::Config;
use crm_quota_proxy::ids::EntryId;
use crm_quota_proxy::open;
use crm_quota_proxy::proxy::Proxy;
use crm_quota_proxy::queue::{Filter, OpError};
use crm_quota_proxy::server::Failure;
use crm_quota_proxy::status::Status;
use crm_quota_proxy::store::Store;

#[derive(Subcommand)]
pub enum QueueAction {
    /// List parked writes, oldest first.
    List {
        /// Only writes in this status: queued, dispatching, done, failed or expired.
        #[arg(long)]
        status: Option<Status>,
    },
    /// Show one parked write as JSON, credentials redacted.
    Show {
        /// The write's id (as `queue list` or a 202's `id` gives it).
        id: EntryId,
    },
    /// Queue a failed or expired write again (fresh attempts and TTL); it is sent after start.
    /// Without an id: every dead letter the filters select (a count first; `--yes` acts).
    Retry {
        /// The write's id; without one, the filters select.
        id: Option<EntryId>,
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Give a failed or expired write up for good. Without an id: every dead letter the
    /// filters select (a count first; `--yes` acts).
    Discard {
        /// The write's id; without one, the filters select.
        id: Option<EntryId>,
        #[command(flatten)]
        filter: FilterArgs,
    },
}

const FILTER_FLAGS: &str = "--status, --reason, --route, --client, --since, --until";

/// Which dead letters a bulk `retry` or `discard` takes.
#[derive(Args)]
pub struct FilterArgs {
    /// failed or expired.
    #[arg(long)]
    status: Option<String>,
    /// Why it failed: attempts_exhausted, ambiguous or rejected.
    #[arg(long)]
    reason: Option<String>,
    /// Route name.
    #[arg(long)]
    route: Option<String>,
    /// Client name.
    #[arg(long)]
    client: Option<String>,
    /// Given up at or after this time (RFC 3339, e.g. 2026-12-02T08:00:00Z).
    #[arg(long)]
    since: Option<String>,
    /// Given up before this time (RFC 3339).
    #[arg(long)]
    until: Option<String>,
    /// Act on what the filters select (without it, only count).
    #[arg(long)]
    yes: bool,
}

impl FilterArgs {
    /// The filter, or every problem with the flags given.
    fn filter(&self) -> anyhow::Result<Option<Filter>> {
        let given = [
            ("status", &self.status),
            ("reason", &self.reason),
            ("route", &self.route),
            ("client", &self.client),
            ("since", &self.since),
            ("until", &self.until),
        ];
        let mut filter = Filter::default();
        let problems: Vec<String> = given
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
            .filter_map(|(k, v)| filter.set(k, v).err())
            .collect();
        anyhow::ensure!(problems.is_empty(), "{}", problems.join("\n"));
        let any = given.iter().any(|(_, v)| v.is_some()) || self.yes;
        Ok(any.then_some(filter))
    }
}

/// The `queue` subcommand on a data directory: `list` and `show` read it without changing
/// anything; `retry` and `discard` open it as a start would (refused while a proxy holds it).
pub async fn queue_command(config: Config, action: QueueAction) -> anyhow::Result<ExitCode> {
    let admin = config.listen.admin;
    let Some(dir) = config.queue.data_dir.clone() else {
        anyhow::bail!(
            "queue.store is memory: parked writes live only in the running proxy; use http://{admin}/requests"
        );
    };
    // A bulk action without `--yes` only counts: read-only too.
    let dry_run = match &action {
        QueueAction::Retry { id: None, filter } | QueueAction::Discard { id: None, filter } => {
            !filter.yes
        }
        QueueAction::List { .. } | QueueAction::Show { .. } => true,
        _ => false,
    };
    if dry_run {
        let recovered = Store::inspect(&dir).map_err(Failure::from)?;
        for q in &recovered.quarantined {
            eprintln!(
                "warning: {} damaged bytes at offset {} of the log would be quarantined at the next start",
                q.bytes, q.offset
            );
        }
        let clock = SystemClock::shared();
        let proxy =
            Proxy::new(config, clock.clone(), Store::memory()).map_err(anyhow::Error::msg)?;
        proxy.queue.restore(recovered.entries, clock.now());
        let mut out = std::io::stdout().lock();
        let shown = match action {
            QueueAction::List { status } => list(&mut out, &proxy.queue.list(status), &dir),
            QueueAction::Show { id } => match proxy.queue.inspect(id) {
                Some(detail) => writeln!(out, "{}", serde_json::to_string_pretty(&detail)?),
                None => {
                    eprintln!("{id}: {}", OpError::NotFound);
                    return Ok(ExitCode::FAILURE);
                }
            },
            QueueAction::Retry { filter, .. } | QueueAction::Discard { filter, .. } => {
                let Some(f) = filter.filter()? else {
                    anyhow::bail!(
                        "name a write by its id, or select dead letters with filters ({FILTER_FLAGS})"
                    );
                };
                let selection = proxy.queue.select(&f).map_err(anyhow::Error::msg)?;
                writeln!(
                    out,
                    "{} dead letters match ({} ambiguous: the CRM may have applied them); add --yes to act on them",
                    selection.ids.len(),
                    selection.ambiguous
                )
            }
        };
        // A reader that went away (`| head`) is not an error.
        return match shown {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
            _ => Ok(ExitCode::SUCCESS),
        };
    }
    let proxy = match open(config, SystemClock::shared()) {
        Ok(p) => p,
        Err(Failure::InUse(why)) => {
            return Err(Failure::InUse(format!(
                "{why}\nwhile the proxy runs, use its admin endpoints: http://{admin}/requests"
            ))
            .into());
        }
        Err(f) => return Err(f.into()),
    };
    let queue = &proxy.queue;
    let (retry, id, args) = match &action {
        QueueAction::Retry { id, filter } => (true, *id, filter),
        QueueAction::Discard { id, filter } => (false, *id, filter),
        QueueAction::List { .. } | QueueAction::Show { .. } => unreachable!("handled above"),
    };
    let filter = args.filter()?;
    let Some(id) = id else {
        let filter = filter.expect("--yes makes a filter");
        let selection = queue.select(&filter).map_err(anyhow::Error::msg)?;
        let verb = if retry { "retry" } else { "discard" };
        let (result, commits) = match retry {
            true => queue.retry_all(&selection.ids, proxy.clock.now()),
            false => queue.discard_all(&selection.ids),
        };
        for c in commits {
            c.durable().await?;
        }
        println!("{verb}: {} done, {} skipped", result.done, result.skipped);
        return Ok(ExitCode::SUCCESS);
    };
    anyhow::ensure!(filter.is_none(), "give an id or filters, not both");
    let commit = match retry {
        true => queue.retry(id, proxy.clock.now()),
        false => queue.discard(id),
    };
    match commit {
        Ok(commit) => {
            commit.durable().await?;
            let done = match queue.inspect(id) {
                Some(_) => "queued again; it is sent when the proxy starts",
                None => "discarded",
            };
            println!("{id}: {done}");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("{id}: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The `queue list` table.
fn list(
    out: &mut impl std::io::Write,
    list: &[crm_quota_proxy::queue::EntrySummary],
    dir: &Path,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<32}  {:<11}  {:<20}  {:<12}  {:>8}  {:<30}  ERROR",
        "ID", "STATUS", "ROUTE", "CLIENT", "ATTEMPTS", "CREATED"
    )?;
    for e in list {
        writeln!(
            out,
            "{:<32}  {:<11}  {:<20}  {:<12}  {:>8}  {:<30}  {}",
            e.id,
            e.status.name(),
            e.route,
            e.client,
            e.attempts,
            e.created_at,
            e.error.as_deref().unwrap_or_default()
        )?;
    }
    eprintln!("{} parked writes in {}", list.len(), dir.display());
    Ok(())
}

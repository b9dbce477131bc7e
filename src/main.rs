//! The `crm-quota-proxy` binary: `run`, `check`, `queue`, `fingerprint` and `demo`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use crm_quota_proxy::clock::SystemClock;
use crm_quota_proxy::config::Config;
use crm_quota_proxy::demo::{self, DemoOptions};
use crm_quota_proxy::ids::{EntryId, Fingerprint};
use crm_quota_proxy::queue::OpError;
use crm_quota_proxy::status::Status;
use crm_quota_proxy::units::parse_duration;
use crm_quota_proxy::{Listeners, open, serve};

/// Exit status for an invalid config (sysexits EX_USAGE... EX_DATAERR is 65; 64 is what ops expect here).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "crm-quota-proxy",
    version,
    about = "Rate-limiting sidecar that spends a CRM's API quota on purpose"
)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `--config FILE` (or `CRM_PROXY_CONFIG`), shared by the commands that read a config.
#[derive(Args)]
struct ConfigPath {
    #[arg(
        long = "config",
        short = 'c',
        env = "CRM_PROXY_CONFIG",
        default_value = "/etc/crm-quota-proxy/config.yaml"
    )]
    path: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        #[command(flatten)]
        config: ConfigPath,
    },
    /// Validate a config file: exit 0 if valid, 64 with every problem listed if not.
    Check {
        #[command(flatten)]
        config: ConfigPath,
    },
    /// Inspect and mend the parked writes in a stopped proxy's data directory (`store: disk`).
    /// While the proxy runs, use its admin endpoints under `/requests` instead.
    Queue {
        #[command(flatten)]
        config: ConfigPath,
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Print the fingerprint of a credential read from standard input (the whole value of its
    /// Authorization header, e.g. "Bearer …"), for client `credential` rules. Nothing is stored.
    Fingerprint,
    /// Start a simulated CRM and the proxy on loopback and show a burst going through (no config needed).
    Demo {
        /// The simulated CRM's calls per window.
        #[arg(long, default_value_t = 30)]
        limit: u32,
        /// The simulated CRM's window.
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        window: Duration,
        #[arg(long, default_value_t = 75)]
        creates: usize,
        #[arg(long, default_value_t = 15)]
        searches: usize,
    },
}

#[derive(Subcommand)]
enum QueueAction {
    /// List parked writes, oldest first.
    List {
        /// Only writes in this status: queued, dispatching, done, failed or expired.
        #[arg(long)]
        status: Option<Status>,
    },
    /// Show one parked write as JSON, credentials redacted.
    Show { id: EntryId },
    /// Queue a failed or expired write again (fresh attempts and TTL); it is sent after start.
    Retry { id: EntryId },
    /// Give a failed or expired write up for good.
    Discard { id: EntryId },
}

/// The `queue` subcommand on a stopped proxy's data directory.
async fn queue_command(config: Config, action: QueueAction) -> anyhow::Result<ExitCode> {
    let admin = config.listen.admin;
    let Some(dir) = config.queue.data_dir.clone() else {
        anyhow::bail!(
            "queue.store is memory: parked writes live only in the running proxy; use http://{admin}/requests"
        );
    };
    let proxy = open(config, SystemClock::shared()).map_err(|e| {
        anyhow::anyhow!(
            "{e}\nwhile the proxy runs, use its admin endpoints: http://{admin}/requests"
        )
    })?;
    let queue = &proxy.queue;
    let (id, commit) = match action {
        QueueAction::List { status } => {
            let list = queue.list(status);
            println!(
                "{:<32}  {:<11}  {:<20}  {:<12}  {:>8}  {:<30}  ERROR",
                "ID", "STATUS", "ROUTE", "CLIENT", "ATTEMPTS", "CREATED"
            );
            for e in &list {
                println!(
                    "{:<32}  {:<11}  {:<20}  {:<12}  {:>8}  {:<30}  {}",
                    e.id,
                    e.status.name(),
                    e.route,
                    e.client,
                    e.attempts,
                    e.created_at,
                    e.error.as_deref().unwrap_or_default()
                );
            }
            eprintln!("{} parked writes in {}", list.len(), dir.display());
            return Ok(ExitCode::SUCCESS);
        }
        QueueAction::Show { id } => {
            return match queue.inspect(id) {
                Some(detail) => {
                    println!("{}", serde_json::to_string_pretty(&detail)?);
                    Ok(ExitCode::SUCCESS)
                }
                None => {
                    eprintln!("{id}: {}", OpError::NotFound);
                    Ok(ExitCode::FAILURE)
                }
            };
        }
        QueueAction::Retry { id } => (id, queue.retry(id, proxy.clock.now())),
        QueueAction::Discard { id } => (id, queue.discard(id)),
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

fn init_tracing(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!(
            "{}: invalid config ({} problems):",
            path.display(),
            errors.0.len()
        );
        for e in &errors.0 {
            eprintln!("  {e}");
        }
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            config: ConfigPath { path: config },
        } => match load(&config) {
            Ok(c) => {
                println!(
                    "{}: valid ({} quotas, {} routes, upstream {})",
                    config.display(),
                    c.quotas.len(),
                    c.routes.len(),
                    c.upstream.url
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(code) => Ok(code),
        },
        Command::Run {
            config: ConfigPath { path },
        } => {
            init_tracing(cli.log_format, "info");
            let config = match load(&path) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            let listeners = Listeners::bind(&config).await.with_context(|| {
                format!("binding {} and {}", config.listen.data, config.listen.admin)
            })?;
            let stopped = serve(config, listeners, SystemClock::shared(), shutdown_signal())
                .await
                .map_err(anyhow::Error::msg)?;
            tracing::info!(undelivered = stopped.undelivered, "exited");
            Ok(ExitCode::SUCCESS)
        }
        Command::Queue {
            config: ConfigPath { path: config },
            action,
        } => {
            init_tracing(cli.log_format, "warn");
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            queue_command(config, action).await
        }
        Command::Fingerprint => {
            let mut credential = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut credential)?;
            let value = http::HeaderValue::from_str(credential.trim_end_matches(['\r', '\n']))
                .context("the credential is not a valid header value")?;
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::AUTHORIZATION, value);
            println!("{}", Fingerprint::of(&headers).to_hex());
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            limit,
            window,
            creates,
            searches,
        } => {
            // The demo prints its own live view; only warnings and errors are logged.
            init_tracing(cli.log_format, "warn");
            let opts = DemoOptions {
                limit,
                window,
                creates,
                searches,
            };
            demo::run(opts, &mut std::io::stdout())
                .await
                .map_err(anyhow::Error::msg)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

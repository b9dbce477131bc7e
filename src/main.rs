//! The `crm-quota-proxy` binary: `run`, `check`, `queue`, `fingerprint`, `sim`, `demo` and
//! `completions`.

mod cli_queue;

use cli_queue::{QueueAction, queue_command};

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use crm_quota_proxy::Listeners;
use crm_quota_proxy::clock::SystemClock;
use crm_quota_proxy::config::Config;
use crm_quota_proxy::demo::{self, DemoOptions};
use crm_quota_proxy::ids::Fingerprint;
use crm_quota_proxy::server::{Control, Failure, serve_with};
use crm_quota_proxy::sim::command::{Outage, SimOptions};
use crm_quota_proxy::sim::{self, SimConfig, SimFlavor, SimWindow};
use crm_quota_proxy::store::Store;
use crm_quota_proxy::units::parse_duration;

/// Exit status for an invalid config (sysexits EX_USAGE... EX_DATAERR is 65; 64 is what ops expect here).
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(
    name = "crm-quota-proxy",
    version,
    about = "Rate-limiting sidecar that spends a CRM's API quota on purpose"
)]
struct Cli {
    /// Log line format of `run` and `queue` (also accepted after the command).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

/// `--log-format`, for the commands that log (`run`, `queue`).
#[derive(Args)]
struct Logging {
    /// Log line format (logs go to standard error) [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Flavor {
    Zendesk,
    Salesforce,
    Hubspot,
}

#[derive(Clone, Copy, ValueEnum)]
enum WindowArg {
    Fixed,
    Sliding,
}

#[derive(Clone, Copy, Default, ValueEnum)]
enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `--config FILE` (or `CRM_PROXY_CONFIG`), shared by the commands that read a config.
#[derive(Args)]
struct ConfigPath {
    /// The config file (YAML; see the README's configuration reference).
    #[arg(
        long = "config",
        short = 'c',
        global = true,
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
        #[command(flatten)]
        logging: Logging,
    },
    /// Validate a config file: exit 0 if valid, 64 with every problem listed if not.
    Check {
        #[command(flatten)]
        config: ConfigPath,
        /// Also check what `run` would need on this machine: the data directory can be created
        /// and written, and the listen addresses are free (exit 74 or 75 when not).
        #[arg(long)]
        runtime: bool,
    },
    /// Inspect and mend the parked writes in a stopped proxy's data directory (`store: disk`).
    /// While the proxy runs, use its admin endpoints under `/requests` instead.
    Queue {
        #[command(flatten)]
        config: ConfigPath,
        #[command(flatten)]
        logging: Logging,
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Print the fingerprint of a credential read from standard input (the whole value of its
    /// Authorization header, e.g. "Bearer …"), for client `credential` rules. Nothing is stored.
    Fingerprint,
    /// Print a completion script for a shell, e.g.
    /// `crm-quota-proxy completions bash > /etc/bash_completion.d/crm-quota-proxy`.
    Completions {
        /// The shell: bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Run the simulated CRM: it counts its quota and answers like the CRM it imitates (429s,
    /// rate-limit headers, Zendesk's batch jobs), to try a preset locally. Stops on Ctrl-C.
    Sim {
        /// Where it listens.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: std::net::SocketAddr,
        /// Which CRM it imitates.
        #[arg(long, value_enum, default_value = "zendesk")]
        flavor: Flavor,
        /// Calls accepted per window; more get the CRM's over-limit answer.
        #[arg(long, default_value_t = 400)]
        limit: u32,
        /// The quota's window.
        #[arg(long, default_value = "1m", value_parser = parse_duration)]
        window: Duration,
        /// Windows aligned to the clock (like Zendesk's minute) or sliding.
        #[arg(long, value_enum, default_value = "fixed")]
        kind: WindowArg,
        /// Added before every answer.
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        latency: Duration,
        /// How long a batch job (create_many, update_many) runs.
        #[arg(long, default_value = "500ms", value_parser = parse_duration)]
        job_delay: Duration,
        /// An outage, START:LENGTH:KIND, e.g. 30s:20s:503 (KIND: a status, reset or hang).
        #[arg(long, value_parser = Outage::parse)]
        outage: Option<Outage>,
        /// Answer 404 to the batch endpoints, like a CRM (or stub) that knows only single calls.
        #[arg(long)]
        no_batch_endpoints: bool,
    },
    /// Start a simulated CRM and the proxy on loopback and show a burst going through (no config needed).
    Demo {
        /// The simulated CRM's calls per window.
        #[arg(long, default_value_t = 30)]
        limit: u32,
        /// The simulated CRM's window.
        #[arg(long, default_value = "20s", value_parser = parse_duration)]
        window: Duration,
        /// Ticket creates sent at once.
        #[arg(long, default_value_t = 75)]
        creates: usize,
        /// Contact searches spread over one window while the creates go through.
        #[arg(long, default_value_t = 6)]
        searches: usize,
        /// Instead: a licence's day compressed into a minute (120 calls a day, 30 per 5 s), a
        /// backlog parked at its start and searches through it, spent first come, first served
        /// beside a proxy that paces the day (the other options do not apply).
        #[arg(long)]
        day: bool,
    },
}

/// Sets up logging; the handle changes the level filter while running (`log_level` on reload).
/// `RUST_LOG`, when set, wins over the config.
fn init_tracing(format: LogFormat, default_level: &str) -> LogLevel {
    use tracing_subscriber::prelude::*;
    let from_env = std::env::var("RUST_LOG").ok();
    let filter =
        tracing_subscriber::EnvFilter::try_new(from_env.as_deref().unwrap_or(default_level))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let ansi = std::io::stderr().is_terminal();
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
    LogLevel {
        handle,
        pinned: from_env.is_some(),
    }
}

/// The running process's log level filter.
struct LogLevel {
    handle: tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >,
    /// `RUST_LOG` was set: the config's level does not apply.
    pinned: bool,
}

impl LogLevel {
    fn set(&self, level: &str) -> Result<(), String> {
        if self.pinned {
            return Ok(());
        }
        let filter = tracing_subscriber::EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        self.handle.reload(filter).map_err(|e| e.to_string())
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        let n = errors.0.len();
        eprintln!(
            "{}: invalid config ({n} problem{}):",
            path.display(),
            if n == 1 { "" } else { "s" }
        );
        for e in &errors.0 {
            eprintln!("  {e}");
        }
        ExitCode::from(EXIT_BAD_CONFIG)
    })
}

/// `run`: serves until SIGTERM, SIGINT or SIGQUIT; SIGHUP reloads the config; SIGUSR1 and
/// SIGUSR2 are logged and ignored (no signal ends the process silently). The exit status says
/// how it ended (see the README's exit codes).
async fn run(format: LogFormat, path: &Path) -> ExitCode {
    let log_level = init_tracing(format, "info");
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            tracing::error!(
                config = %path.display(),
                problems = errors.0.len(),
                "invalid config; not starting"
            );
            for e in &errors.0 {
                tracing::error!(field = %e.path, "{}", e.message);
            }
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if let Err(e) = log_level.set(&config.log_filter()) {
        tracing::warn!(error = %e, "log_level not applied");
    }
    let listeners = match Listeners::bind(&config).await {
        Ok(l) => l,
        Err(f) => return failed(&f),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<&'static str>();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let signals = tokio::spawn(signals(stop_tx, reload_tx));
    let control = Control {
        config_path: Some(path.to_path_buf()),
        reload: Some(reload_rx),
        log_level: Some(Box::new(move |level: &str| log_level.set(level))),
    };
    let shutdown = async move {
        if let Ok(name) = stop_rx.await {
            tracing::info!(signal = name, "received; stopping");
        }
    };
    let result = serve_with(config, listeners, SystemClock::shared(), shutdown, control).await;
    signals.abort();
    match result {
        Ok(stopped) if stopped.undelivered > 0 && !stopped.kept => {
            tracing::error!(
                lost = stopped.undelivered,
                "exited with accepted writes lost (the memory store keeps nothing); exit status 1"
            );
            ExitCode::from(1)
        }
        Ok(stopped) => {
            tracing::info!(
                undelivered = stopped.undelivered,
                "exited{}",
                if stopped.undelivered > 0 {
                    "; the undelivered writes are kept in the data directory and sent after the next start"
                } else {
                    ""
                }
            );
            ExitCode::SUCCESS
        }
        Err(f) => failed(&f),
    }
}

/// What `check --runtime` verifies besides the file: the data directory and the ports.
async fn check_runtime(config: &Config) -> Result<(), Failure> {
    if let Some(dir) = &config.queue.data_dir {
        Store::check_dir(dir)?;
    }
    Listeners::bind(config).await.map(drop)
}

/// Logs a failure (in the chosen log format) and turns it into the exit status of its class.
fn failed(f: &Failure) -> ExitCode {
    tracing::error!(exit_status = f.exit_code(), "{f}");
    ExitCode::from(f.exit_code())
}

/// Turns signals into a stop (TERM, INT, QUIT) or a reload (HUP); logs the ones it ignores.
async fn signals(
    stop: tokio::sync::oneshot::Sender<&'static str>,
    reload: tokio::sync::mpsc::UnboundedSender<()>,
) {
    use tokio::signal::unix::{SignalKind, signal};
    let listen = |kind: SignalKind| signal(kind).expect("installing a signal handler");
    let mut term = listen(SignalKind::terminate());
    let mut int = listen(SignalKind::interrupt());
    let mut quit = listen(SignalKind::quit());
    let mut hup = listen(SignalKind::hangup());
    let mut usr1 = listen(SignalKind::user_defined1());
    let mut usr2 = listen(SignalKind::user_defined2());
    let name = loop {
        tokio::select! {
            _ = term.recv() => break "SIGTERM",
            _ = int.recv() => break "SIGINT",
            _ = quit.recv() => break "SIGQUIT",
            _ = hup.recv() => {
                tracing::info!(signal = "SIGHUP", "received; reloading the config");
                let _ = reload.send(());
            }
            _ = usr1.recv() => tracing::warn!(signal = "SIGUSR1", "received and ignored"),
            _ = usr2.recv() => tracing::warn!(signal = "SIGUSR2", "received and ignored"),
        }
    };
    let _ = stop.send(name);
    // Later signals while stopping are noted, not obeyed twice.
    loop {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            _ = quit.recv() => {}
            _ = hup.recv() => {}
        }
        tracing::warn!("a signal arrived while stopping; still stopping");
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match command(cli).await {
        Ok(code) => code,
        // Expected failures print their message (never a backtrace) and the status of their
        // class; anything else is 1.
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(e.downcast_ref::<Failure>().map_or(1, Failure::exit_code))
        }
    }
}

async fn command(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Check {
            config: ConfigPath { path: config },
            runtime,
        } => match load(&config) {
            Ok(c) => {
                if runtime && let Err(f) = check_runtime(&c).await {
                    eprintln!("{}: {f}", config.display());
                    return Ok(ExitCode::from(f.exit_code()));
                }
                let count = |n: usize, what: &str| match n {
                    1 => format!("1 {what}"),
                    n => format!("{n} {what}s"),
                };
                println!(
                    "{}: valid ({}, {}, upstream {}){}",
                    config.display(),
                    count(c.quotas.len(), "quota"),
                    count(c.routes.len(), "route"),
                    c.upstream.url,
                    if runtime {
                        "; data directory and listen addresses usable"
                    } else {
                        ""
                    }
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(code) => Ok(code),
        },
        Command::Run {
            config: ConfigPath { path },
            logging,
        } => Ok(run(
            logging.log_format.or(cli.log_format).unwrap_or_default(),
            &path,
        )
        .await),
        Command::Queue {
            config: ConfigPath { path: config },
            logging,
            action,
        } => {
            init_tracing(
                logging.log_format.or(cli.log_format).unwrap_or_default(),
                "warn",
            );
            let config = match load(&config) {
                Ok(c) => c,
                Err(code) => return Ok(code),
            };
            queue_command(config, action).await
        }
        Command::Fingerprint => {
            if std::io::stdin().is_terminal() {
                eprintln!(
                    "reading the credential (the whole Authorization value) from standard input; end with Ctrl-D"
                );
            }
            let mut credential = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut credential)?;
            let credential = credential.trim_end_matches(['\r', '\n']);
            if credential.trim().is_empty() {
                anyhow::bail!(
                    "no credential on standard input: pipe the Authorization value in, e.g. printf %s \"Bearer $TOKEN\" | crm-quota-proxy fingerprint"
                );
            }
            let value = http::HeaderValue::from_str(credential)
                .context("the credential is not a valid header value")?;
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::AUTHORIZATION, value);
            println!("{}", Fingerprint::of(&headers).to_hex());
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "crm-quota-proxy", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Sim {
            listen,
            flavor,
            limit,
            window,
            kind,
            latency,
            job_delay,
            outage,
            no_batch_endpoints,
        } => {
            init_tracing(LogFormat::Text, "warn");
            let config = SimConfig {
                kind: match kind {
                    WindowArg::Fixed => SimWindow::Fixed,
                    WindowArg::Sliding => SimWindow::Sliding,
                },
                flavor: match flavor {
                    Flavor::Zendesk => SimFlavor::Zendesk,
                    Flavor::Salesforce => SimFlavor::Salesforce,
                    Flavor::Hubspot => SimFlavor::HubSpot,
                },
                latency,
                job_delay,
                batch_endpoints: !no_batch_endpoints,
                ..SimConfig::new(limit, window)
            };
            let opts = SimOptions {
                listen,
                config,
                outage,
                every: Duration::from_secs(5),
            };
            let stop = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            sim::command::serve(opts, &mut std::io::stdout(), stop)
                .await
                .with_context(|| format!("cannot serve the simulated CRM on {listen}"))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            limit,
            window,
            creates,
            searches,
            day,
        } => {
            if day {
                // It ends with backlogs still parked, on purpose: not worth a warning each.
                init_tracing(LogFormat::Text, "warn,crm_quota_proxy::server=off");
                demo::day::run(demo::day::DayOptions::default(), &mut std::io::stdout())
                    .await
                    .map_err(anyhow::Error::msg)?;
                return Ok(ExitCode::SUCCESS);
            }
            // The demo prints its own live view; only warnings and errors are logged.
            init_tracing(LogFormat::Text, "warn");
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

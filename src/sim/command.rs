//! `crm-quota-proxy sim`: the simulated CRM on the command line, to try a preset locally. It
//! prints what it counts every few seconds and a last line when stopped.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use super::{Fault, Sim, SimConfig, SimFlavor, SimWindow};
use crate::units::format_duration;

/// An outage to inject: after `start`, every call meets `fault` for `length`.
#[derive(Debug, Clone)]
pub struct Outage {
    pub start: Duration,
    pub length: Duration,
    pub fault: Fault,
}

impl Outage {
    /// `START:LENGTH:KIND`, e.g. `30s:20s:503`; KIND is an HTTP status, `reset` (connections
    /// closed unanswered) or `hang` (no answer for longer than any timeout).
    pub fn parse(text: &str) -> Result<Outage, String> {
        let bad = || {
            format!(
                "{text:?} is not an outage (write START:LENGTH:KIND, e.g. 30s:20s:503; KIND: a status, reset or hang)"
            )
        };
        let mut parts = text.split(':');
        let (Some(start), Some(length), Some(kind), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        let start = crate::units::parse_duration(start)?;
        let length = crate::units::parse_duration(length)?;
        let fault = match kind {
            "reset" => Fault::Reset,
            "hang" => Fault::Delay(Duration::from_secs(3_600)),
            status => match status.parse::<u16>() {
                Ok(s) if (400..600).contains(&s) => Fault::Status(s),
                _ => return Err(bad()),
            },
        };
        Ok(Outage {
            start,
            length,
            fault,
        })
    }
}

/// What `sim` serves.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub listen: SocketAddr,
    pub config: SimConfig,
    pub outage: Option<Outage>,
    /// How often the counts are printed.
    pub every: Duration,
}

/// Serves until `stop` completes, printing counts to `out`.
pub async fn serve(
    opts: SimOptions,
    out: &mut (impl Write + Send),
    stop: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let cfg = &opts.config;
    let flavor = match cfg.flavor {
        SimFlavor::Zendesk => "Zendesk",
        SimFlavor::Salesforce => "Salesforce",
        SimFlavor::HubSpot => "HubSpot",
    };
    let kind = match cfg.kind {
        SimWindow::Fixed => "fixed windows",
        SimWindow::Sliding => "a sliding window",
    };
    let sim = Sim::start_on(opts.config.clone(), opts.listen).await?;
    writeln!(
        out,
        "simulated {flavor} CRM on {}: {} calls per {} ({kind}), {} latency, batch jobs run {}",
        sim.url(),
        cfg.limit,
        format_duration(cfg.window),
        format_duration(cfg.latency),
        format_duration(cfg.job_delay),
    )?;
    if let Some(o) = &opts.outage {
        writeln!(
            out,
            "an outage ({:?}) starts in {} and lasts {}",
            o.fault,
            format_duration(o.start),
            format_duration(o.length)
        )?;
    }
    let started = tokio::time::Instant::now();
    let mut outage = opts.outage;
    let mut tick = tokio::time::interval(opts.every);
    tick.tick().await;
    tokio::pin!(stop);
    loop {
        let outage_at = outage.as_ref().map(|o| started + o.start);
        tokio::select! {
            _ = &mut stop => break,
            _ = tick.tick() => {}
            _ = async { tokio::time::sleep_until(outage_at.unwrap_or(started)).await }, if outage_at.is_some() => {
                if let Some(o) = outage.take() {
                    sim.outage(o.length, o.fault);
                    writeln!(out, "outage: every call fails for {}", format_duration(o.length))?;
                }
                continue;
            }
        }
        let s = sim.stats();
        writeln!(
            out,
            "t={:>4}s  calls {} | accepted {} | 429s {} | tickets {} | batch calls {} | job polls {}",
            started.elapsed().as_secs(),
            s.calls,
            s.accepted,
            s.throttled,
            s.tickets,
            s.batch_calls,
            s.job_polls
        )?;
    }
    let s = sim.stats();
    writeln!(
        out,
        "stopped: {} calls, {} answered 429, {} tickets, most calls in one window {} (limit {})",
        s.calls, s.throttled, s.tickets, s.max_in_fixed_window, cfg.limit
    )?;
    sim.shutdown().await;
    Ok(())
}

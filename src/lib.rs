//! crm-quota-proxy: a rate-limiting sidecar between a contact-center platform and a CRM API. It
//! spends the CRM's quota on purpose and never loses a parked write.
//!
//! Modules import only downward, layer by layer (`docs/architecture.md`; `tests/layering.rs`
//! checks it):
//!
//! - leaves: [`clock`] (the injected time), [`units`] (durations, sizes), [`ids`], [`status`]
//!   (a parked write's status and fail reasons), [`matching`] (path patterns, CIDR, globs),
//!   [`tls`], [`message`] (HTTP messages between hops), [`crm`] (each CRM's headers, throttle
//!   signals and Zendesk's batch endpoints), [`frames`] (small stack frames on the request path);
//! - [`config`]: YAML → validated [`config::Config`], every error with its field path;
//! - domain: [`store`] (the write-ahead log), [`client`] (who a request belongs to), [`route`]
//!   (classification into routes and lanes), [`quota`] (the ledger), [`metrics`] (Prometheus
//!   handles), [`verdict`] (the one retry verdict), [`queue`] (parked writes);
//! - adapters: [`upstream`] (the CRM client), [`response`] (every answer the proxy makes itself),
//!   [`shared_ledger`] (quota counts shared by replicas, on Redis);
//! - runtime: [`proxy`] (the shared state), [`data_plane`], [`dispatch`] (the drain task),
//!   [`admin`], [`server`] (serve, open, graceful stop);
//! - tools: [`sim`] (a simulated CRM for tests, benches and `demo`), [`demo`].

pub mod admin;
pub mod admin_guard;
pub mod breaker;
pub mod client;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod crm;
pub mod data_plane;
pub mod demo;
pub mod dispatch;
pub mod frames;
pub mod ids;
pub mod intake;
pub mod listener;
pub mod live;
pub mod matching;
pub mod message;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod queue;
pub mod quota;
pub mod reload;
pub mod response;
pub mod route;
pub mod server;
pub mod shared_ledger;
pub mod sim;
pub mod status;
pub mod status_page;
pub mod store;
pub mod tls;
pub mod units;
pub mod upstream;
pub mod verdict;
pub mod workers;

pub use server::{Listeners, Stopped, open, serve};

//! Integration tests: real HTTP between a client, the proxy and a simulated CRM on 127.0.0.1:0.

mod acceptance;
mod access_log;
mod admin_security;
mod batching;
mod bounds;
mod browser;
mod careless_crm;
mod cli;
mod config_fuzz;
mod crm_truth;
mod deploy;
mod durability;
mod fairness;
mod hostile;
mod interactive;
mod ledger;
mod lifecycle;
mod observability;
mod operations;
mod over_budget;
mod pacing;
mod shadow;
mod status_page;
mod support;
mod transparency;
mod upstream;

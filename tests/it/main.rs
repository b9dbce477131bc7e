//! Integration tests: real HTTP between a client, the proxy and a simulated CRM on 127.0.0.1:0.

mod acceptance;
mod admin_security;
mod batching;
mod bounds;
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
mod operations;
mod over_budget;
mod shadow;
mod support;
mod transparency;
mod upstream;

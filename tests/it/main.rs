//! Integration tests: the real gateway binary on 127.0.0.1:0, real TLS origins with rcgen
//! certificates, real clients. One test binary, one module per area.

mod activation;
mod admin;
mod agent;
mod audit;
mod branches;
mod cli;
mod dashboard;
mod denials;
mod dial;
mod fleet;
mod fleet_ha;
mod fleet_learned;
mod hardening;
mod help;
mod lane;
mod layout;
mod learn_from_log;
mod learned;
mod malformed;
mod proxy_protocol;
mod reference;
mod reload;
mod schedules;
mod service_tags;
mod shutdown;
mod sni;
mod startup;
mod support;
mod throttle_queue;
mod tls_listener;
mod tunnel;
mod upgrade;
mod windows;

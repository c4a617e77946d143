//! mesh-node: the per-node proxy of the mesh and the manager of its kernel programs.
//!
//! Modules by domain: [`config`] (the typed resources and their loader), [`state`] (the
//! immutable snapshot built from them), [`capture`] (eBPF programs, links, pins, routing
//! rules), [`proxy`] (transparent listeners and L4 forwarding), [`http`] (L7 routing and
//! policy), [`metrics`], [`admin`],
//! [`reload`] (config file watching), [`response_flag`] (how a connection or request ended), [`preflight`] (privilege and kernel checks) and [`sys`]
//! (the only module allowed to use `unsafe`).
#![deny(unsafe_code)]

pub mod admin;
pub mod analyze;
pub mod capture;
pub mod cni;
pub mod config;
pub mod connections;
pub mod context;
pub mod gate;
pub mod http;
pub mod identity;
pub mod kube_source;
pub mod metrics;
pub mod plan;
pub mod preflight;
pub mod proxy;
pub mod reload;
pub mod response_flag;
pub mod state;
pub mod sys;
pub mod telemetry;
pub mod transport;

//! mesh-node: the per-node proxy of the mesh and the manager of its kernel programs.
//!
//! The configuration model is the `mesh-config` crate, re-exported here as [`config`] (and
//! its cross-resource checks as [`analyze`]). Modules by domain:
//!
//! - config to snapshot: [`state`] (the immutable snapshot built from the resources),
//!   [`reload`] (the file source and the publisher of every later generation),
//!   [`kube_source`] (the Kubernetes source);
//! - kernel: [`capture`] (eBPF programs, links, pins, routing rules), [`cni`] (the pod-start
//!   gate's side here), [`sys`] (the only module allowed to use `unsafe`), [`preflight`]
//!   (privilege and kernel checks);
//! - data plane: [`plan`] (what to do with a connection), [`gate`] (the one place policy is
//!   decided, and revoked), [`proxy`] (listeners, L4 and HBONE), [`http`] (L7),
//!   [`transport`] (sockets, relays, the HBONE pool), [`context`] and [`connections`] (what
//!   handlers share and the connection table), [`identity`] (workload certificates from the
//!   signer, the trust bundle, the signer itself);
//! - observing: [`telemetry`] (Istio metrics, access log), [`trace`] (trace context, the client
//!   and server spans of requests, OTLP export), [`metrics`] (node-level),
//!   [`response_flag`] (how a connection or request ended), [`admin`] (health, metrics,
//!   debug endpoints);
//! - the program: [`cli`] (the command line and its checks) builds [`settings`] (what `run`
//!   was asked to do), [`app`] wires the node proxy from it, [`commands`] are the other
//!   subcommands.
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub use mesh_config as config;
pub use mesh_config::analyze;
pub mod capture;
pub mod cli;
pub mod cni;
pub mod commands;
pub mod connections;
pub mod context;
pub mod drain;
pub mod gate;
pub mod handover;
pub mod http;
pub mod identity;
pub mod kube_source;
pub mod metrics;
pub mod plan;
pub mod preflight;
pub mod proxy;
pub mod reload;
pub mod response_flag;
pub mod settings;
pub mod state;
pub mod sys;
pub mod telemetry;
pub mod trace;
pub mod transport;

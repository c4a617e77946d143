//! The mesh's configuration model, as a library that needs no eBPF toolchain: the
//! Kubernetes-shaped resources mesh-node reads (multi-document YAML exactly as
//! `kubectl get -o yaml` prints them, also `kind: List`, or objects from the API server),
//! Istio's rules for them, the cross-resource checks of `mesh-node analyze`, and the CRD
//! schemas of the Istio kinds.
//!
//! [`model`] holds the Kubernetes kinds, [`networking`], [`security`] and [`telemetry`] the
//! Istio kinds,
//! [`netpol`] NetworkPolicy, [`kinds`] the resource types of those, [`values`] the shared
//! value types (labels, durations, string matches, selectors). [`decode`] turns parsed YAML
//! into them while collecting every problem ([`Diagnostic`]), and [`load`] parses a file into
//! a [`Resources`] set, reporting each problem with its file, document and field
//! (`file:doc:field: message`). [`semantics`] applies Istio's rules (hosts, protocols,
//! enrolment, identity, PeerAuthentication precedence, AuthorizationPolicy scope), [`paths`]
//! request-path normalization, [`analyze`] the checks across resources, [`schema`] the CRDs.

pub mod analyze;
pub mod decode;
pub mod kinds;
pub mod load;
pub mod model;
pub mod netpol;
pub mod networking;
pub mod paths;
pub mod schema;
pub mod security;
pub mod semantics;
pub mod telemetry;
pub mod values;

pub use decode::{Diagnostic, Severity};
pub use load::{load_file, load_files, parse_str, LoadError, Resources};

//! The local configuration: multi-document YAML of Kubernetes-shaped resources, exactly as
//! `kubectl get -o yaml` prints them (also `kind: List`).
//!
//! [`model`] holds the Kubernetes kinds, [`networking`] and [`security`] the Istio kinds,
//! [`netpol`] NetworkPolicy, [`values`] the shared value types (durations, string matches,
//! selectors). [`decode`] turns parsed YAML into them while collecting every problem, and
//! [`load`] parses a file into a [`Resources`] set, reporting each problem with its file,
//! document and field (`file:doc:field: message`).

pub mod decode;
pub mod load;
pub mod model;
pub mod netpol;
pub mod networking;
pub mod paths;
pub mod schema;
pub mod security;
pub mod semantics;
pub mod values;

pub use load::{load_file, load_files, parse_str, Diagnostic, LoadError, Resources, Severity};

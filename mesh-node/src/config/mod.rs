//! The local configuration: multi-document YAML of Kubernetes-shaped resources, exactly as
//! `kubectl get -o yaml` prints them (also `kind: List`).
//!
//! [`model`] holds the typed resources; [`load`] parses a file into a [`Resources`] set and
//! reports every problem with its file, document and field (`file:doc:field: message`).

pub mod load;
pub mod model;

pub use load::{load_file, parse_str, Diagnostic, LoadError, Resources, Severity};

//! Distributed tracing (issue 24, in progress): trace context in HTTP headers
//! ([`context`]: W3C trace context and B3, joined or started, the sampling decision) and
//! span export over OTLP ([`export`]: a bounded queue, batches, drops counted). The L7 paths
//! do not emit spans yet.

pub mod context;
pub mod export;

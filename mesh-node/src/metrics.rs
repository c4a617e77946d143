//! Node-level `mesh_*` metrics: the proxy's connections, the config, and the kernel path's
//! decision counters (read from the per-CPU map at scrape time). Istio's standard
//! `istio_*` metrics come with workload identity (later issues).

use crate::response_flag::ResponseFlag;
use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{counter::ConstCounter, counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{capture::KernelCounters, connections::Direction};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    direction: &'static str,
    /// Istio-style response flag, `-` when fine.
    response_flags: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    direction: &'static str,
    /// `sent` (client to upstream) or `received`.
    flow: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    /// `client` (this proxy dialled) or `server`.
    side: &'static str,
    /// `untrusted`, `expired`, `wrong_identity`, `no_certificate`, `protocol`, ...
    reason: &'static str,
}

/// The proxy's connection metrics.
#[derive(Clone, Default)]
pub struct ProxyMetrics {
    opened: Family<DirectionLabels, Counter>,
    closed: Family<ClosedLabels, Counter>,
    bytes: Family<BytesLabels, Counter>,
    handshakes: Family<HandshakeLabels, Counter>,
    hbone: Family<SideLabels, Counter>,
    hbone_limited: Family<ReasonLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabels {
    /// `client` (opened by this proxy) or `server` (accepted).
    side: &'static str,
}

impl ProxyMetrics {
    /// Registers the proxy metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "mesh_proxy_connections_opened",
            "TCP connections accepted by the node proxy",
            metrics.opened.clone(),
        );
        registry.register(
            "mesh_proxy_connections_closed",
            "TCP connections finished by the node proxy, by response flag",
            metrics.closed.clone(),
        );
        registry.register(
            "mesh_proxy_bytes",
            "Bytes copied by the node proxy",
            metrics.bytes.clone(),
        );
        registry.register(
            "mesh_tls_handshake_failures",
            "HBONE TLS handshakes that failed, by side and reason",
            metrics.handshakes.clone(),
        );
        registry.register(
            "mesh_hbone_connections_opened",
            "HBONE (mTLS) connections established, by side; streams share them",
            metrics.hbone.clone(),
        );
        registry.register(
            "mesh_hbone_limited",
            "HBONE connections closed by a limit, by reason (premature_cancels: rapid reset)",
            metrics.hbone_limited.clone(),
        );
        metrics
    }

    /// An HBONE connection was refused or closed by a limit.
    pub fn hbone_limited(&self, reason: &'static str) {
        self.hbone_limited
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// An HBONE connection was established.
    pub fn hbone_opened(&self, side: &'static str) {
        self.hbone.get_or_create(&SideLabels { side }).inc();
    }

    /// An HBONE handshake failed.
    pub fn handshake_failed(&self, side: &'static str, reason: &'static str) {
        self.handshakes
            .get_or_create(&HandshakeLabels { side, reason })
            .inc();
    }

    /// A connection was accepted.
    pub fn opened(&self, direction: Direction) {
        self.opened
            .get_or_create(&DirectionLabels {
                direction: direction.as_str(),
            })
            .inc();
    }

    /// A connection finished with `flag` (empty when fine).
    pub fn closed(&self, direction: Direction, flag: ResponseFlag) {
        let response_flags = flag.code();
        self.closed
            .get_or_create(&ClosedLabels {
                direction: direction.as_str(),
                response_flags,
            })
            .inc();
    }

    /// Bytes copied by a finished connection.
    pub fn bytes(&self, direction: Direction, sent: u64, received: u64) {
        for (flow, n) in [("sent", sent), ("received", received)] {
            self.bytes
                .get_or_create(&BytesLabels {
                    direction: direction.as_str(),
                    flow,
                })
                .inc_by(n);
        }
    }
}

/// Config metrics.
#[derive(Clone, Default)]
pub struct ConfigMetrics {
    /// Generation of the snapshot in use.
    pub generation: Gauge,
    /// Config updates rejected (the last good config kept serving).
    pub rejected: Counter,
}

impl ConfigMetrics {
    /// Registers the config metrics.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "mesh_config_generation",
            "Generation of the configuration snapshot in use",
            metrics.generation.clone(),
        );
        registry.register(
            "mesh_config_rejected",
            "Configuration updates rejected as invalid",
            metrics.rejected.clone(),
        );
        metrics
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BypassLabels {
    event: &'static str,
}

/// Exposes the kernel programs' counters as `mesh_kernel_packets_total{decision}` and, with
/// the same-node bypass attached, `mesh_socket_bypass_total{event}`.
pub struct KernelCollector {
    counters: Mutex<KernelCounters>,
}

impl std::fmt::Debug for KernelCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCollector")
    }
}

impl KernelCollector {
    /// Registers the collector.
    pub fn register(registry: &mut Registry, counters: KernelCounters) {
        registry.register_collector(Box::new(Arc::new(KernelCollector {
            counters: Mutex::new(counters),
        })));
    }
}

impl Collector for KernelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (values, bypass) = {
            let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            (counters.read(), counters.read_bypass())
        };
        let mut family = encoder.encode_descriptor(
            "mesh_kernel_packets",
            "Decisions of the kernel capture programs, by decision",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (decision, value) in values {
            let labels = DecisionLabels { decision };
            let metric = family.encode_family(&labels)?;
            ConstCounter::new(value).encode(metric)?;
        }
        if let Some(bypass) = bypass {
            let mut family = encoder.encode_descriptor(
                "mesh_socket_bypass",
                "Same-node socket bypass: sockets that joined it, messages moved straight to \
                 the peer socket, senders left on TCP",
                None,
                prometheus_client::metrics::MetricType::Counter,
            )?;
            for (event, value) in bypass {
                let labels = BypassLabels { event };
                let metric = family.encode_family(&labels)?;
                ConstCounter::new(value).encode(metric)?;
            }
        }
        Ok(())
    }
}

//! The Istio kinds and NetworkPolicy as resources: their specs ([`networking`], [`security`],
//! [`netpol`]) under the metadata every kind shares ([`model::Resource`]).
//!
//! [`networking`]: crate::networking
//! [`security`]: crate::security
//! [`netpol`]: crate::netpol
//! [`model::Resource`]: crate::model::Resource

use crate::model::Resource;

/// `networking.istio.io` VirtualService.
pub type VirtualService = Resource<crate::networking::VirtualServiceSpec>;
/// `networking.istio.io` DestinationRule.
pub type DestinationRule = Resource<crate::networking::DestinationRuleSpec>;
/// `security.istio.io` PeerAuthentication.
pub type PeerAuthentication = Resource<crate::security::PeerAuthenticationSpec>;
/// `security.istio.io` AuthorizationPolicy.
pub type AuthorizationPolicy = Resource<crate::security::AuthorizationPolicySpec>;
/// `telemetry.istio.io` Telemetry.
pub type Telemetry = Resource<crate::telemetry::TelemetrySpec>;
/// `networking.k8s.io/v1` NetworkPolicy.
pub type NetworkPolicy = Resource<crate::netpol::NetworkPolicySpec>;

//! Observation: the Istio reports (labels) of a request, for the source and, when the
//! endpoint is a pod of this node, the destination.

use super::*;

pub(super) fn report(
    reporter: &'static str,
    source: Option<&Workload>,
    destination: Option<&Workload>,
    service: Option<&ServiceTarget>,
    mtls: bool,
) -> Report {
    Report {
        reporter,
        source: source.map_or_else(Peer::unknown, |s| Peer::of(s, s.enrolled)),
        destination: destination.map_or_else(Peer::unknown, |d| Peer::of(d, mtls)),
        service: None,
        mtls,
    }
    .service(service)
}

/// The reports of a request sent to `destination`: the source's; the destination's too when
/// it is an enrolled pod of this node.
pub(super) fn reports_for(
    state: &State,
    source: Option<&Workload>,
    destination: Option<&Workload>,
    target: &ServiceTarget,
) -> Vec<Report> {
    let enrolled = |w: Option<&Workload>| w.is_some_and(|w| w.enrolled);
    let mtls = enrolled(source) && enrolled(destination);
    let mut reports = vec![report("source", source, destination, Some(target), mtls)];
    if destination.is_some_and(|d| d.enrolled && state.is_local(d)) {
        reports.push(report(
            "destination",
            source,
            destination,
            Some(target),
            mtls,
        ));
    }
    reports
}

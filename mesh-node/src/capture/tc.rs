//! The TC programs on a link: ingress (`mesh_capture`) on every link that gets capture,
//! egress (`mesh_egress`) on pod links too, each a pinned TCX link (`links/tc-<ifindex>`,
//! `links/tce-<ifindex>`) that a later run updates in place.

use std::path::{Path, PathBuf};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    Ebpf,
};
use mesh_common::programs;

use super::{prog_error, program, replace_pin, CaptureError};

/// The two TC programs, by the way they face.
#[derive(Clone, Copy)]
pub(super) enum Tc {
    /// `mesh_capture`: what comes in.
    Ingress,
    /// `mesh_egress`: what goes out (into a pod).
    Egress,
}

impl Tc {
    pub(super) const BOTH: [Tc; 2] = [Tc::Ingress, Tc::Egress];

    pub(super) fn program(self) -> &'static str {
        match self {
            Tc::Ingress => programs::CAPTURE,
            Tc::Egress => programs::EGRESS,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Tc::Ingress => TcAttachType::Ingress,
            Tc::Egress => TcAttachType::Egress,
        }
    }

    /// Pins are `links/<prefix><ifindex>`.
    pub(super) fn pin_prefix(self) -> &'static str {
        match self {
            Tc::Ingress => "tc-",
            Tc::Egress => "tce-",
        }
    }
}

/// How a link got a TC program.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Attach {
    /// A link pinned by an earlier mesh-node was updated in place to the new program.
    Adopted,
    /// A new link was attached and pinned.
    New,
}

/// The pin of `tc`'s link on `ifindex` under the node's pin directory `dir`.
pub(super) fn pin(dir: &Path, tc: Tc, ifindex: u32) -> PathBuf {
    dir.join(format!("links/{}{ifindex}", tc.pin_prefix()))
}

/// Attaches one TC program to one link. A link pinned by a previous run gets the new program
/// atomically (TCX link update): no packet goes unhandled in between.
pub(super) fn attach(
    ebpf: &mut Ebpf,
    dir: &Path,
    tc: Tc,
    ifindex: u32,
    name: &str,
) -> Result<Attach, CaptureError> {
    let pin = pin(dir, tc, ifindex);
    let program_name = tc.program();
    let prog: &mut SchedClassifier = program(ebpf, program_name)?;
    let adopted = PinnedLink::from_pin(&pin)
        .ok()
        .and_then(|old| SchedClassifierLink::try_from(FdLink::from(old)).ok())
        .and_then(|old| prog.attach_to_link(old).ok());
    if let Some(id) = adopted {
        // The pinned link now runs the new program; its pin stays as it is. Taking the link
        // out of the program and closing our fd leaves it attached (the pin holds it).
        let link = prog.take_link(id).map_err(prog_error(program_name))?;
        drop(FdLink::try_from(link));
        return Ok(Attach::Adopted);
    }
    let id = prog
        .attach_with_options(
            name,
            tc.attach_type(),
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(prog_error(program_name))?;
    let link = prog.take_link(id).map_err(prog_error(program_name))?;
    let link = FdLink::try_from(link).map_err(|err| CaptureError::Program {
        program: program_name,
        message: format!("not a TCX link ({err}): kernel >= 6.6 is required"),
    })?;
    replace_pin(&pin, link).map(|()| Attach::New)
}

//! `mesh-node`: parses the command line, checks it ([`mesh_node::cli`]) and hands the result
//! to the subcommand. An invalid flag or value exits 64 (`EX_USAGE`) with every problem
//! named, before anything starts.

use std::process::ExitCode;

use clap::Parser;
use mesh_node::{
    app,
    cli::{CaCommand, Cli, Command, Problems},
    commands,
    settings::EXIT_CONFIG,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version are "errors" printed to standard output.
        Err(err) if !err.use_stderr() => {
            let _ = err.print();
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match cli.command {
        Command::Run(args) => match std::env::current_exe() {
            Ok(exe) => args.settings(&exe).map_or_else(invalid("run"), app::run),
            Err(err) => {
                eprintln!("mesh-node run: cannot locate the mesh-node binary: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Validate { files } => commands::validate(&files),
        Command::Analyze { files, mesh } => mesh
            .mesh()
            .map_or_else(invalid("analyze"), |mesh| commands::analyze(&files, &mesh)),
        Command::Uninstall(node) => node
            .node()
            .map_or_else(invalid("uninstall"), |node| commands::uninstall(&node)),
        Command::Probe { check, socket } => commands::probe(check.path(), &socket),
        Command::Crds { out } => commands::crds(out.as_deref()),
        Command::Ca(CaCommand::Init(args)) => commands::ca_init(&args),
        Command::Ca(CaCommand::Serve(args)) => commands::ca_serve(*args),
    }
}

/// Prints every problem of `command`'s flags; exit 64.
fn invalid(command: &'static str) -> impl FnOnce(Problems) -> ExitCode {
    move |problems| {
        for problem in problems.0 {
            eprintln!("mesh-node {command}: {problem}");
        }
        ExitCode::from(EXIT_CONFIG)
    }
}

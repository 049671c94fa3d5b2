//! meshctl: parses arguments and hands them to `meshd::ctl`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = meshd::ctl::Cli::parse();
    // anstream drops colour when stdout is not a terminal or NO_COLOR is set.
    match meshd::ctl::run(&cli, &mut anstream::stdout().lock()) {
        Ok(status) => std::process::ExitCode::from(status.exit_code()),
        // `meshctl … | head`: the reader went away; nothing to report.
        Err(meshd::ctl::CtlError::Io(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            anstream::eprintln!("meshctl: {}", meshd::ctl::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

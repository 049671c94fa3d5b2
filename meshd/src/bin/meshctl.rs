//! meshctl: parses arguments and hands them to `meshd::ctl`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = meshd::ctl::Cli::parse();
    match meshd::ctl::run(&cli, &mut std::io::stdout().lock()) {
        Ok(status) => std::process::ExitCode::from(status.exit_code()),
        Err(e) => {
            eprintln!("meshctl: {}", meshd::ctl::error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

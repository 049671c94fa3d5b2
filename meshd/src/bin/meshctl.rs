//! meshctl: parses arguments and hands them to `meshd::ctl`.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = meshd::ctl::Cli::parse();
    match meshd::ctl::run(&cli, &mut std::io::stdout().lock()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("meshctl: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

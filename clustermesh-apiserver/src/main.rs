//! clustermesh-apiserver binary: parses arguments, sets up logging and signals, runs `app`.

use std::time::Duration;

use clap::Parser;
use clustermesh_apiserver::app::{self, Args};

/// How long shutdown may take after SIGTERM before the process exits anyway.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(10);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.check {
        let Some(dir) = &args.manifests else {
            eprintln!("--check needs --manifests");
            std::process::exit(2);
        };
        match app::check_manifests(dir) {
            Ok(objects) => {
                println!("{}: {objects} objects, no problems", dir.display());
                return Ok(());
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
    meshd::process::init_logging();
    meshd::process::install_crypto_provider()?;
    meshd::process::run_until_signal(|shutdown| app::run(args, shutdown), SHUTDOWN_DEADLINE)?;
    Ok(())
}

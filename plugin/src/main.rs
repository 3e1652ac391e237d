//! `kubectl-kprof`: the kubectl plugin (`kubectl kprof top|flamegraph|pprof|diff|merge|open`).
//! See [`kprof_plugin`].

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = kprof_plugin::Cli::parse();
    match kprof_plugin::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

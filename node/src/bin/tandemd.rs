//! tandemd: the Tandem storage daemon. See `tandemd --help`.

use clap::Parser;
use tandem_node::config::{Args, Config};

fn main() {
    let args = Args::parse();
    let config = match Config::resolve(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tandemd: error: {e:#}");
            std::process::exit(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut builder = match config.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            if n > 1 {
                b.worker_threads(n);
            }
            b
        }
    };
    let rt = match builder.enable_all().thread_name("tandemd").build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tandemd: error: start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(tandem_node::daemon::run(config)) {
        eprintln!("tandemd: error: {e:#}");
        std::process::exit(1);
    }
}

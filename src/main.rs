//! The `portcullis` command: serve, or validate a config file.
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use portcullis::config::FileConfig;
use portcullis::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "Envoy ext_authz server with Apache APISIX's auth plugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve ext_authz (gRPC), health, metrics and the Admin API.
    Serve {
        /// Config file (YAML). Without it, a built-in loopback-only default is used.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// How long in-flight Checks may take to finish after SIGTERM.
        #[arg(long, default_value = "15s", value_parser = parse_duration)]
        drain_timeout: Duration,
    },
    /// Check a config file and exit 0, or print where it is wrong and exit 1.
    Validate {
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.trim().split_at(
        s.trim()
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(s.len()),
    );
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 15s or 500ms"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{s:?} is not a duration like 15s or 500ms")),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate { config } => {
            let file = config.display().to_string();
            let result = FileConfig::load(&config)
                .map_err(|e| e.to_string())
                .and_then(|(c, _)| {
                    portcullis::store::validate(&c, &file).map_err(|e| e.to_string())
                });
            match result {
                Ok(()) => {
                    println!("{file}: ok");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve {
            config,
            log_format,
            drain_timeout,
        } => {
            portcullis::memory::keep_large_blocks_mapped();
            telemetry::init_logs(log_format);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .expect("start the tokio runtime");
            match rt.block_on(portcullis::server::serve(portcullis::server::Options {
                config,
                drain_timeout,
            })) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "portcullis failed");
                    eprintln!("portcullis: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

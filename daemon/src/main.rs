//! `nodemesh`: parse, configure, run. Everything else lives in the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nodemesh::cli::{Cli, Command};

/// Exit status for a configuration error (sysexits EX_CONFIG is 78; the
/// project uses EX_USAGE, 64, for any bad setting or flag).
const EXIT_CONFIG: u8 = 64;

/// glibc malloc arenas. glibc's default is up to 8 per CPU, one per thread
/// that allocates, each keeping its own free memory; the daemon's data path
/// runs on `worker_threads` (default 1) threads plus the netns worker and
/// tokio's blocking pool, so two arenas bound idle memory without contention.
const MALLOC_ARENAS: i32 = 2;

/// Caps glibc's malloc arenas ([`MALLOC_ARENAS`]); a no-op elsewhere.
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning and is called before the
    // runtime starts any thread.
    unsafe {
        nix::libc::mallopt(nix::libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Certs(cmd) => match nodemesh::identity::certs::run(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nodemesh certs: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Stat(args) => stat(&args, false),
        Command::Top(args) => stat(&args, true),
        Command::LogLevel(args) => log_level(&args),
        Command::Run(args) => {
            limit_malloc_arenas();
            let check_only = args.check;
            // Configuration is parsed and validated before any runtime starts.
            let memory_limit = nodemesh::memory_limit::container_limit(&nodemesh::host_files::Host);
            let config = match args
                .into_config()
                .and_then(|c| nodemesh::memory_limit::check(&c, memory_limit.as_ref()).map(|()| c))
            {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("nodemesh: invalid configuration: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let limit_text = nodemesh::memory_limit::describe(memory_limit.as_ref());
            if check_only {
                println!(
                    "nodemesh: configuration valid: node {:?}, relay buffers at most {} MiB, {limit_text}",
                    config.node_name, config.limits.relay_buffer_memory_mib
                );
                return ExitCode::SUCCESS;
            }
            nodemesh::log_control::init(&config.log_level, config.log_format);
            tracing::info!(
                relay_buffer_memory_mib = config.limits.relay_buffer_memory_mib,
                memory_limit_mib = memory_limit.as_ref().map(|l| l.mib()),
                memory_limit_file = memory_limit.as_ref().map(|l| l.file.display().to_string()),
                "{limit_text}"
            );
            nodemesh::relay_splice::set_mode(config.tcp_relay);
            nodemesh::access_log::set_enabled(config.access_log);
            nodemesh::relay::set_buffer_budget(config.limits.relay_buffer_memory_mib);
            let metrics = match nodemesh::metrics::install(Duration::from_secs(600)) {
                Ok(h) => h,
                Err(e) => {
                    eprintln!("nodemesh: cannot install the metrics recorder: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.enable_all().thread_name("nodemesh-worker");
            if config.worker_threads > 0 {
                builder.worker_threads(config.worker_threads);
            }
            let runtime = match builder.build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("nodemesh: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(nodemesh::app::run(config, metrics)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "nodemesh failed to start");
                    eprintln!("nodemesh: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `nodemesh stat` (once) or `nodemesh top` (`repeat`).
fn stat(args: &nodemesh::cli::StatArgs, repeat: bool) -> ExitCode {
    let interval = Duration::from_secs_f64(args.interval);
    match nodemesh::stat::run(&args.admin, interval, args.reporter, repeat) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nodemesh: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `nodemesh log-level`: `GET` or `POST /log_level` on the daemon's admin port.
fn log_level(args: &nodemesh::cli::LogLevelArgs) -> ExitCode {
    use nodemesh::admin_client;
    let timeout = Duration::from_secs(5);
    let res = match &args.filter {
        None => admin_client::get(args.admin, "/log_level", timeout),
        Some(f) => admin_client::post(args.admin, "/log_level", f, timeout),
    };
    match res {
        Ok(r) if r.status == 200 => {
            print!("{}", r.body);
            ExitCode::SUCCESS
        }
        Ok(r) => {
            eprint!(
                "nodemesh: the daemon at {} answered {}: {}",
                args.admin, r.status, r.body
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!(
                "nodemesh: cannot reach the daemon's admin port {}: {e}",
                args.admin
            );
            ExitCode::FAILURE
        }
    }
}

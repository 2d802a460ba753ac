//! `nodemesh-cni`: reads the CNI environment and stdin, runs the command,
//! prints the result or the CNI error JSON on stdout. Logs go to stderr or
//! to the configured `log_file`, never to stdout. With arguments it is the
//! installer (`install` / `uninstall`, see `cli`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::ExitCode;

use nodemesh_cni::config::{CniEnv, ENV_LOG_FILTER};
use nodemesh_cni::os::{SystemNetns, UnixDaemon};
use nodemesh_cni::plugin::{error_version, run, Edges};

fn init_logging(stdin: &[u8], filter: Option<&str>) {
    let log_file = serde_json::from_slice::<serde_json::Value>(stdin)
        .ok()
        .and_then(|v| {
            v.get("log_file")
                .and_then(|f| f.as_str())
                .map(str::to_owned)
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(
            filter
                .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
                .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(false);
    let file = log_file.and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&p))
            .ok()
    });
    // A second init cannot happen in this single-shot process; ignore it.
    let _ = match file {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

fn installer() -> ExitCode {
    use clap::Parser;
    let cli = nodemesh_cni::cli::Cli::parse();
    init_logging(b"", std::env::var(ENV_LOG_FILTER).ok().as_deref());
    match nodemesh_cni::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "installer failed");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    // Runtimes call the plugin without arguments; any argument is the installer.
    if std::env::args_os().len() > 1 {
        return installer();
    }
    let vars: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    init_logging(&stdin, vars.get(ENV_LOG_FILTER).map(String::as_str));
    let outcome = match read {
        Err(e) => Err(nodemesh_cni::error::CniError::new(
            nodemesh_cni::error::code::IO,
            "cannot read stdin",
            e.to_string(),
        )),
        Ok(_) => CniEnv::from_vars(&vars).and_then(|env| {
            let edges = Edges {
                netns: &SystemNetns,
                daemon: &UnixDaemon,
            };
            run(&env, &stdin, edges)
        }),
    };
    let mut out = std::io::stdout().lock();
    match outcome {
        Ok(printed) => {
            if let Some(json) = printed {
                let _ = writeln!(out, "{json}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let e = if e.cni_version == nodemesh_cni::config::CURRENT_VERSION {
                e.at_version(&error_version(&stdin))
            } else {
                e
            };
            tracing::error!(code = e.code, msg = %e.msg, details = %e.details, "CNI command failed");
            let _ = writeln!(out, "{}", e.to_json());
            ExitCode::FAILURE
        }
    }
}

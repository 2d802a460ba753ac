//! Test support: a stand-in for the `nodemesh` daemon and the `nodemesh-cni`
//! plugin, chosen by the name it is called with (tests symlink it under both
//! names), so the lab's daemon lifecycle is tested without the real ones.
//!
//! As `nodemesh`: `certs init|node` write placeholder PEM files; `run --config
//! F` reads and validates the real config type, serves `/ready` (200) and
//! `/metrics` on `admin_addr`, and exits 0 on SIGTERM/SIGINT; a `log_level`
//! mentioning `fake_die` makes it exit 70 at once. As `nodemesh-cni`: ADD
//! prints `prevResult` unchanged, DEL prints nothing, VERSION the versions.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nodemesh::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let called = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_owned();
    let result = if called == "nodemesh-cni" {
        cni()
    } else {
        daemon(args.get(1..).unwrap_or_default())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, msg)) => {
            eprintln!("fake {called}: {msg}");
            ExitCode::from(code)
        }
    }
}

type Failure = (u8, String);

fn cni() -> Result<(), Failure> {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| (1, e.to_string()))?;
    match command.as_str() {
        "ADD" => {
            let conf: serde_json::Value =
                serde_json::from_str(&input).map_err(|e| (1, format!("stdin: {e}")))?;
            let prev = conf
                .get("prevResult")
                .ok_or((1, "no prevResult".to_owned()))?;
            println!("{prev}");
            Ok(())
        }
        "DEL" => Ok(()),
        "VERSION" => {
            println!(r#"{{"cniVersion":"1.0.0","supportedVersions":["1.0.0"]}}"#);
            Ok(())
        }
        other => Err((1, format!("unknown CNI_COMMAND {other:?}"))),
    }
}

fn flag(args: &[String], name: &str) -> Option<PathBuf> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
}

fn daemon(args: &[String]) -> Result<(), Failure> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["certs", "init", ..] => {
            let dir = flag(args, "--dir").ok_or((64, "--dir missing".to_owned()))?;
            write(&dir.join("ca.pem"))?;
            write(&dir.join("ca-key.pem"))
        }
        ["certs", "node", name, ..] => {
            let dir = flag(args, "--dir").ok_or((64, "--dir missing".to_owned()))?;
            write(&dir.join(format!("{name}.pem")))?;
            write(&dir.join(format!("{name}-key.pem")))
        }
        ["run", ..] => {
            let file = flag(args, "--config").ok_or((64, "--config missing".to_owned()))?;
            let config = Config::from_file(&file).map_err(|e| (64, e.to_string()))?;
            config.validate().map_err(|e| (64, e.to_string()))?;
            if config.log_level.contains("fake_die") {
                return Err((70, "fatal: told to die by log_level".to_owned()));
            }
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| (1, e.to_string()))?
                .block_on(serve(config))
        }
        _ => Err((64, format!("unknown command {words:?}"))),
    }
}

fn write(path: &Path) -> Result<(), Failure> {
    std::fs::write(path, "fake\n").map_err(|e| (1, format!("{}: {e}", path.display())))
}

async fn serve(config: Config) -> Result<(), Failure> {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .map_err(|e| (1, format!("bind {}: {e}", config.admin_addr)))?;
    let mut term = signal(SignalKind::terminate()).map_err(|e| (1, e.to_string()))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| (1, e.to_string()))?;
    println!(
        "fake daemon {} ready on {}",
        config.node_name, config.admin_addr
    );
    let node = config.node_name.clone();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            accepted = listener.accept() => {
                let Ok((mut stream, _)) = accepted else { continue };
                let node = node.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = stream.read(&mut buf).await.unwrap_or(0);
                    let request = String::from_utf8_lossy(&buf[..n]);
                    let body = if request.starts_with("GET /metrics") {
                        format!("# TYPE nodemesh_tunnels_open gauge\nnodemesh_tunnels_open{{peer=\"{node}\"}} 0\n")
                    } else {
                        "ready\n".to_owned()
                    };
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        }
    }
    println!("fake daemon {} stopping", config.node_name);
    Ok(())
}

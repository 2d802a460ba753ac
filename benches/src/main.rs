//! `nodemesh-lab`: build, inspect, demo and remove a simulated nodemesh
//! cluster in network namespaces on this machine (see the library docs).
//!
//! `main` parses the command line, installs a Ctrl-C/SIGTERM handler that
//! interrupts the lab (which then removes what it built), and runs the
//! blocking lab work on a blocking thread.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use nodemesh_lab::demo;
use nodemesh_lab::lab::{self, Family, Lab, LabOptions, LabState};
use nodemesh_lab::{http, metrics, LabError};

/// Build a simulated nodemesh cluster on this machine, in network namespaces.
///
/// Each node is a network namespace joined to an underlay bridge
/// (10.77.0.<i>/24) and running a `nodemesh` daemon; each pod is a namespace
/// wired through the real CNI chain (bridge + host-local, then nodemesh-cni)
/// with an address in its node's pod CIDR 10.78.<i>.0/24. Nothing is added to
/// this machine's own network namespace. Needs root, iproute2, nftables and
/// the CNI reference plugins in /usr/lib/cni; the meshed lab also needs the
/// `nodemesh` and `nodemesh-cni` binaries (`cargo build --workspace --bins`),
/// found next to this program or in NODEMESH_BIN_DIR.
///
/// Quick tour: `nodemesh-lab demo` builds a lab, sends traffic across nodes
/// and within a node, prints what the daemons measured, and removes it all.
/// `up` leaves a lab running for you to explore (`ip netns exec nml-n1-p1 sh`),
/// `status` shows it, `down` removes it. Ctrl-C at any time removes what was built.
#[derive(Debug, Parser)]
#[command(name = "nodemesh-lab", version, verbatim_doc_comment)]
struct Cli {
    /// Prefix of every namespace the lab creates (1-10 lowercase letters or digits).
    #[arg(
        long,
        global = true,
        default_value = "nml",
        env = "NODEMESH_LAB_PREFIX"
    )]
    prefix: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a lab and leave it running (state in /run/nodemesh-lab/<prefix>/state.json).
    Up(Shape),
    /// Show the running lab: nodes, daemons, readiness, tunnels, pods and their IPs.
    Status,
    /// Remove the lab: pods (CNI DEL), daemons, namespaces, files; also any
    /// leftover namespace or process of the prefix, even without state.
    Down,
    /// Build a lab, move traffic between pods across nodes and within a node,
    /// print per-edge connections and bytes from the daemons' metrics, remove it.
    Demo {
        #[command(flatten)]
        shape: Shape,
        /// MiB sent each way per transfer.
        #[arg(long, default_value_t = 4)]
        mib: u64,
    },
    /// Benchmark: data path against direct, stunnel and plain relay pair
    /// baselines, tunnel tuning, plain-TCP relay engines (copy, splice, tokio-uring), node
    /// versus sidecar cost; writes docs/benchmarks.md,
    /// docs/benchmarks/results.json and SVG plots. Labs use the prefix plus
    /// a suffix (d, m, c, r, and t0.. for the tuning variants, all up at once),
    /// so the prefix has at most 7 characters for a full run.
    Bench(BenchArgs),
    /// A plain-TCP relay, one engine, for the benchmark's relay-engine
    /// comparison and its plain relay pair path (run by `bench`; prints
    /// `listening <addr>` per listener, runs until killed).
    #[command(hide = true)]
    RelayEngine {
        /// How to relay.
        #[arg(long, value_enum)]
        engine: nodemesh_lab::relay_engine::Engine,
        /// Address to accept on (port 0: any free port); repeat for more
        /// listeners, each paired with the `--to` in the same position.
        #[arg(long, required = true)]
        listen: Vec<std::net::SocketAddr>,
        /// Address the connections accepted on the matching `--listen` are
        /// relayed to.
        #[arg(long, required = true)]
        to: Vec<std::net::SocketAddr>,
    },
}

#[derive(Debug, Clone, Args)]
struct BenchArgs {
    /// Small sizes and few runs, for development (not for publication).
    #[arg(long)]
    quick: bool,
    /// Directory to write benchmarks.md and benchmarks/ into.
    #[arg(long, default_value = "docs")]
    docs_dir: std::path::PathBuf,
    /// Skip the data-path figures.
    #[arg(long)]
    no_datapath: bool,
    /// Skip the tunnel tuning variants.
    #[arg(long)]
    no_tuning: bool,
    /// Skip the node versus sidecar cost comparison.
    #[arg(long)]
    no_cost: bool,
    /// Skip the plain-TCP relay engines (the daemon's copy and splice
    /// relays against tokio-uring).
    #[arg(long)]
    no_relays: bool,
    /// Pods per node of the cost comparison (comma-separated; default 1,10,30,100, quick 1,3).
    #[arg(long, value_delimiter = ',')]
    pods: Option<Vec<usize>>,
    /// Largest pods per node run in sidecar mode (default: all).
    #[arg(long)]
    sidecar_max_pods: Option<usize>,
    /// Runs per figure (default 5, quick 2).
    #[arg(long)]
    runs: Option<usize>,
    /// A note on the machine's conditions, printed in the report.
    #[arg(long)]
    note: Option<String>,
    /// Keep the parts skipped with --no-* from the existing results.json
    /// (re-run one part of an earlier full run).
    #[arg(long)]
    merge: bool,
    /// Measure nothing: re-render benchmarks.md and the plots from the
    /// existing results.json (after editing docs/benchmarks/notes.md).
    #[arg(long)]
    report_only: bool,
    /// Directory holding the `nodemesh` and `nodemesh-cni` binaries.
    #[arg(long, env = "NODEMESH_BIN_DIR")]
    bin_dir: Option<std::path::PathBuf>,
    /// Data-path paths to measure (comma-separated: direct, stunnel,
    /// relay-pair, nodemesh-cross, nodemesh-same; default all). For development runs:
    /// the report then lacks the others.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Data-path figures to measure (comma-separated: bulk, latency,
    /// new-conn, idle-mem; default all). The tuning variants always measure
    /// bulk and latency.
    #[arg(long, value_delimiter = ',')]
    figures: Vec<String>,
    /// MTU of every link of the benchmark labs, for all paths alike (direct,
    /// stunnel and nodemesh), e.g. 9000 for jumbo frames. Default 1500.
    #[arg(long)]
    underlay_mtu: Option<u32>,
    /// Tuning variants to run (comma-separated substrings of their names;
    /// default all).
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
}

#[derive(Debug, Clone, Args)]
struct Shape {
    /// Number of nodes.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Pods per node.
    #[arg(long, default_value_t = 2)]
    pods_per_node: usize,
    /// No daemons and no nodemesh-cni: plain bridge networking (the baseline).
    #[arg(long)]
    no_mesh: bool,
    /// Daemons' log filter (written in their config).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Directory holding the `nodemesh` and `nodemesh-cni` binaries
    /// (default: next to this program, or its parent directory).
    #[arg(long, env = "NODEMESH_BIN_DIR")]
    bin_dir: Option<std::path::PathBuf>,
    /// MTU of every lab link (underlay, node uplinks, pod veths), e.g. 9000
    /// for jumbo frames; the daemons' tunnel.max_udp_payload follows.
    /// Default: the kernel's 1500.
    #[arg(long)]
    underlay_mtu: Option<u32>,
    /// Dual-stack pods: each gets an IPv6 address (fd00:78:<node>::/64)
    /// beside its IPv4 one, and `demo` also sends its traffic over IPv6.
    /// The tunnels between nodes stay on the IPv4 underlay unless
    /// --ipv6-underlay.
    #[arg(long)]
    dual_stack: bool,
    /// Run the tunnels between nodes over IPv6: each daemon's node address
    /// (its QUIC endpoint) is its node's fd00:77::<node>. Implies
    /// --dual-stack.
    #[arg(long)]
    ipv6_underlay: bool,
}

impl Shape {
    fn options(&self, prefix: &str) -> LabOptions {
        let opts = LabOptions {
            prefix: prefix.to_owned(),
            nodes: self.nodes,
            pods_per_node: self.pods_per_node,
            mesh: !self.no_mesh,
            log_level: self.log_level.clone(),
            bin_dir: self.bin_dir.clone(),
            underlay_mtu: self.underlay_mtu,
            dual_stack: self.dual_stack,
            ipv6_underlay: false,
        };
        if self.ipv6_underlay {
            opts.ipv6_underlay()
        } else {
            opts
        }
    }
}

/// `println!` that ignores a closed stdout (`nodemesh-lab status | head`)
/// instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// `print!` that ignores a closed stdout.
macro_rules! outp {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Runs its own runtime (tokio or tokio-uring), so not inside the lab's.
    if let Command::RelayEngine { engine, listen, to } = cli.command {
        if listen.len() != to.len() {
            eprintln!(
                "error: relay engine: {} --listen against {} --to; give one --to per --listen, in the same order",
                listen.len(),
                to.len()
            );
            return ExitCode::from(2);
        }
        let pairs = listen.into_iter().zip(to).collect();
        return match nodemesh_lab::relay_engine::run(engine, pairs) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: relay engine {}: {e}", engine.name());
                ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NODEMESH_LAB_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let prefix = cli.prefix.clone();
    let result = runtime.block_on(async move {
        tokio::spawn(async {
            wait_for_signal().await;
            eprintln!("\ninterrupted: removing the lab ...");
            lab::interrupt();
        });
        match tokio::task::spawn_blocking(move || run(cli)).await {
            Ok(r) => r,
            Err(e) => Err(LabError::WorkerFailed {
                problem: e.to_string(),
            }),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if lab::interrupted() {
                sweep(&prefix);
                return ExitCode::from(130);
            }
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// After an interruption: remove anything of the prefix that is left.
fn sweep(prefix: &str) {
    for p in lab::teardown_prefix(prefix) {
        eprintln!("warning: {p}");
    }
}

fn run(cli: Cli) -> Result<(), LabError> {
    match cli.command {
        Command::Up(shape) => {
            let lab = up(&shape.options(&cli.prefix))?;
            let state = lab.detach();
            print_state(&state);
            out!(
                "\nlab {} is up. Explore: `ip netns exec {}-n1-p1 sh`; `nodemesh-lab status`; remove with `nodemesh-lab down`.",
                state.prefix, state.prefix
            );
            Ok(())
        }
        Command::Status => match LabState::load(&cli.prefix)? {
            Some(state) => {
                print_state(&state);
                Ok(())
            }
            None => {
                out!(
                    "no lab with prefix {} (no {})",
                    cli.prefix,
                    lab::lab_dir(&cli.prefix).join(lab::STATE_FILE).display()
                );
                let left = lab::leftovers(&cli.prefix)?;
                if !left.is_clean() {
                    out!("leftovers: {left:?}; remove them with `nodemesh-lab down`");
                }
                Ok(())
            }
        },
        Command::Down => {
            out!("removing lab {} ...", cli.prefix);
            let problems = lab::teardown_prefix(&cli.prefix);
            for p in &problems {
                eprintln!("warning: {p}");
            }
            let left = lab::wait_clean(&cli.prefix, Duration::from_secs(5))?;
            if left.is_clean() {
                out!("lab {} removed", cli.prefix);
                Ok(())
            } else {
                Err(LabError::State {
                    path: lab::lab_dir(&cli.prefix),
                    problem: format!("still present after down: {left:?}"),
                })
            }
        }
        Command::Demo { shape, mib } => demo_run(&shape.options(&cli.prefix), mib),
        Command::Bench(args) => bench_run(&cli.prefix, args),
        Command::RelayEngine { .. } => Err(LabError::WorkerFailed {
            problem: "relay-engine runs before the lab's runtime starts".into(),
        }),
    }
}

fn up(opts: &LabOptions) -> Result<Lab, LabError> {
    out!(
        "building lab {}: {} nodes x {} pods, mesh {}{}",
        opts.prefix,
        opts.nodes,
        opts.pods_per_node,
        if opts.mesh { "on" } else { "off" },
        match (opts.dual_stack, opts.ipv6_underlay) {
            (_, true) => ", dual-stack, tunnels over IPv6",
            (true, false) => ", dual-stack",
            (false, false) => "",
        }
    );
    Lab::up_with_progress(opts.clone(), &mut |step, total, what| {
        out!("[{step}/{total}] {what} ...");
    })
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn print_state(state: &LabState) {
    out!(
        "lab {}: {} nodes, {} pods, mesh {}, files in {}",
        state.prefix,
        state.nodes.len(),
        state.pods.len(),
        if state.mesh { "on" } else { "off" },
        state.dir.display()
    );
    out!(
        "\n{:<5} {:<14} {:<10} {:<13} {:<8} {:<6} TUNNELS",
        "NODE",
        "NETNS",
        "ADDRESS",
        "POD CIDR",
        "DAEMON",
        "READY"
    );
    for n in &state.nodes {
        let (pid, ready, tunnels) = match (&n.daemon, n.daemon_pid) {
            (Some(paths), Some(pid)) => {
                let alive = std::path::Path::new(&format!("/proc/{pid}")).exists();
                let ready = alive
                    && http::get(&n.netns, paths.admin, "/ready", Duration::from_secs(2))
                        .is_ok_and(|r| r.status == 200);
                let tunnels = http::get(&n.netns, paths.admin, "/metrics", Duration::from_secs(2))
                    .ok()
                    .and_then(|r| metrics::parse(&r.body).ok())
                    .map_or("?".to_owned(), |s| {
                        format!(
                            "{:.0} ({:.0} dialled)",
                            demo::held_tunnels(&s),
                            demo::open_tunnels(&s)
                        )
                    });
                (
                    if alive {
                        pid.to_string()
                    } else {
                        format!("{pid}(dead)")
                    },
                    yes_no(ready),
                    tunnels,
                )
            }
            (Some(_), None) => ("stopped".into(), "no", "-".into()),
            (None, _) => ("-".into(), "-", "-".into()),
        };
        out!(
            "{:<5} {:<14} {:<10} {:<13} {:<8} {:<6} {}",
            n.name,
            n.netns,
            state.tunnel_address(n),
            n.pod_cidr,
            pid,
            ready,
            tunnels
        );
    }
    out!("\n{:<12} {:<5} {:<18} IP", "POD", "NODE", "NETNS");
    for p in &state.pods {
        out!(
            "{:<12} {:<5} {:<18} {}",
            format!("{}/{}", p.invocation.pod_namespace, p.invocation.pod_name),
            format!("n{}", p.node),
            p.invocation.netns,
            match (p.ip, p.ip6) {
                (None, _) => "(none)".to_owned(),
                (Some(ip), None) => ip.to_string(),
                (Some(ip), Some(ip6)) => format!("{ip}, {ip6}"),
            }
        );
    }
}

fn demo_run(opts: &LabOptions, mib: u64) -> Result<(), LabError> {
    let lab = up(opts)?;
    let bytes = mib << 20;
    let mut pairs = Vec::new();
    let families: &[Family] = if opts.dual_stack {
        &[Family::V4, Family::V6]
    } else {
        &[Family::V4]
    };
    for &family in families {
        if let (Ok(a), Ok(b)) = (lab.pod(1, 1), lab.pod(2, 1)) {
            pairs.push(("across nodes", family, a, b));
        }
        if let (Ok(a), Ok(b)) = (lab.pod(1, 1), lab.pod(1, 2)) {
            pairs.push(("within a node", family, a, b));
        }
        if let (Ok(a), Ok(b)) = (lab.pod(2, 2), lab.pod(1, 2)) {
            pairs.push(("across nodes", family, a, b));
        }
    }
    if pairs.is_empty() {
        out!("no pod pairs to send traffic between (use --nodes 2 --pods-per-node 2)");
    }
    out!("\ntraffic ({mib} MiB each way per connection, SHA-256 checked):");
    for (kind, family, src, dst) in &pairs {
        if lab::interrupted() {
            return Err(LabError::Interrupted);
        }
        let start = Instant::now();
        lab.transfer_over(src, dst, *family, 8080, bytes)?;
        let secs = start.elapsed().as_secs_f64();
        out!(
            "  {:<14} {} ({}) -> {} ({}): ok, hashes equal, {:.0} ms, {:.0} MiB/s",
            kind,
            src.name,
            src.addr_in(*family, 0)?.ip(),
            dst.name,
            dst.addr_in(*family, 8080)?,
            secs * 1000.0,
            (2 * mib) as f64 / secs.max(1e-9)
        );
    }
    if opts.mesh {
        // The daemons count a connection once both sides closed: give them a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        let samples = loop {
            let mut all = Vec::new();
            for n in lab.nodes() {
                all.extend(lab.metrics(n.index)?);
            }
            let closed = metrics::sum(&all, demo::CLOSED, &[("reporter", "source")]);
            if closed >= pairs.len() as f64 || Instant::now() >= deadline {
                break all;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        out!("\nper-edge metrics from the daemons:");
        let edges = demo::edges(&samples);
        if edges.is_empty() {
            out!("  (no connections reported: is traffic captured? see the daemons' logs)");
        } else {
            outp!("{}", demo::render(&edges));
        }
        let mut tunnels = 0.0;
        for n in lab.nodes() {
            let samples = lab.metrics(n.index)?;
            let t = demo::open_tunnels(&samples);
            out!("  node {}: {t:.0} tunnel(s) dialled to peers", n.name);
            for path in demo::tunnel_paths(&samples) {
                out!("    {}", path.render());
            }
            tunnels += t;
        }
        let nodes = lab.nodes().len();
        out!(
            "QUIC tunnels in the lab: {tunnels:.0} (at most {} for {nodes} nodes: one per node pair, carrying streams both ways, whatever the number of pods)",
            demo::max_tunnels(nodes)
        );
    } else {
        out!("\n(mesh off: no daemons, no metrics)");
    }
    out!("\nremoving lab {} ...", lab.prefix());
    let prefix = lab.prefix().to_owned();
    for p in lab.down() {
        eprintln!("warning: {p}");
    }
    let left = lab::wait_clean(&prefix, Duration::from_secs(5))?;
    out!(
        "lab {prefix} removed{}",
        if left.is_clean() {
            ""
        } else {
            " (with leftovers, run `nodemesh-lab down`)"
        }
    );
    Ok(())
}

fn bench_run(prefix: &str, args: BenchArgs) -> Result<(), LabError> {
    use nodemesh_lab::bench::{self, BenchOptions, Parts, Selection, Sizes};
    let only = Selection {
        paths: args.paths,
        figures: args.figures,
    };
    if let Some(bad) = only.unknown() {
        return Err(LabError::BadOption {
            option: "--paths/--figures",
            problem: format!("unknown name {bad}"),
        });
    }
    let mut sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    if let Some(p) = args.pods {
        sizes.pods = p;
    }
    sizes.sidecar_max_pods = args
        .sidecar_max_pods
        .unwrap_or_else(|| sizes.pods.iter().copied().max().unwrap_or(0));
    if let Some(r) = args.runs {
        sizes.runs = r.max(1);
    }
    let opts = BenchOptions {
        prefix: prefix.to_owned(),
        bin_dir: args.bin_dir,
        docs_dir: args.docs_dir,
        sizes,
        quick: args.quick,
        parts: Parts {
            datapath: !args.no_datapath,
            tuning: !args.no_tuning,
            cost: !args.no_cost,
            relays: !args.no_relays,
        },
        command: std::env::var("NODEMESH_BENCH_COMMAND")
            .unwrap_or_else(|_| std::env::args().collect::<Vec<_>>().join(" ")),
        note: args.note,
        merge: args.merge,
        only,
        underlay_mtu: args.underlay_mtu,
        variants: args.variants,
    };
    let start = Instant::now();
    let result = if args.report_only {
        bench::rewrite_report(&opts)
    } else {
        bench::run(&opts, &mut |line| {
            out!("[{:>6.1}s] {line}", start.elapsed().as_secs_f64());
        })
    };
    match result {
        Ok(r) => {
            for v in bench::report::verdicts(&r) {
                out!(
                    "target: {} -> {} ({})",
                    v.target,
                    v.measured,
                    match v.met {
                        Some(true) => "met",
                        Some(false) => "MISSED",
                        None => "not measured",
                    }
                );
            }
            Ok(())
        }
        Err(bench::BenchError::Lab(e)) => Err(e),
        Err(e) => Err(LabError::WorkerFailed {
            problem: format!("benchmark: {e}"),
        }),
    }
}

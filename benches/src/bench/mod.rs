//! `nodemesh-lab bench`: the benchmark run behind `scripts/bench`.
//!
//! Owns the whole run: data-path figures for direct pod-to-pod, a stunnel
//! mTLS pair and nodemesh (cross-node and same-node) in [`datapath`]; the
//! per-node versus per-pod (sidecar) cost comparison in [`cost`]; tunnel
//! tuning variants in [`datapath::tuning`]; and the report (`docs/benchmarks.md`,
//! `docs/benchmarks/results.json`, SVG plots) in [`report`]. Each figure is
//! measured several times and reported as median and min–max.

pub mod cost;
pub mod datapath;
pub mod load;
pub mod procfs;
pub mod relay_pair;
pub mod relays;
pub mod report;
pub mod sidecar;
pub mod stats;
pub mod stunnel;
pub mod svg;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::LabError;

/// What can stop a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Building or using a lab failed.
    #[error(transparent)]
    Lab(#[from] LabError),
    /// An I/O operation of the benchmark failed.
    #[error("{what}: {source}")]
    Io {
        /// The operation.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// The lab prefix leaves no room for the suffixes of the labs a run
    /// builds (`d`, `m`, `c`, and `t0`.. for the tuning variants).
    #[error(
        "prefix {prefix:?} is too long for this run: its labs are named prefix + suffix, up to \
         {longest:?}, and a lab name has at most {max_len} characters; use --prefix with at \
         most {fits} characters"
    )]
    PrefixTooLong {
        /// The prefix given.
        prefix: String,
        /// The longest lab name the run would build.
        longest: String,
        /// The longest lab name allowed.
        max_len: usize,
        /// The longest prefix that fits.
        fits: usize,
    },
    /// A baseline's program is not installed.
    #[error(
        "{program} is not on PATH: install Debian's {package} (`apt-get install {package}`; \
         scripts/bench does), or leave the {path} path out with --paths"
    )]
    BaselineMissing {
        /// The program looked for.
        program: &'static str,
        /// The Debian package that has it.
        package: &'static str,
        /// The path it is the baseline of.
        path: &'static str,
    },
    /// A measurement could not be taken or makes no sense.
    #[error("measuring {what}: {problem}")]
    Measure {
        /// The figure.
        what: String,
        /// What went wrong.
        problem: String,
    },
}

/// How big a run is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sizes {
    /// Runs per figure.
    pub runs: usize,
    /// Bytes of the single-stream bulk transfer.
    pub bulk_bytes: u64,
    /// Bytes per stream of the 8-stream bulk transfer.
    pub bulk8_bytes: u64,
    /// Request rates of the latency figure (req/s).
    pub rates: Vec<u32>,
    /// Seconds per latency run.
    pub latency_secs: f64,
    /// Request and response size, bytes.
    pub msg_len: usize,
    /// New connections per run.
    pub new_conns: usize,
    /// Idle connections opened for the per-connection memory figure.
    pub idle_conns: usize,
    /// Pods per node of the cost comparison.
    pub pods: Vec<usize>,
    /// Pods per node above which sidecar mode is not run.
    pub sidecar_max_pods: usize,
    /// Total request rate of the cost comparison's fixed load (req/s).
    pub cost_rate: u32,
    /// Seconds of fixed load per cost point.
    pub cost_secs: f64,
}

impl Sizes {
    /// The full run.
    pub fn full() -> Self {
        Self {
            runs: 5,
            bulk_bytes: 512 << 20,
            bulk8_bytes: 64 << 20,
            rates: vec![1_000, 5_000],
            latency_secs: 5.0,
            msg_len: 64,
            new_conns: 300,
            idle_conns: 1_000,
            pods: vec![1, 10, 30, 100],
            sidecar_max_pods: 100,
            cost_rate: 600,
            cost_secs: 10.0,
        }
    }

    /// A short run for development (`--quick`): same figures, fewer and smaller runs.
    pub fn quick() -> Self {
        Self {
            runs: 2,
            bulk_bytes: 64 << 20,
            bulk8_bytes: 8 << 20,
            rates: vec![1_000],
            latency_secs: 1.0,
            msg_len: 64,
            new_conns: 50,
            idle_conns: 200,
            pods: vec![1, 3],
            sidecar_max_pods: 3,
            cost_rate: 300,
            cost_secs: 3.0,
        }
    }
}

/// Options of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    /// Namespace prefix (labs use it plus a suffix: d, m, c, r, t0..).
    pub prefix: String,
    /// Where `nodemesh` and `nodemesh-cni` are.
    pub bin_dir: Option<PathBuf>,
    /// The `docs/` directory to write into.
    pub docs_dir: PathBuf,
    /// Sizes.
    pub sizes: Sizes,
    /// Quick mode (for the report).
    pub quick: bool,
    /// Which parts to run.
    pub parts: Parts,
    /// The command line, as typed (for the report).
    pub command: String,
    /// Free-text note on the machine's conditions (for the report).
    pub note: Option<String>,
    /// Keep the parts not run from the existing `results.json`.
    pub merge: bool,
    /// Which data-path paths and figures to measure (development runs).
    pub only: Selection,
    /// MTU of every lab link, for all paths alike (`None`: 1500).
    pub underlay_mtu: Option<u32>,
    /// Tuning variants to run: substrings of their names (empty: all).
    pub variants: Vec<String>,
}

/// A subset of the data-path figures, for short development runs
/// (`--paths`, `--figures`); the default is everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Path keys to measure (`direct`, `stunnel`, `relay-pair`,
    /// `nodemesh-cross`, `nodemesh-same`); empty = all.
    pub paths: Vec<String>,
    /// Figures to measure (`bulk`, `latency`, `new-conn`, `idle-mem`); empty = all.
    pub figures: Vec<String>,
}

/// The path keys [`Selection::paths`] accepts.
pub const PATH_KEYS: [&str; 5] = [
    "direct",
    "stunnel",
    "relay-pair",
    "nodemesh-cross",
    "nodemesh-same",
];
/// The figure names [`Selection::figures`] accepts.
pub const FIGURE_KEYS: [&str; 4] = ["bulk", "latency", "new-conn", "idle-mem"];

impl Selection {
    /// Whether path `key` is measured.
    pub fn path(&self, key: &str) -> bool {
        self.paths.is_empty() || self.paths.iter().any(|p| p == key)
    }

    /// Whether figure `key` is measured.
    pub fn figure(&self, key: &str) -> bool {
        self.figures.is_empty() || self.figures.iter().any(|f| f == key)
    }

    /// The first unknown path or figure name, if any.
    pub fn unknown(&self) -> Option<&str> {
        self.paths
            .iter()
            .find(|p| !PATH_KEYS.contains(&p.as_str()))
            .or_else(|| {
                self.figures
                    .iter()
                    .find(|f| !FIGURE_KEYS.contains(&f.as_str()))
            })
            .map(String::as_str)
    }
}

/// Which parts of the run to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    /// Data-path figures against the baselines.
    pub datapath: bool,
    /// Tunnel tuning variants.
    pub tuning: bool,
    /// Node versus sidecar cost comparison.
    pub cost: bool,
    /// Plain-TCP relay engines (copy, splice, tokio-uring).
    pub relays: bool,
}

/// Everything a run measured (the JSON file).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    /// Machine and run description.
    pub meta: report::Meta,
    /// Data-path figures, one entry per path.
    pub paths: Vec<datapath::PathResult>,
    /// Tunnel tuning variants (cross-node nodemesh throughput).
    pub tuning: Vec<datapath::TuningResult>,
    /// Cost comparison points.
    pub cost: Vec<cost::CostPoint>,
    /// Plain-TCP relay engines (absent from runs before they were measured).
    #[serde(default)]
    pub relays: Vec<relays::RelayEngineResult>,
}

/// Re-renders `docs/benchmarks.md` and the plots from the existing
/// `results.json` (e.g. after editing `notes.md`), measuring nothing.
pub fn rewrite_report(opts: &BenchOptions) -> Result<Results, BenchError> {
    let path = opts.docs_dir.join("benchmarks/results.json");
    let results: Results = std::fs::read(&path)
        .map_err(|source| BenchError::Io {
            what: format!("reading {}", path.display()),
            source,
        })
        .and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| BenchError::Measure {
                what: path.display().to_string(),
                problem: e.to_string(),
            })
        })?;
    report::write(opts, &results)?;
    Ok(results)
}

/// Runs the benchmark and writes the report; `progress` gets one line per step.
pub fn run(opts: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<Results, BenchError> {
    let meta = report::Meta::collect(opts);
    progress(&format!("machine: {}", meta.summary()));
    let mut results = Results {
        meta,
        paths: Vec::new(),
        tuning: Vec::new(),
        cost: Vec::new(),
        relays: Vec::new(),
    };
    if opts.merge {
        let path = opts.docs_dir.join("benchmarks/results.json");
        let prev: Results = std::fs::read(&path)
            .map_err(|source| BenchError::Io {
                what: format!("reading {} to merge", path.display()),
                source,
            })
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| BenchError::Measure {
                    what: format!("{} to merge", path.display()),
                    problem: e.to_string(),
                })
            })?;
        let mut kept = Vec::new();
        if !opts.parts.datapath {
            results.paths = prev.paths;
            kept.push("data path");
        }
        if !opts.parts.tuning {
            results.tuning = prev.tuning;
            kept.push("tuning");
        }
        if !opts.parts.cost {
            results.cost = prev.cost;
            kept.push("cost");
        }
        if !opts.parts.relays {
            results.relays = prev.relays;
            kept.push("relay engines");
        }
        results.meta.merged_from = Some(format!(
            "{} kept from the run of {} (`{}`, load average at its start {})",
            kept.join(", "),
            prev.meta.started,
            prev.meta.command,
            prev.meta.loadavg
        ));
        progress(&format!("merging: {}", kept.join(", ")));
    }
    if opts.parts.datapath || opts.parts.tuning {
        let (paths, tuning) = datapath::run(opts, progress)?;
        results.paths = paths;
        results.tuning = tuning;
        // Write what we have so far: a later failure keeps these figures.
        report::write(opts, &results)?;
    }
    if opts.parts.relays {
        results.relays = relays::run(opts, progress)?;
        report::write(opts, &results)?;
    }
    if opts.parts.cost {
        results.cost = cost::run(opts, progress)?;
    }
    results.meta.finished = report::now_utc();
    report::write(opts, &results)?;
    progress(&format!(
        "wrote {} and {}",
        opts.docs_dir.join("benchmarks.md").display(),
        opts.docs_dir.join("benchmarks/results.json").display()
    ));
    Ok(results)
}

//! `tributary plan SYSTEM`: from measured per-node figures (a `tributary bench SYSTEM --report
//! DIR` result) to the nodes, partitions and monthly cost the seed's rates need, beside the
//! seed's own template plan.
//!
//! The model, stated so that a reader can disagree with it:
//! - **Per-node capacity** is the highest rate one node sustained in the bench within the
//!   seed's latency target (the peak phase's `within_latency_rate`), or, when no peak step
//!   did, the normal phase's achieved rate (then only a lower bound: the node may carry more).
//!   A rate carried seconds late (`sustained_rate`) does not count. It was measured with the load
//!   generator on the same cores, so it understates a dedicated node.
//! - **Headroom**: nodes run at most at `--utilization` (default 0.7) of that capacity, so a
//!   burst or a lost node does not push the rest past what was measured.
//! - **Replication**: every message is stored on `--replication` nodes (default 3, to survive
//!   a node loss at the seed's availability), and each copy costs a node as much as the one
//!   the bench measured. Tributary runs one node today: this is an estimate of a replicated
//!   deployment, not a measurement of one.
//! - **Partitions**: the declared topology's partitions per node (its largest `partitions`
//!   parameter, else 1) were what one node carried; the plan scales them with the rate so no
//!   partition carries more than in the bench, and never has fewer than one per node.
//! - **Cost**: nodes × `--node-usd-month` (default $69.12: $0.096 an hour for 720 hours, an
//!   on-demand 2 vCPU / 8 GiB general-purpose VM in a large public cloud, the size of the
//!   bench machine), and per request over a 30-day month, as the seed's template counts it
//!   (its $460,000 a month at 5,000 requests/s gives its $0.00003549 per request).
//! - **Rates**: the seed's rate, and its peak: the seed's own peak figure where it states one,
//!   else ten times the rate.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::Args;
use serde::Serialize;
use tributary_runtime::Catalogue;
use tributary_runtime::catalogue::System as SystemSpec;

#[derive(Debug, Clone, Args)]
pub struct PlanArgs {
    /// The system's id, as `tributary systems` lists it.
    pub system: String,
    /// A bench report: the folder given to `tributary bench SYSTEM --report DIR`, or its
    /// `SYSTEM.json`.
    #[arg(long, default_value = "bench-report")]
    pub report: PathBuf,
    /// Price of one node per month, in US dollars.
    #[arg(long, default_value_t = NODE_USD_MONTH_DEFAULT)]
    pub node_usd_month: f64,
    /// Fraction of the measured per-node capacity a node is planned to carry.
    #[arg(long, default_value_t = UTILIZATION_DEFAULT)]
    pub utilization: f64,
    /// Copies of every message, each on its own node.
    #[arg(long, default_value_t = REPLICATION_DEFAULT)]
    pub replication: u64,
    #[arg(long)]
    pub json: bool,
}

/// $0.096 an hour × 720 hours.
pub const NODE_USD_MONTH_DEFAULT: f64 = 69.12;
pub const UTILIZATION_DEFAULT: f64 = 0.7;
pub const REPLICATION_DEFAULT: u64 = 3;
/// A 30-day month, as the seed's template counts requests.
pub const SECONDS_PER_MONTH: f64 = 30.0 * 24.0 * 3600.0;

/// What one node was measured to carry.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub per_node_rate: f64,
    /// `peak.within_latency_rate`, or `normal.achieved_rate` (a lower bound).
    pub source: String,
    pub partitions_per_node: u64,
    /// The seed's latency percentile, as measured at the normal rate.
    pub latency_ms_at_normal: Option<f64>,
    pub machine: serde_json::Value,
}

/// Nodes, partitions and cost for one rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sizing {
    pub rate: f64,
    pub nodes: u64,
    pub partitions: u64,
    pub monthly_usd: f64,
    pub cost_per_request_usd: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub system: String,
    pub report: PathBuf,
    pub measured: Measured,
    pub model: Model,
    pub normal: Sizing,
    pub peak: Sizing,
    pub template: Template,
    /// Template monthly cost over the plan's at the normal rate (how far the template is off).
    pub template_over_plan: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Model {
    pub node_usd_month: f64,
    pub utilization: f64,
    pub replication: u64,
    pub seconds_per_month: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Template {
    pub instances: u64,
    pub monthly_total_usd: f64,
    pub cost_per_request_usd: f64,
    pub claimed_latency: Vec<tributary_runtime::catalogue::Latency>,
}

/// Nodes and partitions for `rate`, given what one node carried.
pub fn size(rate: f64, per_node_rate: f64, partitions_per_node: u64, model: &Model) -> Sizing {
    assert!(per_node_rate > 0.0 && model.utilization > 0.0 && model.replication > 0, "sizing needs a positive capacity, utilization and replication");
    let usable = per_node_rate * model.utilization;
    let nodes = ((rate * model.replication as f64 / usable).ceil() as u64).max(model.replication);
    let per_partition = per_node_rate / partitions_per_node.max(1) as f64;
    let partitions = ((rate / (per_partition * model.utilization)).ceil() as u64).max(nodes).max(partitions_per_node);
    let monthly_usd = nodes as f64 * model.node_usd_month;
    Sizing { rate, nodes, partitions, monthly_usd, cost_per_request_usd: cost_per_request(monthly_usd, rate) }
}

/// Monthly cost spread over a month of requests at `rate`.
pub fn cost_per_request(monthly_usd: f64, rate: f64) -> f64 {
    monthly_usd / (rate * SECONDS_PER_MONTH)
}

pub fn run(args: &PlanArgs) -> anyhow::Result<Plan> {
    let spec = Catalogue::get().system(&args.system).with_context(|| format!("{} is not a system of the catalogue", args.system))?;
    anyhow::ensure!(args.node_usd_month >= 0.0, "--node-usd-month must not be negative");
    anyhow::ensure!(args.utilization > 0.0 && args.utilization <= 1.0, "--utilization must be in (0, 1], got {}", args.utilization);
    anyhow::ensure!(args.replication >= 1, "--replication must be at least 1");
    let path = report_file(&args.report, &args.system);
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {} (make it with `tributary bench {} --phase all --report DIR`)", path.display(), args.system))?;
    let phases: Vec<serde_json::Value> = serde_json::from_str(&text).with_context(|| format!("{} is not a bench report", path.display()))?;
    let measured = measured(&phases, spec, &args.system)?;
    let model = Model { node_usd_month: args.node_usd_month, utilization: args.utilization, replication: args.replication, seconds_per_month: SECONDS_PER_MONTH };
    let rate = spec.nonfunctional.rate_per_s.context("the seed gives the system no rate")?;
    let peak_rate = spec.nonfunctional.rate_peak_per_s.unwrap_or(rate * 10.0);
    let normal = size(rate, measured.per_node_rate, measured.partitions_per_node, &model);
    let peak = size(peak_rate, measured.per_node_rate, measured.partitions_per_node, &model);
    let t = &spec.template_plan;
    let template = Template { instances: t.instances, monthly_total_usd: t.monthly_total_usd, cost_per_request_usd: t.cost_per_request_usd, claimed_latency: t.claimed_latency.clone() };
    let template_over_plan = template.monthly_total_usd / normal.monthly_usd.max(f64::MIN_POSITIVE);
    Ok(Plan { system: args.system.clone(), report: path, measured, model, normal, peak, template, template_over_plan })
}

fn report_file(report: &Path, system: &str) -> PathBuf {
    if report.is_dir() { report.join(format!("{system}.json")) } else { report.to_path_buf() }
}

/// The per-node figure a report gives.
fn measured(phases: &[serde_json::Value], spec: &SystemSpec, system: &str) -> anyhow::Result<Measured> {
    let phase = |name: &str| phases.iter().find(|p| p["phase"] == name);
    if let Some(other) = phases.iter().find(|p| p["system"] != system) {
        bail!("the report is of {}, not {system}", other["system"]);
    }
    let normal = phase("normal");
    let (per_node_rate, source) = match (phase("peak").and_then(|p| p["peak"]["within_latency_rate"].as_f64()), normal.and_then(|p| p["achieved_rate"].as_f64())) {
        (Some(rate), _) => (rate, "the peak phase's highest rate sustained within the seed's latency target".to_string()),
        (None, Some(rate)) => (rate, "the normal phase's achieved rate (a lower bound: no peak step sustained a higher rate within the seed's latency target)".to_string()),
        (None, None) => bail!("the report has neither a peak rate within the latency target nor a normal phase"),
    };
    anyhow::ensure!(per_node_rate > 0.0, "the report measured no throughput");
    let percentile = spec.nonfunctional.latency.as_ref().map_or(99, |l| l.percentile);
    let key = match percentile {
        50 => "p50",
        95 => "p95",
        99 => "p99",
        _ => "p999",
    };
    let partitions_per_node = tributary_systems::entries()
        .iter()
        .find(|e| e.id == system)
        .map(|e| (e.topology)())
        .and_then(|t| t.components.iter().filter_map(|c| c.params.partitions).max())
        .map_or(1, u64::from);
    Ok(Measured {
        per_node_rate,
        source,
        partitions_per_node,
        latency_ms_at_normal: normal.and_then(|p| p["latency_ms"][key].as_f64()),
        machine: phases.first().map_or(serde_json::Value::Null, |p| p["machine"].clone()),
    })
}

impl Plan {
    /// The plan as a table beside the template, with the model underneath.
    pub fn human(&self) -> String {
        use comfy_table::{Table, presets};
        let mut table = Table::new();
        table.load_style(presets::UTF8_FULL_CONDENSED);
        table.set_header(["", "rate/s", "nodes", "partitions", "$/month", "$/request"]);
        for (name, s) in [("measured design, seed rate", &self.normal), ("measured design, peak", &self.peak)] {
            table.add_row([name.to_string(), format!("{:.0}", s.rate), s.nodes.to_string(), s.partitions.to_string(), format!("{:.2}", s.monthly_usd), format!("{:.3e}", s.cost_per_request_usd)]);
        }
        let t = &self.template;
        table.add_row(["seed's template".to_string(), format!("{:.0}", self.normal.rate), t.instances.to_string(), "-".to_string(), format!("{:.2}", t.monthly_total_usd), format!("{:.3e}", t.cost_per_request_usd)]);
        let claimed: Vec<String> = t.claimed_latency.iter().map(|l| format!("P{} {} ms", l.percentile, l.ms)).collect();
        format!(
            "{} capacity plan\n{table}\nper node: {:.0} msgs/s ({}), {} partition(s) per node{}\n\
             model: {} copies of each message, nodes at {:.0}% of measured capacity, ${:.2} per node-month, 30-day months\n\
             the template costs {:.0}× the measured design at the seed rate; it claims {} for every system, unmeasured\n",
            self.system,
            self.measured.per_node_rate,
            self.measured.source,
            self.measured.partitions_per_node,
            self.measured.latency_ms_at_normal.map_or(String::new(), |l| format!(", {l:.1} ms at the seed's percentile at the normal rate")),
            self.model.replication,
            self.model.utilization * 100.0,
            self.model.node_usd_month,
            self.template_over_plan,
            claimed.join(", "),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(replication: u64) -> Model {
        Model { node_usd_month: 100.0, utilization: 0.5, replication, seconds_per_month: SECONDS_PER_MONTH }
    }

    #[test]
    fn nodes_cover_the_rate_times_the_copies_at_the_planned_utilization() {
        // 1,000/s per node at 50% = 500/s usable; 5,000/s × 3 copies = 15,000 → 30 nodes.
        let s = size(5_000.0, 1_000.0, 1, &model(3));
        assert_eq!(s.nodes, 30);
        assert_eq!(s.monthly_usd, 3_000.0);
        // One partition carried 1,000/s; at 50% that is 500/s, so 10 partitions for 5,000/s.
        assert_eq!(s.partitions, 30, "never fewer partitions than nodes");
        let s = size(5_000.0, 1_000.0, 8, &model(1));
        assert_eq!(s.nodes, 10);
        assert_eq!(s.partitions, 80, "each partition carried 125/s, planned at 62.5/s");
    }

    #[test]
    fn a_small_rate_still_needs_one_node_per_copy() {
        let s = size(10.0, 100_000.0, 1, &model(3));
        assert_eq!(s.nodes, 3);
        assert_eq!(size(10.0, 100_000.0, 1, &model(1)).nodes, 1);
    }

    #[test]
    fn cost_per_request_is_counted_as_the_seed_counts_it() {
        // The seed's template: $460,000 a month at 5,000 requests/s is $0.00003549 a request.
        let seed = Catalogue::get().system("basic-message-queue").unwrap();
        let per_request = cost_per_request(seed.template_plan.monthly_total_usd, seed.nonfunctional.rate_per_s.unwrap());
        assert!((per_request - seed.template_plan.cost_per_request_usd).abs() < 1e-8, "{per_request}");
    }

    #[test]
    fn a_report_gives_the_peak_rate_within_latency_or_else_a_normal_lower_bound() {
        let spec = Catalogue::get().system("basic-message-queue").unwrap();
        let with_peak = serde_json::json!([
            {"system": "basic-message-queue", "phase": "normal", "achieved_rate": 5000.0, "latency_ms": {"p95": 4.0}},
            {"system": "basic-message-queue", "phase": "peak", "achieved_rate": 30000.0, "peak": {"sustained_rate": 30000.0, "within_latency_rate": 10000.0}},
        ]);
        let m = measured(with_peak.as_array().unwrap(), spec, "basic-message-queue").unwrap();
        assert_eq!(m.per_node_rate, 10_000.0, "a rate carried late does not count");
        let late_only = serde_json::json!([
            {"system": "basic-message-queue", "phase": "normal", "achieved_rate": 5000.0, "latency_ms": {"p95": 4.0}},
            {"system": "basic-message-queue", "phase": "peak", "achieved_rate": 30000.0, "peak": {"sustained_rate": 30000.0, "within_latency_rate": null}},
        ]);
        let m = measured(late_only.as_array().unwrap(), spec, "basic-message-queue").unwrap();
        assert_eq!(m.per_node_rate, 5_000.0);
        assert_eq!(m.latency_ms_at_normal, Some(4.0));
        let normal_only = serde_json::json!([{"system": "basic-message-queue", "phase": "normal", "achieved_rate": 5000.0, "latency_ms": {"p95": 4.0}}]);
        let m = measured(normal_only.as_array().unwrap(), spec, "basic-message-queue").unwrap();
        assert_eq!(m.per_node_rate, 5_000.0);
        assert!(m.source.contains("lower bound"));
        let other = serde_json::json!([{"system": "simple-pubsub", "phase": "normal", "achieved_rate": 1.0}]);
        assert!(measured(other.as_array().unwrap(), spec, "basic-message-queue").is_err());
    }
}

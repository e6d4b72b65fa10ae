//! `tributary`: the command line. Parsing and printing only; the work lives in the library.

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tracing_subscriber::EnvFilter;
use tributary::platform;
use tributary_runtime::Catalogue;
use tributary_server::ApiToken;
use tributary::bench::backends::{self, BackendsArgs};
use tributary::bench::components::{self, CacheArgs, QueueArgs, ReopenArgs, SubscriptionsArgs};
use tributary::bench::connections::{self, ConnectionsArgs};
use tributary::bench::engine::{self, EngineArgs};
use tributary::bench::peers::{self, PeerArgs};

#[derive(Debug, Parser)]
#[command(name = "tributary", version, about = "Streaming systems on one engine")]
struct Cli {
    /// Without a command: `up`.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every implemented system on the embedded engine (the default command).
    Up(UpArgs),
    /// The 35 systems of the catalogue and whether each is implemented.
    Systems {
        #[arg(long)]
        json: bool,
    },
    /// Check implemented systems' declared topologies against their design checkpoints.
    Check {
        /// One system id; all implemented systems when omitted.
        system: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Benchmarks: load generators with a verdict against their targets.
    #[command(subcommand)]
    Bench(Bench),
    /// Nodes, partitions and cost for the seed's rates, from a `bench SYSTEM --report DIR`.
    Plan(tributary::bench::plan::PlanArgs),
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// The embedded log alone: closed-loop throughput, or open-loop latency with --rate; with
    /// --peer, the same workload against NATS JetStream, Redis Streams or RabbitMQ.
    Engine(EngineCommand),
    /// The work queue: publish and per-message acks with several consumers.
    Queue(Json<QueueArgs>),
    /// One stream, queue and cache workload through the engine's interfaces, embedded and (with
    /// --nats URL, --redis URL) on NATS JetStream and Redis, side by side.
    Backends(Json<BackendsArgs>),
    /// The subscription trie: memory and match latency with many wildcard subscriptions.
    Subscriptions(Json<SubscriptionsArgs>),
    /// The in-process cache: single-thread operations per second.
    Cache(Json<CacheArgs>),
    /// Fill a log to a size, close it, and time reopening it and the first durable append.
    Reopen(Json<ReopenArgs>),
    /// WebSocket connections one node holds, memory per connection, broadcast to all of them.
    Connections(Json<ConnectionsArgs>),
    /// `tributary bench SYSTEM [--phase normal|peak|failure|all] [--target URL] [--rate R] [--report DIR] ...`:
    /// a system over its HTTP API.
    #[command(external_subcommand)]
    System(Vec<String>),
}

/// Parses `SYSTEM [options]` for `tributary bench SYSTEM`.
#[derive(Debug, Parser)]
#[command(name = "tributary bench")]
struct SystemCommand {
    #[command(flatten)]
    args: tributary::bench::system::SystemArgs,
}

#[derive(Debug, Clone, Args)]
struct UpArgs {
    /// Address to serve HTTP on. Beyond loopback, API tokens are required.
    #[arg(long, env = "TRIBUTARY_LISTEN", default_value = "127.0.0.1:7400")]
    listen: std::net::SocketAddr,
    /// Folder of the embedded engine's data.
    #[arg(long, env = "TRIBUTARY_DATA", default_value = "./data")]
    data: std::path::PathBuf,
    /// API token, `TOKEN` (all systems) or `TOKEN:system-a,system-b`; repeatable.
    /// TRIBUTARY_TOKENS takes several separated by spaces.
    #[arg(long = "token", env = "TRIBUTARY_TOKENS", value_delimiter = ' ', value_parser = ApiToken::parse)]
    tokens: Vec<ApiToken>,
    /// Where queues live: a NATS JetStream URL (`nats://host:4222`, several servers
    /// comma-separated). Then only the systems that keep no state in the node start, so several
    /// nodes can serve them behind a load balancer. Default: the embedded engine.
    #[arg(long, env = "TRIBUTARY_STREAM")]
    stream: Option<String>,
    /// The cache every node shares: a Redis URL (`redis://host:6379/0`). Presence of connected
    /// users (who is online, per topic or channel) is then counted across nodes. Default: each
    /// node counts its own connections.
    #[arg(long, env = "TRIBUTARY_CACHE")]
    cache: Option<String>,
    /// The database (db_primary): a PostgreSQL URL (`postgres://user:password@host:5432/db`)
    /// every node shares, its tables in a schema named after the namespace; or `sqlite://FILE`.
    /// Systems that keep state in the db (email-queue-system) start in distributed mode only with
    /// it. Default: the SQLite file `tributary.sqlite3` in the data folder.
    #[arg(long, env = "TRIBUTARY_DB")]
    db: Option<String>,
    /// A read replica of the database (db_replica): reads that tolerate lag go there.
    #[arg(long, env = "TRIBUTARY_DB_REPLICA", requires = "db")]
    db_replica: Option<String>,
    /// Connections of the node's database pool (and of the replica's). Raise it for a busy node:
    /// its workers, triggers and writers each hold one while they query.
    #[arg(long, env = "TRIBUTARY_DB_CONNECTIONS", requires = "db", default_value_t = tributary_sql::DB_CONNECTIONS_DEFAULT, value_parser = clap::value_parser!(u32).range(1..))]
    db_connections: u32,
    /// What this deployment's streams and keys live under on a shared backend (A-Z a-z 0-9 -).
    #[arg(long, env = "TRIBUTARY_NAMESPACE", default_value = platform::NAMESPACE_DEFAULT)]
    namespace: String,
}

impl Default for UpArgs {
    fn default() -> Self {
        UpArgs { listen: "127.0.0.1:7400".parse().expect("a valid address"), data: "./data".into(), tokens: Vec::new(), stream: None, cache: None, db: None, db_replica: None, db_connections: tributary_sql::DB_CONNECTIONS_DEFAULT, namespace: platform::NAMESPACE_DEFAULT.to_string() }
    }
}

/// A bench's own arguments plus `--json`.
#[derive(Debug, Args)]
struct Json<T: Args> {
    #[command(flatten)]
    args: T,
    /// Print JSON (the only output these benches have; accepted for symmetry with `engine`).
    #[arg(long)]
    json: bool,
}

fn print_json(report: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(report)?);
    Ok(())
}

#[derive(Debug, Args)]
struct EngineCommand {
    #[command(flatten)]
    args: EngineArgs,
    #[command(flatten)]
    peer: PeerArgs,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(EnvFilter::try_from_env("TRIBUTARY_LOG").unwrap_or_else(|_| EnvFilter::new("warn"))).init();
    let command = Cli::parse().command.unwrap_or_else(|| {
        // A bare `tributary` is `tributary up`, with its environment variables honoured.
        match Cli::try_parse_from(["tributary", "up"]).map(|cli| cli.command) {
            Ok(Some(up)) => up,
            _ => Command::Up(UpArgs::default()),
        }
    });
    match command {
        Command::Up(args) => {
            let runtime = tokio::runtime::Runtime::new()?;
            let config = platform::UpConfig { tokens: args.tokens, announce: true, stream: args.stream, cache: args.cache, db: args.db, db_replica: args.db_replica, db_connections: args.db_connections, namespace: args.namespace, ..platform::UpConfig::embedded(args.listen, args.data) };
            runtime.block_on(platform::up(config))?;
        }
        Command::Systems { json } => systems(json)?,
        Command::Check { system, json } => {
            if !check(system.as_deref(), json)? {
                std::process::exit(1);
            }
        }
        Command::Bench(Bench::Engine(command)) => {
            let report = if command.peer.peer.is_some() { peers::run(&command.args, &command.peer)? } else { engine::run(&command.args)? };
            if command.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.human());
            }
        }
        Command::Bench(Bench::Queue(command)) => print_json(&components::run_queue(&command.args)?)?,
        Command::Bench(Bench::Backends(command)) => {
            let runtime = tokio::runtime::Runtime::new()?;
            print_json(&runtime.block_on(backends::run_backends(&command.args))?)?
        }
        Command::Bench(Bench::Subscriptions(command)) => print_json(&components::run_subscriptions(&command.args))?,
        Command::Bench(Bench::Cache(command)) => print_json(&components::run_cache(&command.args))?,
        Command::Bench(Bench::Reopen(command)) => print_json(&components::run_reopen(&command.args)?)?,
        Command::Bench(Bench::Connections(command)) => {
            let runtime = tokio::runtime::Runtime::new()?;
            print_json(&runtime.block_on(connections::run(&command.args))?)?
        }
        Command::Bench(Bench::System(words)) => {
            let command = SystemCommand::try_parse_from(std::iter::once("tributary-bench".to_string()).chain(words)).unwrap_or_else(|e| e.exit());
            let runtime = tokio::runtime::Runtime::new()?;
            let reports = runtime.block_on(tributary::bench::system::run(&command.args))?;
            if command.args.json {
                for report in &reports {
                    println!("{}", serde_json::to_string(report)?);
                }
            } else {
                print!("{}", tributary::bench::report::table(&reports));
            }
            if let Some(dir) = &command.args.report {
                let line: Vec<String> = std::env::args().collect();
                let written = tributary::bench::report::write(dir, &reports, &line.join(" "))?;
                for path in written {
                    eprintln!("wrote {}", path.display());
                }
            }
        }
        Command::Plan(args) => {
            let plan = tributary::bench::plan::run(&args)?;
            if args.json {
                print_json(&plan)?;
            } else {
                print!("{}", plan.human());
            }
        }
    }
    Ok(())
}

fn systems(json: bool) -> anyhow::Result<()> {
    let implemented: Vec<&str> = tributary_systems::entries().iter().map(|e| e.id).collect();
    let rows: Vec<serde_json::Value> = Catalogue::get()
        .iter()
        .map(|s| serde_json::json!({"number": s.number, "id": s.id, "title": s.title, "implemented": implemented.contains(&s.id.as_str())}))
        .collect();
    if json {
        return print_json(&rows);
    }
    for s in Catalogue::get().iter() {
        let status = if implemented.contains(&s.id.as_str()) { "implemented" } else { "not yet" };
        println!("{:>2}  {:<32} {:<12} {}", s.number, s.id, status, s.title);
    }
    println!("\n{} of {} implemented", implemented.len(), Catalogue::get().iter().count());
    Ok(())
}

/// Check declared topologies; true when every checkpoint holds.
fn check(only: Option<&str>, json: bool) -> anyhow::Result<bool> {
    let entries = tributary_systems::entries();
    if let Some(id) = only {
        if !entries.iter().any(|e| e.id == id) {
            let known = Catalogue::get().system(id).is_some();
            anyhow::bail!("{id} is {}", if known { "in the catalogue but not implemented yet" } else { "not a system of the catalogue (see `tributary systems`)" });
        }
    }
    let mut all_hold = true;
    let mut reports = Vec::new();
    for entry in entries.iter().filter(|e| only.is_none_or(|id| id == e.id)) {
        let spec = Catalogue::get().system(entry.id).ok_or_else(|| anyhow::anyhow!("{} is missing from the catalogue", entry.id))?;
        let report = tributary_runtime::check(&(entry.topology)(), spec);
        all_hold &= report.holds;
        if !json {
            println!("{report}");
        }
        reports.push(report);
    }
    if json {
        print_json(&reports)?;
    }
    Ok(all_hold)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_log::Durability;

    #[test]
    fn the_issue_command_line_parses() {
        let cli = Cli::try_parse_from([
            "tributary", "bench", "engine", "--message-bytes", "100", "--batch", "100", "--messages", "2000000", "--durability", "interval:5", "--json",
        ])
        .unwrap();
        let Some(Command::Bench(Bench::Engine(command))) = cli.command else { panic!("parsed as another command") };
        assert!(command.json);
        assert_eq!(command.args.batch, Some(100));
        assert_eq!(command.args.messages, 2_000_000);
        assert_eq!(command.args.durability, Durability::Interval(std::time::Duration::from_millis(5)));
        assert!(Cli::try_parse_from(["tributary", "bench", "engine", "--durability", "sometimes"]).is_err());
    }
}

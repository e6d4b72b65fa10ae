//! `tributary`: the command line. Parsing and printing only; the work lives in the library.

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use tributary::bench::components::{self, CacheArgs, QueueArgs, ReopenArgs, SubscriptionsArgs};
use tributary::bench::engine::{self, EngineArgs};

#[derive(Debug, Parser)]
#[command(name = "tributary", version, about = "Streaming systems on one engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Benchmarks: load generators with a verdict against their targets.
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// The embedded log alone: closed-loop throughput, or open-loop latency with --rate.
    Engine(EngineCommand),
    /// The work queue: publish and per-message acks with several consumers.
    Queue(Json<QueueArgs>),
    /// The subscription trie: memory and match latency with many wildcard subscriptions.
    Subscriptions(Json<SubscriptionsArgs>),
    /// The in-process cache: single-thread operations per second.
    Cache(Json<CacheArgs>),
    /// Fill a log to a size, close it, and time reopening it and the first durable append.
    Reopen(Json<ReopenArgs>),
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
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    json: bool,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Bench(Bench::Engine(command)) => {
            let report = engine::run(&command.args)?;
            if command.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.human());
            }
        }
        Command::Bench(Bench::Queue(command)) => print_json(&components::run_queue(&command.args)?)?,
        Command::Bench(Bench::Subscriptions(command)) => print_json(&components::run_subscriptions(&command.args))?,
        Command::Bench(Bench::Cache(command)) => print_json(&components::run_cache(&command.args))?,
        Command::Bench(Bench::Reopen(command)) => print_json(&components::run_reopen(&command.args)?)?,
    }
    Ok(())
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
        let Command::Bench(Bench::Engine(command)) = cli.command else { panic!("parsed as another bench") };
        assert!(command.json);
        assert_eq!(command.args.batch, Some(100));
        assert_eq!(command.args.messages, 2_000_000);
        assert_eq!(command.args.durability, Durability::Interval(std::time::Duration::from_millis(5)));
        assert!(Cli::try_parse_from(["tributary", "bench", "engine", "--durability", "sometimes"]).is_err());
    }
}

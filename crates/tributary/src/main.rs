//! `tributary`: the command line. Parsing and printing only; the work lives in the library.

use clap::{Args, Parser, Subcommand};
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
        let Command::Bench(Bench::Engine(command)) = cli.command;
        assert!(command.json);
        assert_eq!(command.args.batch, Some(100));
        assert_eq!(command.args.messages, 2_000_000);
        assert_eq!(command.args.durability, Durability::Interval(std::time::Duration::from_millis(5)));
        assert!(Cli::try_parse_from(["tributary", "bench", "engine", "--durability", "sometimes"]).is_err());
    }
}

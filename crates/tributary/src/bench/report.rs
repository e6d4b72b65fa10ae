//! What `tributary bench SYSTEM` shows and writes: a table for people, JSON lines for scripts,
//! and with `--report DIR` a folder a reader can open: `SYSTEM.json` (every phase),
//! `SYSTEM.md` (the table, peak steps, faults and the command) and `SYSTEM-PHASE.svg` (p50, p99
//! and max end-to-end latency per second of the run, with the seed's target and the faults marked).
//!
//! The SVG is written by hand (a few lines, logarithmic latency axis), not by a plotting crate.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use comfy_table::{Table, presets};

use super::system::SystemReport;

/// The summary table, one row per phase.
pub fn table(reports: &[SystemReport]) -> String {
    let mut table = Table::new();
    table.load_style(presets::UTF8_FULL_CONDENSED);
    table.set_header(["phase", "offered/s", "achieved/s", "p50 ms", "p95 ms", "p99 ms", "p99.9 ms", "max ms", "errors", "lost", "dup", "target", "verdict"]);
    for r in reports {
        let l = &r.latency_ms;
        table.add_row([
            r.phase.to_string(),
            format!("{:.0}", r.offered_rate),
            format!("{:.0}", r.achieved_rate),
            format!("{:.2}", l.p50),
            format!("{:.2}", l.p95),
            format!("{:.2}", l.p99),
            format!("{:.2}", l.p999),
            format!("{:.2}", l.max),
            r.errors.to_string(),
            r.lost.to_string(),
            r.duplicated.to_string(),
            target_text(r),
            if r.target.met { "met".to_string() } else { "MISSED".to_string() },
        ]);
    }
    let mut out = format!("{} ({})\n{table}\n", reports.first().map_or("", |r| r.system.as_str()), reports.first().map_or("", |r| r.server.as_str()));
    for r in reports {
        out.push_str(&notes(r));
    }
    out
}

fn target_text(r: &SystemReport) -> String {
    match r.phase {
        "failure" => "nothing lost".to_string(),
        _ => format!("P{} < {} ms at {:.0}/s", r.target.percentile, r.target.latency_ms, r.target.rate),
    }
}

/// Peak steps and faults, in words.
fn notes(r: &SystemReport) -> String {
    let mut out = String::new();
    if let Some(peak) = &r.peak {
        let steps: Vec<String> = peak
            .steps
            .iter()
            .map(|s| {
                let verdict = match (s.sustained, s.within_latency) {
                    (false, _) => " (not sustained)",
                    (true, false) => " (late: over the latency target)",
                    (true, true) => "",
                };
                format!("{:.0}/s → {:.0}/s{verdict}", s.offered_rate, s.achieved_rate)
            })
            .collect();
        let _ = writeln!(
            out,
            "peak: target {:.0}/s; highest sustained within the latency target {}; highest carried at any latency {}; steps: {}",
            peak.target_rate,
            peak.within_latency_rate.map_or_else(|| "none".to_string(), |r| format!("{r:.0}/s")),
            peak.sustained_rate.map_or_else(|| "none".to_string(), |r| format!("{r:.0}/s")),
            steps.join(", ")
        );
    }
    for f in &r.faults {
        let _ = writeln!(
            out,
            "failure: {} at {:.1} s{}{}; recovered {}",
            f.kind,
            f.at_s,
            f.held.map_or(String::new(), |h| format!(", holding {h} messages")),
            f.down_ms.map_or(String::new(), |d| format!(", down {d:.0} ms")),
            f.recovered_ms.map_or_else(|| "NEVER".to_string(), |ms| format!("after {ms:.0} ms")),
        );
    }
    if r.phase == "failure" {
        let _ = writeln!(out, "failure: {} sends retried, {} errors, {} lost, {} duplicated", r.retries, r.errors, r.lost, r.duplicated);
    }
    out
}

/// Write `SYSTEM.json`, `SYSTEM.md` and one `SYSTEM-PHASE.svg` per phase into `dir`; returns
/// the files written.
pub fn write(dir: &Path, reports: &[SystemReport], command: &str) -> anyhow::Result<Vec<PathBuf>> {
    let system = reports.first().map(|r| r.system.clone()).context("no phase to report")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let json = dir.join(format!("{system}.json"));
    std::fs::write(&json, serde_json::to_string_pretty(reports)?)?;
    written.push(json);
    let mut markdown = format!("# `tributary bench {system}`\n\nCommand: `{command}`\n\n");
    if let Some(machine) = reports.first().and_then(|r| r.machine.as_ref()) {
        let _ = writeln!(
            markdown,
            "Machine: {} cores ({}), kernel {}, load average {} at the start, data on {}.\n",
            machine.nproc,
            machine.cpu_model.as_deref().unwrap_or("unknown CPU"),
            machine.kernel,
            machine.loadavg_1m.map_or("unknown".to_string(), |l| format!("{l:.2}")),
            machine.data_fs.as_deref().unwrap_or("an unknown file system"),
        );
    }
    markdown.push_str("| phase | offered/s | achieved/s | p50 ms | p95 ms | p99 ms | p99.9 ms | max ms | errors | lost | duplicated | target | verdict |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in reports {
        let l = &r.latency_ms;
        let _ = writeln!(
            markdown,
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} |",
            r.phase, r.offered_rate, r.achieved_rate, l.p50, l.p95, l.p99, l.p999, l.max, r.errors, r.lost, r.duplicated, target_text(r), if r.target.met { "met" } else { "**missed**" }
        );
    }
    markdown.push('\n');
    for r in reports {
        let notes = notes(r);
        if !notes.is_empty() {
            for line in notes.lines() {
                let _ = writeln!(markdown, "- {line}");
            }
        }
        let svg = dir.join(format!("{system}-{}.svg", r.phase));
        std::fs::write(&svg, latency_svg(r))?;
        let _ = writeln!(markdown, "\n![{} latency over time]({})\n", r.phase, svg.file_name().and_then(|n| n.to_str()).unwrap_or_default());
        written.push(svg);
    }
    let md = dir.join(format!("{system}.md"));
    std::fs::write(&md, markdown)?;
    written.push(md);
    Ok(written)
}

const WIDTH: f64 = 800.0;
const HEIGHT: f64 = 320.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 40.0;

/// p50, p99 and max per second on a logarithmic latency axis, the seed's target as a dashed line,
/// faults as vertical lines.
pub fn latency_svg(r: &SystemReport) -> String {
    let series = &r.series;
    let x_min = -(r.warmup_seconds as f64);
    let x_max = (series.last().map_or(r.seconds as i64, |s| s.second + 1) as f64).max(r.seconds as f64).max(x_min + 1.0);
    let highest = series.iter().map(|s| s.max_ms).fold(r.target.latency_ms, f64::max).max(1.0);
    let lowest = series.iter().map(|s| s.p50_ms).filter(|v| *v > 0.0).fold(highest, f64::min).min(r.target.latency_ms);
    let (log_min, log_max) = ((lowest.max(0.01)).log10().floor(), highest.log10().ceil().max(lowest.log10().floor() + 1.0));
    let x = |s: f64| LEFT + (s - x_min) / (x_max - x_min) * (WIDTH - LEFT - RIGHT);
    let y = |ms: f64| TOP + (log_max - ms.max(10f64.powf(log_min)).log10()) / (log_max - log_min) * (HEIGHT - TOP - BOTTOM);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{LEFT}\" y=\"18\" font-size=\"13\">{} {}: end-to-end latency per second of intended send time ({:.0} msgs/s offered)</text>\n",
        r.system, r.phase, r.offered_rate
    );
    // Axes, decades and seconds.
    let _ = writeln!(svg, "<line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>", HEIGHT - BOTTOM, WIDTH - RIGHT, HEIGHT - BOTTOM);
    let _ = writeln!(svg, "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{}\" stroke=\"black\"/>", HEIGHT - BOTTOM);
    let mut decade = log_min;
    while decade <= log_max {
        let ms = 10f64.powf(decade);
        let _ = writeln!(svg, "<line x1=\"{LEFT}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"#ddd\"/><text x=\"{2}\" y=\"{3:.1}\" text-anchor=\"end\">{4} ms</text>", y(ms), WIDTH - RIGHT, LEFT - 4.0, y(ms) + 4.0, trim(ms));
        decade += 1.0;
    }
    let step = ((x_max - x_min) / 10.0).ceil().max(1.0);
    let mut s = (x_min / step).ceil() * step;
    while s <= x_max {
        let _ = writeln!(svg, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>", x(s), HEIGHT - BOTTOM + 14.0, s as i64);
        s += step;
    }
    let _ = writeln!(svg, "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">seconds (negative: warm-up)</text>", (LEFT + WIDTH - RIGHT) / 2.0, HEIGHT - 6.0);
    // Target.
    let _ = writeln!(
        svg,
        "<line x1=\"{LEFT}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"green\" stroke-dasharray=\"6 4\"/><text x=\"{1}\" y=\"{2:.1}\" text-anchor=\"end\" fill=\"green\">target P{3} &lt; {4} ms</text>",
        y(r.target.latency_ms),
        WIDTH - RIGHT - 4.0,
        y(r.target.latency_ms) + 13.0,
        r.target.percentile,
        trim(r.target.latency_ms)
    );
    // Faults.
    for (i, f) in r.faults.iter().enumerate() {
        let _ = writeln!(svg, "<line x1=\"{0:.1}\" y1=\"{TOP}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"orange\"/><text x=\"{2:.1}\" y=\"{3}\" fill=\"orange\">{4}</text>", x(f.at_s), HEIGHT - BOTTOM, x(f.at_s) + 3.0, TOP + 12.0 + 12.0 * (i % 2) as f64, f.kind);
    }
    // Series: points at the middle of each second.
    let lines: [(&str, &str, fn(&super::scenarios::SecondSummary) -> f64); 3] = [("p50", "steelblue", |s| s.p50_ms), ("p99", "crimson", |s| s.p99_ms), ("max", "#999", |s| s.max_ms)];
    for (i, (name, color, value)) in lines.into_iter().enumerate() {
        let points: Vec<String> = series.iter().map(|s| format!("{:.1},{:.1}", x(s.second as f64 + 0.5), y(value(s)))).collect();
        let _ = writeln!(svg, "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>", points.join(" "));
        let legend_x = LEFT + 120.0 + 50.0 * i as f64;
        let _ = writeln!(svg, "<line x1=\"{legend_x}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{2}\" y=\"{3}\">{name}</text>", TOP - 12.0, legend_x + 14.0, legend_x + 18.0, TOP - 8.0);
    }
    svg.push_str("</svg>\n");
    svg
}

/// `1000` for 1000.0, `0.1` for 0.1.
fn trim(value: f64) -> String {
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

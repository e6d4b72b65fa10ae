//! The engine bench run in process with tiny numbers: its report has the promised fields and
//! its counts add up.

use serde_json::Value;
use tributary::bench::engine::{self, EngineArgs};
use tributary_log::Durability;

fn run(args: EngineArgs) -> Value {
    let report = engine::run(&args).unwrap();
    assert!(!report.human().is_empty());
    serde_json::to_value(&report).unwrap()
}

fn check_common_fields(json: &Value, args: &EngineArgs) {
    for field in [
        "durability", "message_bytes", "batch", "messages", "partitions", "producers", "produce_msgs_per_s", "produce_mb_per_s",
        "consume_msgs_per_s", "consume_mb_per_s", "machine", "target",
    ] {
        assert!(json.get(field).is_some(), "missing {field} in {json:#}");
    }
    assert_eq!(json["messages"], args.messages);
    assert_eq!(json["consumed_messages"], args.messages, "every message is read back");
    assert_eq!(json["message_bytes"], args.message_bytes);
    assert_eq!(json["durability"], args.durability.to_string());
    assert!(json["produce_msgs_per_s"].as_f64().unwrap() > 0.0);
    assert!(json["consume_msgs_per_s"].as_f64().unwrap() > 0.0);
    assert!(json["machine"]["nproc"].as_u64().unwrap() >= 1);
    assert!(json["machine"]["kernel"].is_string());
    assert_eq!(json["target"]["checks"].as_array().unwrap().len(), 5);
}

#[test]
fn throughput_mode_reads_back_every_message_across_partitions() {
    let data = tempfile::tempdir().unwrap();
    let args = EngineArgs {
        batch: Some(7),
        partitions: 3,
        producers: Some(2),
        segment_bytes: 4096,
        data: Some(data.path().join("bench")),
        ..EngineArgs::new(1000)
    };
    let json = run(args.clone());
    check_common_fields(&json, &args);
    assert_eq!(json["mode"], "throughput");
    assert_eq!(json["batch"], 7);
    assert_eq!(json["producers"], 2);
    assert!(json.get("publish_ack_ms").is_none(), "no latency without --rate");
    assert!(data.path().join("bench/partition-2").is_dir(), "a named data directory is kept");
    // 100-byte messages in batches of 7: only the consume target applies.
    let applies: Vec<&str> =
        json["target"]["checks"].as_array().unwrap().iter().filter(|c| c["applies"] == true).map(|c| c["metric"].as_str().unwrap()).collect();
    assert_eq!(applies, ["consume_msgs_per_s"]);
}

#[test]
fn rate_mode_reports_latency_percentiles_for_every_message() {
    let args = EngineArgs { rate: Some(5000), partitions: 2, durability: Durability::Always, ..EngineArgs::new(500) };
    let json = run(args.clone());
    check_common_fields(&json, &args);
    assert_eq!(json["mode"], "rate");
    assert_eq!(json["rate"], 5000);
    assert_eq!(json["batch"], 1, "rate mode appends one message at a time by default");
    assert_eq!(json["fetch_bytes"], 4096);
    for histogram in ["publish_ack_ms", "end_to_end_ms"] {
        for field in ["p50", "p99", "p999", "max"] {
            assert!(json[histogram][field].as_f64().unwrap() > 0.0, "{histogram}.{field} in {json:#}");
        }
        assert_eq!(json[histogram]["count"], 500);
    }
    assert!(json["publish_ack_ms"]["p50"].as_f64().unwrap() <= json["publish_ack_ms"]["max"].as_f64().unwrap());
}

#[test]
fn a_non_empty_data_directory_is_refused() {
    let data = tempfile::tempdir().unwrap();
    std::fs::write(data.path().join("old"), b"x").unwrap();
    let args = EngineArgs { data: Some(data.path().to_path_buf()), ..EngineArgs::new(10) };
    let error = engine::run(&args).unwrap_err().to_string();
    assert!(error.contains("not empty"), "{error}");
}

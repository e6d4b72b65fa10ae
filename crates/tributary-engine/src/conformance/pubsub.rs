//! The pub/sub interface's guarantees ([`PubSubStore`]), one case each. Every case publishes
//! under subjects of its own (`<namespace>.<case>.…`).

use std::time::Duration;

use bytes::Bytes;
use tributary_core::{Subject, SubjectPattern};

use super::{CaseFuture, Report, ok};
use crate::pubsub::{PubSubStore, RecvError, SlowConsumerPolicy, Subscribed, SubscriberOptions};

/// One guarantee of the PubSubStore interface.
pub type Case = super::Case<dyn PubSubStore, String>;

/// Every case, in the order they run.
pub const CASES: &[Case] = &[
    Case { name: "fan_out", guarantee: "every matching subscription gets the message with its subject, offset and payload", run: fan_out },
    Case { name: "wildcards", guarantee: "`*` matches one token and `>` one or more; other subjects are not delivered", run: wildcards },
    Case { name: "mqtt_parent", guarantee: "an MQTT filter `a/#` also matches `a` itself", run: mqtt_parent },
    Case { name: "order", guarantee: "one publisher's messages reach a subscription in publish order", run: order },
    Case { name: "no_history", guarantee: "a subscription does not get what was published before it was made", run: no_history },
    Case { name: "groups", guarantee: "members of a group with one pattern share the messages, each to exactly one; a plain subscription gets all", run: groups },
    Case { name: "drop_oldest", guarantee: "under DropOldest a subscriber that does not keep up keeps the newest messages", run: drop_oldest },
    Case { name: "errors", guarantee: "a buffer of 0 messages and a bad group name are refused", run: errors },
];

/// Runs every case against `store`, with subjects under `namespace` (one token: `A-Za-z0-9-`).
pub async fn run(store: &(dyn PubSubStore + 'static), namespace: &str) -> Report {
    super::run_cases(store, store.backend(), store.gaps(), CASES, |case| format!("{namespace}.{}", case.replace('_', "-")), super::nothing_to_tidy).await
}

const WAIT: Duration = Duration::from_secs(3);
const QUIET: Duration = Duration::from_millis(300);

fn subject(text: &str) -> Result<Subject, String> {
    Subject::parse(text).map_err(|e| e.to_string())
}

fn pattern(text: &str) -> Result<SubjectPattern, String> {
    SubjectPattern::parse(text).map_err(|e| e.to_string())
}

async fn subscribe(s: &dyn PubSubStore, pattern: &SubjectPattern, options: SubscriberOptions) -> Result<Box<dyn Subscribed>, String> {
    ok(s.subscribe(pattern, options).await, "subscribe")
}

/// The payloads received until `QUIET` passes without one.
async fn drain(subscription: &mut Box<dyn Subscribed>) -> Result<Vec<String>, String> {
    let mut got = Vec::new();
    loop {
        match subscription.recv(QUIET).await {
            Ok(delivery) => got.push(String::from_utf8_lossy(&delivery.message).into_owned()),
            Err(RecvError::Timeout) | Err(RecvError::Empty) => return Ok(got),
            Err(other) => return Err(format!("recv: {other}")),
        }
    }
}

fn fan_out(s: &dyn PubSubStore, base: String) -> CaseFuture<'_> {
    Box::pin(async move {
        let topic = subject(&format!("{base}.orders"))?;
        let exact = pattern(topic.as_str())?;
        let mut a = subscribe(s, &exact, SubscriberOptions::default()).await?;
        let mut b = subscribe(s, &exact, SubscriberOptions::default()).await?;
        ok(s.publish(&topic, 42, Bytes::from_static(&[0, 1, 255])).await, "publish")?;
        for (name, sub) in [("a", &mut a), ("b", &mut b)] {
            let got = sub.recv(WAIT).await.map_err(|e| format!("subscription {name}: {e}"))?;
            check_eq!(got.subject.as_str(), topic.as_str());
            check_eq!(got.offset, 42);
            check_eq!(got.message.as_ref(), &[0u8, 1, 255][..]);
        }
        Ok(())
    })
}

fn wildcards(s: &dyn PubSubStore, base: String) -> CaseFuture<'_> {
    Box::pin(async move {
        let mut one = subscribe(s, &pattern(&format!("{base}.orders.*.created"))?, SubscriberOptions::default()).await?;
        let mut rest = subscribe(s, &pattern(&format!("{base}.orders.>"))?, SubscriberOptions::default()).await?;
        for (i, tail) in ["orders.eu.created", "orders.eu.x.created", "orders", "orders.us.cancelled"].iter().enumerate() {
            ok(s.publish(&subject(&format!("{base}.{tail}"))?, i as u64, Bytes::from(tail.to_string())).await, "publish")?;
        }
        check_eq!(drain(&mut one).await?, vec!["orders.eu.created".to_string()]);
        check_eq!(drain(&mut rest).await?, vec!["orders.eu.created".to_string(), "orders.eu.x.created".to_string(), "orders.us.cancelled".to_string()]);
        Ok(())
    })
}

fn mqtt_parent(s: &dyn PubSubStore, base: String) -> CaseFuture<'_> {
    Box::pin(async move {
        let filter = SubjectPattern::from_mqtt_filter(&format!("{}/sensors/#", base.replace('.', "/"))).map_err(|e| e.to_string())?;
        let mut sub = subscribe(s, &filter, SubscriberOptions::default()).await?;
        ok(s.publish(&subject(&format!("{base}.sensors"))?, 0, Bytes::from_static(b"parent")).await, "publish")?;
        ok(s.publish(&subject(&format!("{base}.sensors.kitchen.temp"))?, 0, Bytes::from_static(b"child")).await, "publish")?;
        check_eq!(drain(&mut sub).await?, vec!["parent".to_string(), "child".to_string()]);
        Ok(())
    })
}

fn order(s: &dyn PubSubStore, base: String) -> CaseFuture<'_> {
    Box::pin(async move {
        let topic = subject(&format!("{base}.ticks"))?;
        let mut sub = subscribe(s, &pattern(topic.as_str())?, SubscriberOptions::default()).await?;
        for i in 0..200u64 {
            ok(s.publish(&topic, i, Bytes::from(i.to_string())).await, "publish")?;
        }
        let expected: Vec<String> = (0..200).map(|i: u64| i.to_string()).collect();
        check_eq!(drain(&mut sub).await?, expected);
        Ok(())
    })
}

fn no_history(s: &dyn PubSubStore, base: String) -> CaseFuture<'_> {
    Box::pin(async move {
        let topic = subject(&format!("{base}.news"))?;
        ok(s.publish(&topic, 0, Bytes::from_static(b"before")).await, "publish")?;
        let mut sub = subscribe(s, &pattern(topic.as_str())?, SubscriberOptions::default()).await?;
        ok(s.publish(&topic, 1, Bytes::from_static(b"after")).await, "publish")?;
        check_eq!(drain(&mut sub).await?, vec!["after".to_string()]);
        Ok(())
    })
}

fn groups(s: &dyn PubSubStore, base: String) -> CaseFuture<'_> {
    Box::pin(async move {
        let topic = subject(&format!("{base}.jobs"))?;
        let exact = pattern(topic.as_str())?;
        let member = || SubscriberOptions { group: Some("workers".into()), ..SubscriberOptions::default() };
        let mut first = subscribe(s, &exact, member()).await?;
        let mut second = subscribe(s, &exact, member()).await?;
        let mut audit = subscribe(s, &exact, SubscriberOptions::default()).await?;
        for i in 0..100u64 {
            ok(s.publish(&topic, i, Bytes::from(i.to_string())).await, "publish")?;
        }
        let (a, b) = (drain(&mut first).await?, drain(&mut second).await?);
        check!(!a.is_empty() && !b.is_empty(), "one member got everything: {} and {}", a.len(), b.len());
        let mut both: Vec<u64> = a.iter().chain(&b).map(|t| t.parse().unwrap_or(u64::MAX)).collect();
        both.sort_unstable();
        check_eq!(both, (0..100).collect::<Vec<u64>>());
        check_eq!(drain(&mut audit).await?.len(), 100);
        Ok(())
    })
}

fn drop_oldest(s: &dyn PubSubStore, base: String) -> CaseFuture<'_> {
    Box::pin(async move {
        let topic = subject(&format!("{base}.prices"))?;
        let options = SubscriberOptions { buffer_messages: 10, policy: SlowConsumerPolicy::DropOldest, group: None };
        let mut sub = subscribe(s, &pattern(topic.as_str())?, options).await?;
        for i in 0..100u64 {
            ok(s.publish(&topic, i, Bytes::from(i.to_string())).await, "publish")?;
        }
        // Let every message reach the subscription's buffer before reading it.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let got = drain(&mut sub).await?;
        let expected: Vec<String> = (90..100).map(|i: u64| i.to_string()).collect();
        check_eq!(got, expected);
        Ok(())
    })
}

fn errors(s: &dyn PubSubStore, base: String) -> CaseFuture<'_> {
    Box::pin(async move {
        let any = pattern(&format!("{base}.>"))?;
        let zero = s.subscribe(&any, SubscriberOptions { buffer_messages: 0, ..SubscriberOptions::default() }).await;
        check!(matches!(zero, Err(crate::pubsub::PubSubError::BufferSize { .. })), "a buffer of 0 was not refused as BufferSize");
        let bad = s.subscribe(&any, SubscriberOptions { group: Some("bad group!".into()), ..SubscriberOptions::default() }).await;
        check!(matches!(bad, Err(crate::pubsub::PubSubError::GroupName(_))), "a bad group name was not refused as GroupName");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_embedded_engine_conforms() {
        let broker = crate::pubsub::Broker::<bytes::Bytes>::new();
        let report = super::run(&broker, "conf").await;
        println!("{report}");
        report.assert_conforms();
        assert_eq!(report.passed.len(), super::CASES.len(), "the embedded engine declares no gap");
    }
}

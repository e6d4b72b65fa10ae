//! The seed's 35 systems as data: requirements, numeric targets, constants, the palette each
//! may use, hints, tiers, the reference design and the seed's template capacity plan.
//!
//! The data is `catalogue.json` beside this crate's `Cargo.toml`, generated from
//! `seed/streaming-systems.md` by `tools/seed_to_catalogue.py` and embedded with
//! `include_str!`; [`Catalogue::get`] parses it once. Every parsed number sits next to the raw
//! seed text it came from ([`Nonfunctional::raw`], [`Constant::raw`]), so a reader can always
//! see what the parser saw. How the script reads each field:
//!
//! - latency: the first `P<pct> < <n><ms|s|min>` (`P95 < 5s from log to search` → P95, 5000 ms);
//!   the rest of the line (a P99.9, a second scenario) stays in the raw text;
//! - request rate: the first `<n>[k|M|B] <unit>/<sec|hour|day>`, per second (`500k hours/day
//!   uploads` → 5.79/s); `… normal, <n> during …` gives [`Nonfunctional::rate_peak_per_s`];
//! - dataset: the first byte size and the first k/M/B count of the line;
//! - availability: the first percentage;
//! - reference components: `redirect_client` is `client`; a partition count the reference prose
//!   states ("Kafka with 100 partitions") becomes that stream's `params.partitions`.
//!
//! Not here: checking a topology against the tiers ([`crate::tiers`]) and anything measured:
//! the template plan is the seed's naive figure, kept for comparison only.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use crate::Result;
use crate::tiers::Rule;
use crate::topology::{ComponentKind, Topology};

/// The catalogue JSON, generated from the seed by `tools/seed_to_catalogue.py`.
pub const CATALOGUE_JSON: &str = include_str!("../catalogue.json");

static CATALOGUE: LazyLock<Catalogue> = LazyLock::new(|| {
    Catalogue::from_json(CATALOGUE_JSON)
        .expect("the embedded catalogue.json parses (the crate's tests check it)")
});

/// All systems, in the seed's order.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalogue {
    /// Where the data came from.
    pub source: String,
    pub systems: Vec<System>,
}

impl Catalogue {
    /// The embedded catalogue, parsed on first use.
    pub fn get() -> &'static Catalogue {
        &CATALOGUE
    }

    /// Parses a catalogue from its JSON form.
    pub fn from_json(text: &str) -> Result<Catalogue> {
        Ok(serde_json::from_str(text)?)
    }

    /// The system with this id (`basic-message-queue`).
    pub fn system(&self, id: &str) -> Option<&System> {
        self.systems.iter().find(|system| system.id == id)
    }

    /// The system with this seed number (1..=35).
    pub fn by_number(&self, number: u32) -> Option<&System> {
        self.systems.iter().find(|system| system.number == number)
    }

    /// The systems in the seed's order.
    pub fn iter(&self) -> std::slice::Iter<'_, System> {
        self.systems.iter()
    }
}

impl<'a> IntoIterator for &'a Catalogue {
    type Item = &'a System;
    type IntoIter = std::slice::Iter<'a, System>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// One of the seed's systems.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct System {
    /// The seed's number, 1..=35.
    pub number: u32,
    /// Kebab-case id (`basic-message-queue`).
    pub id: String,
    pub title: String,
    pub category: String,
    /// `Easy`, `Intermediate` or `Advanced`, as the seed writes it.
    pub difficulty: String,
    pub summary: String,
    pub goal: String,
    pub description: String,
    /// Functional requirements, one sentence each.
    pub functional: Vec<String>,
    pub nonfunctional: Nonfunctional,
    /// Named constants of the system (`message_rate` → 5000).
    pub constants: BTreeMap<String, Constant>,
    /// The palette kinds the system may use.
    pub components: Vec<ComponentKind>,
    pub hints: Vec<String>,
    /// Design checkpoints, T0 first.
    pub tiers: Vec<Tier>,
    pub reference: Reference,
    pub template_plan: TemplatePlan,
}

/// Non-functional requirements: the raw lines and what could be read from them as numbers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nonfunctional {
    /// Label → text, as the seed writes them (`"Latency"` → `"P95 < 100ms end-to-end"`).
    pub raw: BTreeMap<String, String>,
    pub latency: Option<Latency>,
    /// Target request rate per second (the normal rate when the seed gives normal and peak).
    pub rate_per_s: Option<f64>,
    /// What the rate counts (`messages`, `ticks`, `feed requests`).
    pub rate_unit: Option<String>,
    /// The peak rate per second, when the seed gives one beside the normal rate.
    pub rate_peak_per_s: Option<f64>,
    pub dataset: Option<Dataset>,
    pub availability: Option<Availability>,
}

/// A latency target: percentile `percentile` below `ms` milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    pub percentile: u8,
    pub ms: f64,
}

/// The dataset size: the first byte size and the first item count the seed names.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    #[serde(default)]
    pub bytes: Option<f64>,
    #[serde(default)]
    pub count: Option<f64>,
}

/// The availability target.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Availability {
    /// Uptime in percent (99.9).
    pub percent: f64,
}

/// A constant as the seed writes it, and its value when it is a number (`true` is not).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constant {
    pub raw: String,
    pub value: Option<f64>,
}

/// A design checkpoint: a name (`T0`), a title (`Queue`) and the rules that must all hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub name: String,
    pub title: String,
    pub rules: Vec<Rule>,
}

/// The seed's reference solution: its prose and its topology.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    pub text: String,
    #[serde(flatten)]
    pub topology: Topology,
}

/// The seed's generic capacity plan for the system: a template, not a measurement.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplatePlan {
    pub instances: u64,
    pub monthly_total_usd: f64,
    pub cost_per_request_usd: f64,
    /// The latency profile the template claims (P50, P95, P99).
    pub claimed_latency: Vec<Latency>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// Systems whose seed text has no dataset size at all.
    ///
    /// - `realtime-notifications`: its Non-Functional Requirements are only
    ///   "Latency: P95 < 50ms delivery time", "Request Rate: 100k notifications/sec" and
    ///   "Availability: 99.9% uptime".
    const WITHOUT_DATASET: [&str; 1] = ["realtime-notifications"];

    /// Systems whose seed text has no latency target or no request rate: none. The list is here
    /// so that a future seed that drops one must say so explicitly.
    const WITHOUT_LATENCY_OR_RATE: [&str; 0] = [];

    #[test]
    fn the_catalogue_holds_35_systems_numbered_1_to_35_with_unique_ids() {
        let catalogue = Catalogue::get();
        assert_eq!(catalogue.systems.len(), 35);
        let numbers: Vec<u32> = catalogue.iter().map(|system| system.number).collect();
        assert_eq!(
            numbers,
            (1..=35).collect::<Vec<_>>(),
            "seed order is number order"
        );
        let ids: BTreeSet<&str> = catalogue.iter().map(|system| system.id.as_str()).collect();
        assert_eq!(ids.len(), 35);
        for system in catalogue {
            assert!(
                !system.id.is_empty() && !system.title.is_empty(),
                "{}",
                system.number
            );
            assert!(
                system
                    .id
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            );
        }
    }

    #[test]
    fn every_system_has_a_latency_target_and_a_request_rate_as_numbers() {
        for system in Catalogue::get() {
            if WITHOUT_LATENCY_OR_RATE.contains(&system.id.as_str()) {
                continue;
            }
            let nonfunctional = &system.nonfunctional;
            let latency = nonfunctional
                .latency
                .unwrap_or_else(|| panic!("{} lost its latency", system.id));
            assert!(
                matches!(latency.percentile, 50..=99),
                "{}: {latency:?}",
                system.id
            );
            assert!(latency.ms > 0.0, "{}: {latency:?}", system.id);
            let rate = nonfunctional
                .rate_per_s
                .unwrap_or_else(|| panic!("{} lost its rate", system.id));
            assert!(rate > 0.0 && rate.is_finite(), "{}: {rate}", system.id);
            assert!(nonfunctional.rate_unit.is_some(), "{}", system.id);
            if let Some(peak) = nonfunctional.rate_peak_per_s {
                assert!(
                    peak > rate,
                    "{}: peak {peak} below normal {rate}",
                    system.id
                );
            }
        }
    }

    #[test]
    fn every_system_has_availability_and_all_but_the_listed_have_a_dataset_size() {
        for system in Catalogue::get() {
            let nonfunctional = &system.nonfunctional;
            let availability = nonfunctional
                .availability
                .unwrap_or_else(|| panic!("{}", system.id));
            assert!(
                (99.0..100.0).contains(&availability.percent),
                "{}",
                system.id
            );
            let expected_missing = WITHOUT_DATASET.contains(&system.id.as_str());
            assert_eq!(
                nonfunctional.raw.contains_key("Dataset Size"),
                !expected_missing,
                "{}",
                system.id
            );
            match nonfunctional.dataset {
                Some(dataset) => assert!(dataset.bytes.is_some() || dataset.count.is_some()),
                None => assert!(expected_missing, "{} lost its dataset size", system.id),
            }
        }
    }

    #[test]
    fn parsed_targets_match_the_seed_text_for_known_systems() {
        let catalogue = Catalogue::get();
        let queue = catalogue.system("basic-message-queue").unwrap();
        assert_eq!(queue.nonfunctional.raw["Latency"], "P95 < 100ms end-to-end");
        assert_eq!(
            queue.nonfunctional.latency,
            Some(Latency {
                percentile: 95,
                ms: 100.0
            })
        );
        assert_eq!(queue.nonfunctional.rate_per_s, Some(5_000.0));
        assert_eq!(queue.constants["consumer_count"].value, Some(3.0));
        let stock = catalogue.system("stock-price-updates").unwrap();
        assert_eq!(
            stock.nonfunctional.latency,
            Some(Latency {
                percentile: 99,
                ms: 10.0
            })
        );
        assert_eq!(stock.nonfunctional.rate_per_s, Some(1_000_000.0));
        let payments = catalogue.system("payment-transaction-log").unwrap();
        assert_eq!(payments.nonfunctional.rate_per_s, Some(580_000.0));
        assert_eq!(payments.nonfunctional.rate_peak_per_s, Some(5_800_000.0));
        let moderation = catalogue.system("content-moderation-queue").unwrap();
        assert_eq!(
            moderation.nonfunctional.latency,
            Some(Latency {
                percentile: 95,
                ms: 15.0 * 60_000.0
            })
        );
        let video = catalogue.system("video-upload-pipeline").unwrap();
        assert_eq!(
            video.constants["l4_enhanced"],
            Constant {
                raw: "true".into(),
                value: None
            }
        );
    }

    #[test]
    fn every_system_has_requirements_hints_tiers_and_a_template_plan() {
        for system in Catalogue::get() {
            assert!(!system.functional.is_empty(), "{}", system.id);
            assert!(!system.hints.is_empty(), "{}", system.id);
            assert!(!system.constants.is_empty(), "{}", system.id);
            assert!(
                system.components.contains(&ComponentKind::Client),
                "{}",
                system.id
            );
            assert!(!system.tiers.is_empty(), "{}", system.id);
            for (index, tier) in system.tiers.iter().enumerate() {
                assert_eq!(tier.name, format!("T{index}"), "{}", system.id);
                assert!(!tier.rules.is_empty(), "{} {}", system.id, tier.name);
            }
            assert!(system.template_plan.instances > 0);
            assert_eq!(
                system.template_plan.claimed_latency.len(),
                3,
                "{}",
                system.id
            );
        }
    }

    #[test]
    fn every_reference_topology_is_well_formed_and_uses_only_available_kinds() {
        for system in Catalogue::get() {
            let topology = &system.reference.topology;
            topology
                .validate()
                .unwrap_or_else(|error| panic!("{}: {error}", system.id));
            assert!(topology.components.len() >= 2 && !topology.connections.is_empty());
            for component in &topology.components {
                assert!(
                    system.components.contains(&component.kind),
                    "{}: {}",
                    system.id,
                    component.name
                );
            }
        }
    }

    #[test]
    fn lookup_by_id_and_number_agree_and_unknown_ids_are_none() {
        let catalogue = Catalogue::get();
        for system in catalogue {
            assert_eq!(catalogue.system(&system.id).unwrap().number, system.number);
            assert_eq!(catalogue.by_number(system.number).unwrap().id, system.id);
        }
        assert!(catalogue.system("no-such-system").is_none());
        assert!(catalogue.by_number(36).is_none());
    }
}

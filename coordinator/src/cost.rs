//! Each job's cost: the machine time its leases held (kept by the metastore when each lease
//! ends), split by how the machines were bought, and priced from the coordinator's price table
//! (`--price-table`: instance type -> dollars per hour, spot and on demand).

use std::collections::BTreeMap;
use std::path::Path;

use nightshift_metastore::UsageSum;
use nightshift_proto::CapacityType;
use nightshift_proto::wire::CostView;
use serde::Deserialize;

const MS_PER_S: f64 = 1000.0;
const S_PER_HOUR: f64 = 3600.0;
const ROWS_PER_MILLION: f64 = 1e6;

/// Dollars per hour of one instance type.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub spot: Option<f64>,
    #[serde(rename = "on-demand")]
    pub on_demand: Option<f64>,
}

/// Instance type -> price, e.g.
///
/// ```toml
/// [prices."g5.xlarge"]
/// spot = 0.45
/// on-demand = 1.006
/// ```
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceTable {
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
}

#[derive(Debug, thiserror::Error)]
pub enum PriceTableError {
    #[error("cannot read the price table {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("price table {path}: {message}")]
    Invalid { path: String, message: String },
}

impl PriceTable {
    pub fn load(path: &Path) -> Result<Self, PriceTableError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PriceTableError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|message| PriceTableError::Invalid {
            path: shown,
            message,
        })
    }

    /// Parses a table; every price must be a finite number of dollars, not negative.
    pub fn parse(text: &str) -> Result<Self, String> {
        let table: PriceTable = toml::from_str(text).map_err(|e| e.to_string())?;
        for (instance_type, price) in &table.prices {
            for (kind, dollars) in [("spot", price.spot), ("on-demand", price.on_demand)] {
                if dollars.is_some_and(|d| !d.is_finite() || d < 0.0) {
                    return Err(format!(
                        "prices.\"{instance_type}\".{kind} must be dollars per hour, 0 or more"
                    ));
                }
            }
        }
        Ok(table)
    }

    /// Dollars per hour of one instance of this type bought this way, if the table says.
    fn hourly(&self, instance_type: &str, capacity: CapacityType) -> Option<f64> {
        let price = self.prices.get(instance_type)?;
        match capacity {
            CapacityType::Spot => price.spot,
            CapacityType::OnDemand => price.on_demand,
        }
    }

    /// The cost of a job's usage, with `rows_done` rows done so far. `dollars` is there when
    /// the table has any price at all.
    pub fn cost(&self, usage: &[UsageSum], rows_done: u64) -> CostView {
        let mut cost = CostView {
            gpu_seconds: 0.0,
            spot_seconds: 0.0,
            on_demand_seconds: 0.0,
            unknown_seconds: 0.0,
            lost_seconds: 0.0,
            dollars: None,
            dollars_per_million_rows: None,
            unpriced_seconds: 0.0,
        };
        let mut dollars = 0.0;
        for u in usage {
            let slots = u.slots.max(1) as f64;
            let machine_s = u.held_ms as f64 / MS_PER_S / slots;
            cost.gpu_seconds += u.held_ms as f64 / MS_PER_S * u.gpus.max(0) as f64 / slots;
            cost.lost_seconds += u.lost_ms as f64 / MS_PER_S / slots;
            let capacity = u.capacity_type.as_deref().and_then(CapacityType::parse);
            match capacity {
                Some(CapacityType::Spot) => cost.spot_seconds += machine_s,
                Some(CapacityType::OnDemand) => cost.on_demand_seconds += machine_s,
                None => cost.unknown_seconds += machine_s,
            }
            let hourly = capacity.zip(u.instance_type.as_deref());
            match hourly.and_then(|(c, t)| self.hourly(t, c)) {
                Some(per_hour) => dollars += machine_s / S_PER_HOUR * per_hour,
                None => cost.unpriced_seconds += machine_s,
            }
        }
        if !self.prices.is_empty() {
            cost.dollars = Some(dollars);
            cost.dollars_per_million_rows =
                (rows_done > 0).then(|| dollars / rows_done as f64 * ROWS_PER_MILLION);
        }
        cost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(kind: Option<&str>, slots: i64, gpus: i64, held_ms: i64, lost_ms: i64) -> UsageSum {
        UsageSum {
            instance_type: Some("g5.xlarge".into()),
            capacity_type: kind.map(str::to_string),
            slots,
            gpus,
            held_ms,
            lost_ms,
        }
    }

    #[test]
    fn machine_time_is_split_by_slot_and_priced() {
        let table =
            PriceTable::parse("[prices.\"g5.xlarge\"]\nspot = 0.36\non-demand = 1.08\n").unwrap();
        // One hour on one of two slots of a spot machine with two GPUs: half an hour of the
        // machine, one GPU-hour; one hour on a one-slot on-demand machine, 10 min of it lost.
        let cost = table.cost(
            &[
                usage(Some("spot"), 2, 2, 3_600_000, 0),
                usage(Some("on-demand"), 1, 1, 3_600_000, 600_000),
            ],
            2_000_000,
        );
        assert_eq!(cost.spot_seconds, 1800.0);
        assert_eq!(cost.on_demand_seconds, 3600.0);
        assert_eq!(cost.gpu_seconds, 7200.0);
        assert_eq!(cost.lost_seconds, 600.0);
        let dollars = cost.dollars.unwrap();
        assert!((dollars - (0.18 + 1.08)).abs() < 1e-9, "{dollars}");
        let per_m = cost.dollars_per_million_rows.unwrap();
        assert!((per_m - dollars / 2.0).abs() < 1e-9);
        assert_eq!(cost.unpriced_seconds, 0.0);
    }

    #[test]
    fn unknown_machines_are_counted_apart_and_unpriced() {
        let table = PriceTable::parse("[prices.\"p4d.24xlarge\"]\nspot = 9.0\n").unwrap();
        let cost = table.cost(
            &[
                usage(None, 1, 0, 10_000, 0),
                usage(Some("spot"), 1, 0, 5_000, 0),
            ],
            0,
        );
        assert_eq!(cost.unknown_seconds, 10.0);
        assert_eq!(cost.unpriced_seconds, 15.0);
        assert_eq!(cost.dollars, Some(0.0));
        assert_eq!(cost.dollars_per_million_rows, None);
        assert_eq!(PriceTable::default().cost(&[], 5).dollars, None);
    }

    #[test]
    fn bad_tables_name_the_problem() {
        let negative = PriceTable::parse("[prices.\"g5.xlarge\"]\nspot = -1.0\n").unwrap_err();
        assert!(negative.contains("prices.\"g5.xlarge\".spot"), "{negative}");
        let unknown = PriceTable::parse("[prices.\"g5.xlarge\"]\nreserved = 1.0\n").unwrap_err();
        assert!(unknown.contains("reserved"), "{unknown}");
        let missing = PriceTable::load(Path::new("/no/such/prices.toml")).unwrap_err();
        assert!(missing.to_string().contains("/no/such/prices.toml"));
    }
}

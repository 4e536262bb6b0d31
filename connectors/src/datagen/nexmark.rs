//! The Nexmark event model: schemas and a random-access generator.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int64Builder, RecordBatch, StringBuilder, TimestampMillisecondBuilder,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;

use super::DatagenOptions;
use crate::format::types::{TIMESTAMP_TZ, timestamp_ms_type};

/// Event time of event 0: 2023-11-14T22:13:20.000Z.
pub const BASE_TIME_MS: i64 = 1_700_000_000_000;

const PERSON_PROPORTION: u64 = 1;
const AUCTION_PROPORTION: u64 = 3;
const BID_PROPORTION: u64 = 46;
const PROPORTION_DENOMINATOR: u64 = PERSON_PROPORTION + AUCTION_PROPORTION + BID_PROPORTION;
const FIRST_PERSON_ID: u64 = 1000;
const FIRST_AUCTION_ID: u64 = 1000;
const FIRST_CATEGORY_ID: u64 = 10;
const HOT_AUCTION_RATIO: u64 = 2;
const HOT_BIDDER_RATIO: u64 = 4;
const HOT_SELLER_RATIO: u64 = 4;
/// People a new auction's seller or a bid's bidder is drawn from (the most recent ones).
const ACTIVE_PEOPLE: u64 = 1000;

const CHANNELS: [&str; 4] = ["Google", "Facebook", "Baidu", "Apple"];
const FIRST_NAMES: [&str; 8] = [
    "Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie",
];
const LAST_NAMES: [&str; 8] = [
    "Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones",
];
const CITIES: [&str; 9] = [
    "Phoenix",
    "Los Angeles",
    "San Francisco",
    "Boise",
    "Portland",
    "Bend",
    "Redmond",
    "Seattle",
    "Kent",
];
const STATES: [&str; 6] = ["AZ", "CA", "ID", "OR", "WA", "WY"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NexmarkTable {
    Bid,
    Auction,
    Person,
}

impl NexmarkTable {
    pub const NAMES: [&'static str; 3] = ["bid", "auction", "person"];

    #[must_use]
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "bid" => Some(Self::Bid),
            "auction" => Some(Self::Auction),
            "person" => Some(Self::Person),
            _ => None,
        }
    }

    #[must_use]
    pub fn schema(self) -> Schema {
        let i = |n: &str| Field::new(n, DataType::Int64, false);
        let s = |n: &str| Field::new(n, DataType::Utf8, false);
        let t = |n: &str| Field::new(n, timestamp_ms_type(), false);
        Schema::new(match self {
            Self::Bid => vec![
                i("auction"),
                i("bidder"),
                i("price"),
                s("channel"),
                s("url"),
                t("date_time"),
                s("extra"),
            ],
            Self::Auction => vec![
                i("id"),
                s("item_name"),
                s("description"),
                i("initial_bid"),
                i("reserve"),
                t("date_time"),
                t("expires"),
                i("seller"),
                i("category"),
                s("extra"),
            ],
            Self::Person => vec![
                i("id"),
                s("name"),
                s("email_address"),
                s("credit_card"),
                s("city"),
                s("state"),
                t("date_time"),
                s("extra"),
            ],
        })
    }

    fn proportion(self) -> (u64, u64) {
        match self {
            Self::Person => (PERSON_PROPORTION, 0),
            Self::Auction => (AUCTION_PROPORTION, PERSON_PROPORTION),
            Self::Bid => (BID_PROPORTION, PERSON_PROPORTION + AUCTION_PROPORTION),
        }
    }

    /// The global Nexmark event number of this table's `i`-th event.
    fn event_number(self, i: u64) -> u64 {
        let (share, base) = self.proportion();
        (i / share) * PROPORTION_DENOMINATOR + base + i % share
    }
}

/// `SplitMix64`: a fast, well-mixed stream for one event.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, event: u64) -> Self {
        Self(seed ^ event.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// People and auctions that exist by global event number `e`.
fn people_before(e: u64) -> u64 {
    (e / PROPORTION_DENOMINATOR) * PERSON_PROPORTION + 1
}
fn auctions_before(e: u64) -> u64 {
    (e / PROPORTION_DENOMINATOR) * AUCTION_PROPORTION + 1
}

/// A person id among the recent ones, skewed to a few hot ones.
fn pick_person(rng: &mut Rng, e: u64, hot_ratio: u64) -> u64 {
    let people = people_before(e);
    let id = if rng.below(hot_ratio) > 0 {
        (people / 10) * 10
    } else {
        people.saturating_sub(1 + rng.below(ACTIVE_PEOPLE.min(people)))
    };
    FIRST_PERSON_ID + id
}

/// Generates events `first .. first + n` of `options.table`.
pub(crate) fn generate(
    options: &DatagenOptions,
    schema: SchemaRef,
    first: u64,
    n: u64,
    event_time_rate: u64,
) -> Result<RecordBatch, ArrowError> {
    let n_usize = n as usize;
    let table = options.table;
    let time = |i: u64| BASE_TIME_MS + (i as i64 * 1000) / event_time_rate.max(1) as i64;
    let mut ints: Vec<Int64Builder> = (0..5)
        .map(|_| Int64Builder::with_capacity(n_usize))
        .collect();
    let mut strs: Vec<StringBuilder> = (0..6)
        .map(|_| StringBuilder::with_capacity(n_usize, n_usize * 12))
        .collect();
    let mut times: Vec<TimestampMillisecondBuilder> = (0..2)
        .map(|_| TimestampMillisecondBuilder::with_capacity(n_usize).with_timezone(TIMESTAMP_TZ))
        .collect();
    let mut text = String::new();
    for i in first..first + n {
        let e = table.event_number(i);
        let mut rng = Rng::new(options.seed, e);
        let ts = time(i);
        match table {
            NexmarkTable::Bid => {
                let auctions = auctions_before(e).min(options.auctions.max(1));
                let auction = if rng.below(HOT_AUCTION_RATIO) > 0 {
                    (auctions / 10) * 10 % auctions.max(1)
                } else {
                    rng.below(auctions)
                };
                ints[0].append_value((FIRST_AUCTION_ID + auction) as i64);
                ints[1].append_value(pick_person(&mut rng, e, HOT_BIDDER_RATIO) as i64);
                // Prices are log-uniform-ish between 1 and ~10^6 cents.
                let price = 10_f64.powf(rng.below(6_000) as f64 / 1000.0) as i64;
                ints[2].append_value(price.max(1));
                let c = rng.below(10);
                let channel = if (c as usize) < CHANNELS.len() {
                    CHANNELS[c as usize].to_owned()
                } else {
                    format!("channel-{}", rng.below(10_000))
                };
                text.clear();
                text.push_str("https://www.nexmark.com/item.htm?query=1&channel_id=");
                text.push_str(itoa::Buffer::new().format(rng.below(1 << 20)));
                strs[0].append_value(&channel);
                strs[1].append_value(&text);
                times[0].append_value(ts);
                strs[2].append_value("");
            }
            NexmarkTable::Auction => {
                let id = FIRST_AUCTION_ID
                    + (e / PROPORTION_DENOMINATOR) * AUCTION_PROPORTION
                    + (i % AUCTION_PROPORTION);
                let initial = 100 + rng.below(10_000) as i64;
                ints[0].append_value(id as i64);
                strs[0].append_value(format!("item-{}", rng.below(100_000)));
                strs[1].append_value(format!("description of item {id}"));
                ints[1].append_value(initial);
                ints[2].append_value(initial + rng.below(5_000) as i64);
                times[0].append_value(ts);
                times[1].append_value(ts + 10_000 + rng.below(20_000) as i64);
                ints[3].append_value(pick_person(&mut rng, e, HOT_SELLER_RATIO) as i64);
                ints[4].append_value((FIRST_CATEGORY_ID + rng.below(5)) as i64);
                strs[2].append_value("");
            }
            NexmarkTable::Person => {
                let id = FIRST_PERSON_ID + e / PROPORTION_DENOMINATOR;
                let first_name = FIRST_NAMES[rng.below(FIRST_NAMES.len() as u64) as usize];
                let last_name = LAST_NAMES[rng.below(LAST_NAMES.len() as u64) as usize];
                ints[0].append_value(id as i64);
                strs[0].append_value(format!("{first_name} {last_name}"));
                strs[1].append_value(format!(
                    "{}@{}.com",
                    first_name.to_lowercase(),
                    rng.below(1000)
                ));
                strs[2].append_value(format!(
                    "{:04} {:04} {:04} {:04}",
                    rng.below(10_000),
                    rng.below(10_000),
                    rng.below(10_000),
                    rng.below(10_000)
                ));
                strs[3].append_value(CITIES[rng.below(CITIES.len() as u64) as usize]);
                strs[4].append_value(STATES[rng.below(STATES.len() as u64) as usize]);
                times[0].append_value(ts);
                strs[5].append_value("");
            }
        }
    }
    let mut int = |k: usize| -> ArrayRef { Arc::new(ints[k].finish()) };
    let ints_out: Vec<ArrayRef> = (0..5).map(&mut int).collect();
    let strs_out: Vec<ArrayRef> = strs
        .iter_mut()
        .map(|b| Arc::new(b.finish()) as ArrayRef)
        .collect();
    let times_out: Vec<ArrayRef> = times
        .iter_mut()
        .map(|b| Arc::new(b.finish()) as ArrayRef)
        .collect();
    let columns = match table {
        NexmarkTable::Bid => vec![
            ints_out[0].clone(),
            ints_out[1].clone(),
            ints_out[2].clone(),
            strs_out[0].clone(),
            strs_out[1].clone(),
            times_out[0].clone(),
            strs_out[2].clone(),
        ],
        NexmarkTable::Auction => vec![
            ints_out[0].clone(),
            strs_out[0].clone(),
            strs_out[1].clone(),
            ints_out[1].clone(),
            ints_out[2].clone(),
            times_out[0].clone(),
            times_out[1].clone(),
            ints_out[3].clone(),
            ints_out[4].clone(),
            strs_out[2].clone(),
        ],
        NexmarkTable::Person => vec![
            ints_out[0].clone(),
            strs_out[0].clone(),
            strs_out[1].clone(),
            strs_out[2].clone(),
            strs_out[3].clone(),
            strs_out[4].clone(),
            times_out[0].clone(),
            strs_out[5].clone(),
        ],
    };
    RecordBatch::try_new(schema, columns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datagen::{DatagenOptions, DatagenSource};
    use crate::{Source, SourcePoll};
    use std::time::Duration;

    fn drain(table: NexmarkTable, seed: u64, events: u64) -> Vec<RecordBatch> {
        let mut source = DatagenSource::new(DatagenOptions {
            name: "g".into(),
            table,
            events: Some(events),
            rate_per_s: None,
            seed,
            auctions: 10_000,
        });
        let mut out = Vec::new();
        loop {
            match source.poll(Duration::ZERO).unwrap() {
                SourcePoll::Batch(b) => out.push(b.batch),
                SourcePoll::Finished => return out,
                SourcePoll::Idle => {}
            }
        }
    }

    #[test]
    fn datagen_same_seed_gives_same_events() {
        for table in [
            NexmarkTable::Bid,
            NexmarkTable::Auction,
            NexmarkTable::Person,
        ] {
            let a = drain(table, 7, 5000);
            assert_eq!(a, drain(table, 7, 5000));
            assert_ne!(a, drain(table, 8, 5000));
            assert_eq!(a.iter().map(RecordBatch::num_rows).sum::<usize>(), 5000);
        }
    }

    #[test]
    fn datagen_bids_refer_to_existing_auctions() {
        let bids = drain(NexmarkTable::Bid, 1, 10_000);
        let last_auction =
            FIRST_AUCTION_ID + auctions_before(NexmarkTable::Bid.event_number(9_999));
        for b in &bids {
            let a = b
                .column(0)
                .as_any()
                .downcast_ref::<arrow::array::Int64Array>()
                .unwrap();
            assert!(
                a.values()
                    .iter()
                    .all(|&x| x >= FIRST_AUCTION_ID as i64 && (x as u64) < last_auction)
            );
        }
    }
}

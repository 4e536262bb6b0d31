//! Which topics a Kafka source reads, and the partition ids it gives the engine.
//!
//! The engine knows a source's partitions by one `i32` (for per-partition watermarks,
//! alignment pauses and metrics). A source of one topic uses the partitions' own ids. A
//! source of a `topic_pattern` reads partitions of many topics, so each `(topic,
//! partition)` gets a slot id, in the order they are discovered; the slots are saved with
//! the source's watermark in every commit entry and restored before the source resumes,
//! so a partition keeps its id, and its watermark, across restarts.

use std::collections::{BTreeMap, HashMap};

/// The topics a source reads.
#[derive(Debug, Clone)]
pub enum Topics {
    /// One topic.
    Name(String),
    /// Every topic whose whole name matches, but Kafka's internal `__` topics, found as
    /// they are created (metadata is refreshed every few seconds).
    Pattern(regex::Regex),
}

impl Topics {
    /// Whether the source reads `topic`.
    #[must_use]
    pub fn selects(&self, topic: &str) -> bool {
        match self {
            Self::Name(name) => name == topic,
            Self::Pattern(re) => !topic.starts_with("__") && re.is_match(topic),
        }
    }

    /// The topic, or the pattern, for messages.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Name(name) => name.clone(),
            Self::Pattern(re) => format!("pattern {}", re.as_str()),
        }
    }
}

/// `(topic, partition)` <-> slot id.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    /// Per topic, each partition's slot.
    by_topic: HashMap<String, Vec<Option<i32>>>,
    /// Per slot, its topic and partition.
    partitions: BTreeMap<i32, (String, i32)>,
    /// Slot ids are the partition ids (a source of one topic).
    single: bool,
}

impl Slots {
    pub fn new(topics: &Topics) -> Self {
        Self {
            single: matches!(topics, Topics::Name(_)),
            ..Self::default()
        }
    }

    /// The slot of a known partition.
    pub fn get(&self, topic: &str, partition: i32) -> Option<i32> {
        if self.single {
            return Some(partition);
        }
        let slots = self.by_topic.get(topic)?;
        usize::try_from(partition)
            .ok()
            .and_then(|p| slots.get(p).copied().flatten())
    }

    /// The slot of a partition, given one if it has none.
    pub fn assign(&mut self, topic: &str, partition: i32) -> i32 {
        if let Some(slot) = self.get(topic, partition)
            && self.partitions.contains_key(&slot)
        {
            return slot;
        }
        let slot = if self.single {
            partition
        } else {
            self.partitions.keys().next_back().map_or(0, |s| s + 1)
        };
        self.bind(topic, partition, slot);
        slot
    }

    fn bind(&mut self, topic: &str, partition: i32, slot: i32) {
        let Ok(p) = usize::try_from(partition) else {
            return;
        };
        let slots = self.by_topic.entry(topic.to_owned()).or_default();
        if slots.len() <= p {
            slots.resize(p + 1, None);
        }
        slots[p] = Some(slot);
        self.partitions.insert(slot, (topic.to_owned(), partition));
    }

    /// The topic and partition of a slot.
    pub fn partition(&self, slot: i32) -> Option<&(String, i32)> {
        self.partitions.get(&slot)
    }

    /// Every `(topic, partition, slot)`, to save (empty for a source of one topic: its
    /// slots are its partitions).
    pub fn list(&self) -> Vec<(String, i32, i32)> {
        if self.single {
            return Vec::new();
        }
        self.partitions
            .iter()
            .map(|(&slot, (t, p))| (t.clone(), *p, slot))
            .collect()
    }

    /// Takes saved slots back (before any is assigned).
    pub fn restore(&mut self, saved: &[(String, i32, i32)]) {
        if self.single {
            return;
        }
        for (topic, partition, slot) in saved {
            self.bind(topic, *partition, *slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_slots_survive_a_restore_and_new_ones_follow() {
        let topics = Topics::Pattern(regex::Regex::new("^(?:orders-.*)$").unwrap());
        assert!(
            topics.selects("orders-eu")
                && !topics.selects("payments")
                && !topics.selects("__orders-x")
        );
        let mut a = Slots::new(&topics);
        assert_eq!(a.assign("orders-eu", 1), 0);
        assert_eq!(a.assign("orders-us", 0), 1);
        assert_eq!(a.assign("orders-eu", 0), 2);
        assert_eq!(a.assign("orders-eu", 1), 0);
        let mut b = Slots::new(&topics);
        b.restore(&a.list());
        // Discovered in another order after the restart: same slots.
        assert_eq!(b.assign("orders-eu", 0), 2);
        assert_eq!(b.assign("orders-us", 0), 1);
        assert_eq!(b.assign("orders-ap", 0), 3);
        assert_eq!(b.partition(3), Some(&("orders-ap".to_owned(), 0)));
        let single = Slots::new(&Topics::Name("t".into()));
        assert_eq!(single.get("t", 7), Some(7));
        assert!(single.list().is_empty());
    }
}

//! Deterministic partition assignment over every worker of every process.

/// One partition of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> TopicPartition {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// The partitions worker `index` of `peers` owns, given each topic's partition
/// count. Partitions are listed topic by topic (in the order given) and dealt
/// round-robin, so every worker computes the same disjoint cover from the
/// same metadata, and each topic's partitions spread across workers.
pub fn assign(topics: &[(String, i32)], index: usize, peers: usize) -> Vec<TopicPartition> {
    let peers = peers.max(1);
    let mut owned = Vec::new();
    let mut global = 0usize;
    for (topic, count) in topics {
        for partition in 0..*count {
            if global % peers == index {
                owned.push(TopicPartition::new(topic.clone(), partition));
            }
            global += 1;
        }
    }
    owned
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_partition_has_exactly_one_owner() {
        let topics = vec![
            ("a".to_owned(), 4),
            ("b".to_owned(), 3),
            ("c".to_owned(), 1),
        ];
        for peers in 1..=5 {
            let mut all: Vec<_> = (0..peers).flat_map(|w| assign(&topics, w, peers)).collect();
            all.sort();
            let before = all.len();
            all.dedup();
            assert_eq!(all.len(), before);
            assert_eq!(all.len(), 8, "peers {peers}");
        }
    }

    #[test]
    fn topics_spread_across_workers() {
        let topics = vec![("a".to_owned(), 2), ("b".to_owned(), 2)];
        assert_eq!(
            assign(&topics, 0, 2),
            vec![TopicPartition::new("a", 0), TopicPartition::new("b", 0)]
        );
        assert_eq!(
            assign(&topics, 1, 2),
            vec![TopicPartition::new("a", 1), TopicPartition::new("b", 1)]
        );
    }
}

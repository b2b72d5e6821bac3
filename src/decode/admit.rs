//! The service cardinality cap. Consumes the service name of each valid
//! event with its source partition; produces admit or refuse: each source
//! partition admits at most `validation.max_services` distinct services, in
//! order of first appearance, and refuses the rest (they become dead letters
//! with reason `cardinality`). A partition decides alone, so its decisions
//! depend only on its own records in offset order: a replay after a crash,
//! starting from the admitted set saved in the partition's checkpoint,
//! decides every record as before (the set only grows, and once full it
//! stays full). The sets are also published in a shared map for those
//! checkpoints. Pure: no I/O.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Per source partition, the services admitted so far (shared with the
/// core stage, which saves them in each partition's checkpoint).
pub type AdmittedServices = Arc<Mutex<BTreeMap<i32, Vec<String>>>>;

type Set = HashSet<Box<str>, foldhash::fast::FixedState>;

/// Admission of services per partition, up to a cap.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    sets: HashMap<i32, Set, foldhash::fast::FixedState>,
    shared: AdmittedServices,
}

impl Admission {
    /// `max` = 0 admits everything.
    pub fn new(max: usize, shared: AdmittedServices) -> Self {
        Admission {
            max,
            sets: HashMap::default(),
            shared,
        }
    }

    /// Starts partition `p` from the services a checkpoint admitted
    /// (nothing: a partition read from its beginning).
    pub fn seed(&mut self, p: i32, services: &[String]) {
        let set: Set = services.iter().map(|s| s.as_str().into()).collect();
        self.sets.insert(p, set);
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p, services.to_vec());
    }

    /// Whether partition `p` admits `service` (admitting it if there is room).
    #[inline]
    pub fn admit(&mut self, p: i32, service: &str) -> bool {
        if self.max == 0 {
            return true;
        }
        let set = self.sets.entry(p).or_default();
        if set.contains(service) {
            return true;
        }
        if set.len() >= self.max {
            return false;
        }
        set.insert(service.into());
        self.shared
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(p)
            .or_default()
            .push(service.to_string());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_partition_admits_its_first_services_up_to_the_cap() {
        let shared = AdmittedServices::default();
        let mut a = Admission::new(2, shared.clone());
        assert!(a.admit(0, "a"));
        assert!(a.admit(0, "b"));
        assert!(!a.admit(0, "c"), "over the cap");
        assert!(a.admit(0, "a"), "admitted ones stay admitted");
        assert!(a.admit(1, "c"), "partitions decide alone");
        assert_eq!(shared.lock().unwrap()[&0], ["a", "b"]);
        assert_eq!(shared.lock().unwrap()[&1], ["c"]);
        let mut open = Admission::new(0, AdmittedServices::default());
        assert!((0..10_000).all(|i| open.admit(0, &i.to_string())));
    }

    #[test]
    fn a_replay_from_a_later_snapshot_decides_every_record_as_before() {
        let stream: Vec<(i64, String)> = (0..200)
            .map(|i| (i, format!("s{}", (i * 7919) % 13)))
            .collect();
        let shared = AdmittedServices::default();
        let mut first = Admission::new(5, shared.clone());
        let mut decided = Vec::new();
        let mut snapshot_at_120 = Vec::new();
        for (off, s) in &stream {
            decided.push(first.admit(3, s));
            if *off == 120 {
                snapshot_at_120 = shared.lock().unwrap()[&3].clone();
            }
        }
        // The checkpoint was at offset 40, its set read at 120: replay from 40.
        let mut replay = Admission::new(5, AdmittedServices::default());
        replay.seed(3, &snapshot_at_120);
        for (off, s) in stream.iter().skip(40) {
            assert_eq!(replay.admit(3, s), decided[*off as usize], "offset {off}");
        }
    }
}

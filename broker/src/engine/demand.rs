//! Allotment mode: every slave's demand for free seats, per agent type and in total, kept
//! with each change of a block or a demand so that sizing an allot answer never passes
//! over the slaves. A slave's demand of a type is what it last asked for, or the block it
//! holds if more (`allot::demand`); its total demand is the sum over its types.
//!
//! Besides the sums (the fast path: every demand fits), the book keeps how many slaves
//! demand each amount, so the max-min fair level (water-filling) costs one pass over the
//! distinct amounts, not over the slaves: a slave asking for a huge block is one more
//! amount, and wants are capped when recorded (`Engine::set_wants`).

use std::collections::{BTreeMap, BTreeSet};

use lmbus_schemas::SlaveId;

/// The demand of every slave, for one agent type or in total.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Demands {
    /// Sum over all slaves.
    sum: u64,
    /// Demand → how many slaves have it (demands of zero are left out).
    counts: BTreeMap<u64, u32>,
    /// Slaves with a demand: the sum of `counts`.
    slaves: u32,
}

impl Demands {
    fn moved(&mut self, before: u64, after: u64) {
        if before == after {
            return;
        }
        self.sum = self.sum.saturating_sub(before).saturating_add(after);
        if before > 0
            && let Some(n) = self.counts.get_mut(&before)
        {
            *n -= 1;
            self.slaves = self.slaves.saturating_sub(1);
            if *n == 0 {
                self.counts.remove(&before);
            }
        }
        if after > 0 {
            *self.counts.entry(after).or_insert(0) += 1;
            self.slaves += 1;
        }
    }

    fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Slaves with a demand (of this type, or of any).
    pub(super) fn slaves(&self) -> u32 {
        self.slaves
    }

    /// The max-min fair level of `pool` among these demands: every demand at or below it
    /// is met in full and the rest get the level, `pool` split as evenly as whole seats
    /// allow (fewer than one seat per slave may stay unassigned). `u32::MAX` when the
    /// demands add up to no more than the pool.
    pub(super) fn level(&self, pool: u32) -> u32 {
        if self.sum <= u64::from(pool) {
            return u32::MAX;
        }
        water_level(pool, self.slaves, self.counts.iter().map(|(d, n)| (*d, *n)))
    }
}

/// Water-filling over `(demand, how many slaves)` in ascending order of demand, `slaves`
/// demands in all, none of them zero. A group of equal demands is met whole or not at
/// all: if `d ≤ left / unmet` then after one of them `left - d ≥ d·(unmet - 1)`, so the
/// next one is met too.
fn water_level(pool: u32, slaves: u32, ascending: impl IntoIterator<Item = (u64, u32)>) -> u32 {
    let mut left = u64::from(pool);
    let mut unmet = u64::from(slaves);
    for (d, n) in ascending {
        if unmet == 0 {
            break;
        }
        if d > left / unmet {
            return u32::try_from(left / unmet).unwrap_or(u32::MAX);
        }
        left = left.saturating_sub(d.saturating_mul(u64::from(n)));
        unmet = unmet.saturating_sub(u64::from(n));
    }
    u32::MAX
}

/// The demands of all slaves, per agent type and in total.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct DemandBook {
    by_type: BTreeMap<String, Demands>,
    total: Demands,
}

impl DemandBook {
    /// One slave's demand of `agent_type` went from `before` to `after`.
    pub(super) fn moved(&mut self, agent_type: &str, before: u64, after: u64) {
        if before == after {
            return;
        }
        let d = self.by_type.entry(agent_type.to_owned()).or_default();
        d.moved(before, after);
        if d.is_empty() {
            self.by_type.remove(agent_type);
        }
    }

    /// One slave's total demand went from `before` to `after`.
    pub(super) fn moved_total(&mut self, before: u64, after: u64) {
        self.total.moved(before, after);
    }

    /// The demands of `agent_type` (`None`: in total).
    pub(super) fn of(&self, agent_type: Option<&str>) -> Option<&Demands> {
        match agent_type {
            Some(t) => self.by_type.get(t),
            None => Some(&self.total),
        }
    }

    /// Counted from scratch: each slave's demand per type.
    pub(super) fn recount<'a>(
        slaves: impl IntoIterator<Item = BTreeMap<&'a str, u64>>,
    ) -> DemandBook {
        let mut book = DemandBook::default();
        for per_type in slaves {
            let mut total = 0u64;
            for (t, d) in per_type {
                book.moved(t, 0, d);
                total += d;
            }
            book.moved_total(0, total);
        }
        book
    }
}

/// Slaves by the seats they hold in blocks (seats → the slaves holding that many).
type BySize = BTreeMap<u64, BTreeSet<SlaveId>>;

fn resize(set: &mut BySize, id: &SlaveId, before: u64, after: u64) {
    if before == after {
        return;
    }
    if before > 0
        && let Some(ids) = set.get_mut(&before)
    {
        ids.remove(id);
        if ids.is_empty() {
            set.remove(&before);
        }
    }
    if after > 0 {
        set.entry(after).or_default().insert(id.clone());
    }
}

fn above(set: &BySize, seats: u64) -> impl Iterator<Item = &SlaveId> {
    set.range(seats.saturating_add(1)..)
        .flat_map(|(_, ids)| ids)
}

/// The slaves holding free seats in blocks, by block size, per agent type and in total:
/// the holders above a fair share are a range, not a pass over the slaves.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct Holders {
    by_type: BTreeMap<String, BySize>,
    total: BySize,
}

impl Holders {
    /// `id`'s block of `agent_type` went from `before` to `after` seats.
    pub(super) fn moved(&mut self, id: &SlaveId, agent_type: &str, before: u32, after: u32) {
        if before == after {
            return;
        }
        let set = self.by_type.entry(agent_type.to_owned()).or_default();
        resize(set, id, u64::from(before), u64::from(after));
        if set.is_empty() {
            self.by_type.remove(agent_type);
        }
    }

    /// `id`'s blocks of all types went from `before` to `after` seats.
    pub(super) fn moved_total(&mut self, id: &SlaveId, before: u64, after: u64) {
        resize(&mut self.total, id, before, after);
    }

    /// Slaves whose block of `agent_type` holds more than `seats`.
    pub(super) fn above(&self, agent_type: &str, seats: u32) -> Vec<SlaveId> {
        self.by_type
            .get(agent_type)
            .map(|set| above(set, u64::from(seats)).cloned().collect())
            .unwrap_or_default()
    }

    /// Slaves whose blocks add up to more than `seats` (0: every holder).
    pub(super) fn above_total(&self, seats: u64) -> impl Iterator<Item = &SlaveId> {
        above(&self.total, seats)
    }

    /// Counted from scratch: each slave's blocks.
    pub(super) fn recount<'a>(
        slaves: impl IntoIterator<Item = (&'a SlaveId, &'a BTreeMap<String, u32>)>,
    ) -> Holders {
        let mut holders = Holders::default();
        for (id, blocks) in slaves {
            let mut total = 0u64;
            for (t, n) in blocks {
                holders.moved(id, t, 0, *n);
                total += u64::from(*n);
            }
            holders.moved_total(id, 0, total);
        }
        holders
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(pool: u32, demands: &[u64]) -> u32 {
        let mut d = Demands::default();
        for x in demands {
            d.moved(0, *x);
        }
        d.level(pool)
    }

    #[test]
    fn the_fair_level_is_max_min_fair() {
        assert_eq!(level(20, &[14, 2, 14]), 9);
        assert_eq!(level(20, &[2, 14]), u32::MAX, "both fit");
        assert_eq!(level(20, &[10, 10]), u32::MAX, "exactly fits");
        assert_eq!(level(7, &[5, 5]), 3, "an odd seat stays unassigned");
        assert_eq!(level(0, &[1]), 0);
        assert_eq!(level(10, &[]), u32::MAX);
        assert_eq!(level(10, &[0, 0, 30]), 10);
        // Equal demands in one group, met whole or not at all.
        assert_eq!(level(30, &[5, 5, 5, 40, 40]), 7);
        assert_eq!(level(30, &[5, 5, 5, 6, 40]), 9);
        assert_eq!(level(12, &[4, 4, 4, 4]), 3);
        // One huge demand is one more amount.
        assert_eq!(level(100, &[u64::from(u32::MAX), 10, 10]), 80);
    }

    #[test]
    fn a_group_of_equal_demands_gives_what_one_by_one_gives() {
        // Water-filling one slave at a time, for comparison.
        fn one_by_one(pool: u32, mut demands: Vec<u64>) -> u32 {
            demands.retain(|d| *d > 0);
            demands.sort_unstable();
            let mut left = u64::from(pool);
            let mut unmet = demands.len() as u64;
            for d in demands {
                if d > left / unmet {
                    return u32::try_from(left / unmet).unwrap_or(u32::MAX);
                }
                left -= d;
                unmet -= 1;
            }
            u32::MAX
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut next = || {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed
            };
            let n = (next() % 12) as usize;
            let demands: Vec<u64> = (0..n).map(|_| next() % 9).collect();
            let pool = (next() % 40) as u32;
            assert_eq!(
                level(pool, &demands),
                one_by_one(pool, demands.clone()),
                "pool {pool}, demands {demands:?}"
            );
        }
    }

    #[test]
    fn moves_keep_the_counts() {
        let mut d = Demands::default();
        d.moved(0, 3);
        d.moved(0, 3);
        d.moved(3, 5);
        assert_eq!(d.slaves(), 2);
        assert_eq!(d.sum, 8);
        d.moved(3, 0);
        d.moved(5, 0);
        assert!(d.is_empty());
        assert_eq!(d.slaves(), 0);
        assert_eq!(d.sum, 0);
    }
}

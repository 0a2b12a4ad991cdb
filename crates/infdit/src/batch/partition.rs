//! The partition of a batch into shards: balanced by work, deterministic, and stable when files
//! are added.
//!
//! Every file carries its work (block evaluations: pixels x passes, [`crate::upscale::ImagePlan::work`]).
//! A first run places the files by longest-processing-time-first greedy (LPT): files by decreasing
//! work (ties broken by a hash of the name, then the name), each onto the shard with the least work
//! so far (ties: the lowest index). Greedy list scheduling bounds the largest shard by
//! `total / N + largest file`, whatever the sizes, where a partition by file count can put all the
//! large files on one shard.
//!
//! The partition is saved in the output tree ([`super::layout::BatchDir::partition_path`]), and a
//! later run over the same output with the same shard count keeps every file that the saved one
//! places where it was; only files it does not know are placed, by the same greedy among
//! themselves (their own work balanced, which is what the re-run has to do). So adding files never
//! moves a file, and a re-run recomputes only what is new (or failed). Every worker of a run
//! computes the partition from the same file list and the same saved partition, so they agree
//! without talking to each other; the first to finish writes it (atomically), and a worker that
//! starts later and reads that one gets the same assignment back, since it already places every
//! file.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{InfditError, Result};
use crate::hash::Fnv;

/// One file to place: its canonical relative name (its output below the output folder) and its work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkItem {
    /// The output's path relative to the output folder, `/`-separated.
    pub name: String,
    /// The input file, as given (for listings).
    pub input: String,
    /// Block evaluations (0 for a file that cannot run).
    pub work: u64,
}

/// Where one file goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assigned {
    /// Its shard.
    pub shard: usize,
    /// Its work.
    pub work: u64,
    /// The input file, as given.
    pub input: String,
}

/// The assignment of every file of a batch to a shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partition {
    /// Format version.
    pub version: u32,
    /// Shards in all.
    pub shards: usize,
    /// File name -> its shard.
    pub files: BTreeMap<String, Assigned>,
    /// The command line that made the run and its working folder, so that a retry can run it again.
    #[serde(default)]
    pub command: Vec<String>,
    /// The working folder of `command`.
    #[serde(default)]
    pub cwd: String,
}

const VERSION: u32 = 1;

fn name_hash(name: &str) -> u64 {
    let mut h = Fnv::default();
    h.bytes(name.as_bytes());
    h.finish()
}

/// LPT greedy of `items` onto `shards` shards (see the module docs).
fn greedy<'a>(items: impl IntoIterator<Item = &'a WorkItem>, shards: usize) -> Vec<(&'a WorkItem, usize)> {
    let mut order: Vec<&WorkItem> = items.into_iter().collect();
    order.sort_by(|a, b| {
        b.work.cmp(&a.work).then(name_hash(&a.name).cmp(&name_hash(&b.name))).then(a.name.cmp(&b.name))
    });
    let mut load = vec![0u64; shards.max(1)];
    order
        .into_iter()
        .map(|it| {
            let (s, _) = load.iter().enumerate().min_by_key(|&(i, l)| (*l, i)).unwrap_or((0, &0));
            load[s] += it.work;
            (it, s)
        })
        .collect()
}

impl Partition {
    /// The partition of `items` onto `shards` shards, keeping the places of `previous` (a saved
    /// partition with the same shard count) for the files it knows. Files named twice count once.
    pub fn new(items: &[WorkItem], shards: usize, previous: Option<&Partition>) -> Self {
        let shards = shards.max(1);
        let previous = previous.filter(|p| p.shards == shards);
        let mut seen = HashSet::new();
        let items: Vec<&WorkItem> = items.iter().filter(|it| seen.insert(it.name.as_str())).collect();
        let mut files = BTreeMap::new();
        let mut new = Vec::new();
        for it in items {
            match previous.and_then(|p| p.files.get(&it.name)).filter(|a| a.shard < shards) {
                Some(a) => {
                    files.insert(it.name.clone(), Assigned { shard: a.shard, work: it.work, input: it.input.clone() });
                }
                None => new.push(it),
            }
        }
        for (it, s) in greedy(new, shards) {
            files.insert(it.name.clone(), Assigned { shard: s, work: it.work, input: it.input.clone() });
        }
        Self { version: VERSION, shards, files, command: Vec::new(), cwd: String::new() }
    }

    /// The names of shard `shard`'s files.
    pub fn of_shard(&self, shard: usize) -> impl Iterator<Item = &str> {
        self.files.iter().filter(move |(_, a)| a.shard == shard).map(|(n, _)| n.as_str())
    }

    /// Whether `name` belongs to shard `shard`.
    pub fn owns(&self, shard: usize, name: &str) -> bool {
        self.files.get(name).is_some_and(|a| a.shard == shard)
    }

    /// The work of each shard.
    pub fn loads(&self) -> Vec<u64> {
        let mut l = vec![0u64; self.shards];
        for a in self.files.values() {
            if let Some(x) = l.get_mut(a.shard) {
                *x += a.work;
            }
        }
        l
    }

    /// Whether `other` places the same files on the same shards (ignoring the command).
    pub fn same_assignment(&self, other: &Partition) -> bool {
        self.shards == other.shards && self.files == other.files
    }

    /// Reads a saved partition; `None` when there is none.
    pub fn load(path: &Path) -> Result<Option<Self>> {
        let text = match crate::files::read_small_text(path, 1 << 30) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(InfditError::io(path, e)),
        };
        let p: Self = serde_json::from_str(&text)
            .map_err(|e| InfditError::Config(format!("{}: not a batch partition: {e}", path.display())))?;
        if p.version != VERSION {
            return Err(InfditError::Config(format!(
                "{}: batch partition version {} (this infdit reads {VERSION})",
                path.display(),
                p.version
            )));
        }
        Ok(Some(p))
    }

    /// Writes the partition atomically (its folder is created).
    pub fn save(&self, path: &Path) -> Result<()> {
        super::layout::write_json_atomic(path, self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random sizes: a mix of small and a few large images.
    fn items(n: usize, seed: u64) -> Vec<WorkItem> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|i| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let r = x >> 33;
                // Areas from 1 to 64 blocks, and every 17th file 20x larger.
                let mut work = 39 * (1 + r % 64);
                if i % 17 == 0 {
                    work *= 20;
                }
                WorkItem { name: format!("dir{}/img{i:05}.png", i % 7), input: format!("in/img{i:05}.png"), work }
            })
            .collect()
    }

    #[test]
    fn balanced_by_work_within_the_greedy_bound() {
        for (n, shards, seed) in [(8, 4, 1), (100, 4, 2), (1000, 8, 3), (5000, 16, 4), (3, 8, 5)] {
            let it = items(n, seed);
            let p = Partition::new(&it, shards, None);
            let loads = p.loads();
            let total: u64 = it.iter().map(|i| i.work).sum();
            let largest = it.iter().map(|i| i.work).max().unwrap();
            let max = *loads.iter().max().unwrap();
            assert_eq!(loads.iter().sum::<u64>(), total);
            assert!(max <= total / shards as u64 + largest, "{n} files on {shards}: {loads:?}");
            // With many files the shards are within a few per cent of each other.
            if n >= 1000 {
                let min = *loads.iter().min().unwrap();
                assert!((max - min) as f64 / max as f64 <= 0.01, "{loads:?}");
            }
        }
    }

    #[test]
    fn better_than_splitting_by_file_count() {
        // Two huge files and many small ones: by count (round robin) both huge ones can land on
        // one shard; by work they do not.
        let mut it: Vec<WorkItem> =
            (0..8).map(|i| WorkItem { name: format!("s{i}.png"), input: String::new(), work: 10 }).collect();
        it.insert(0, WorkItem { name: "big0.png".into(), input: String::new(), work: 1000 });
        it.insert(2, WorkItem { name: "big1.png".into(), input: String::new(), work: 1000 });
        let p = Partition::new(&it, 2, None);
        assert_ne!(p.files["big0.png"].shard, p.files["big1.png"].shard);
        assert_eq!(p.loads(), vec![1040, 1040]);
    }

    #[test]
    fn deterministic_whatever_the_listing_order() {
        let it = items(500, 7);
        let mut rev = it.clone();
        rev.reverse();
        assert_eq!(Partition::new(&it, 6, None), Partition::new(&rev, 6, None));
    }

    #[test]
    fn adding_files_moves_no_file_and_balances_the_new_work() {
        let it = items(1000, 11);
        let first = Partition::new(&it, 8, None);
        let mut more = it.clone();
        let added = items(1200, 99).split_off(1000);
        let added: Vec<WorkItem> = added
            .into_iter()
            .map(|mut w| {
                w.name = format!("new/{}", w.name);
                w
            })
            .collect();
        more.extend(added.iter().cloned());
        // One file removed, too.
        more.retain(|w| w.name != it[5].name);
        let second = Partition::new(&more, 8, Some(&first));
        for (name, a) in &first.files {
            if name != &it[5].name {
                assert_eq!(second.files[name].shard, a.shard, "{name} moved");
            }
        }
        assert!(!second.files.contains_key(&it[5].name));
        // The new files' own work is balanced (the re-run's work).
        let mut new_load = vec![0u64; 8];
        for w in &added {
            new_load[second.files[&w.name].shard] += w.work;
        }
        let total: u64 = added.iter().map(|w| w.work).sum();
        let largest = added.iter().map(|w| w.work).max().unwrap();
        assert!(*new_load.iter().max().unwrap() <= total / 8 + largest, "{new_load:?}");
        // The same again is a fixed point: every worker of the re-run agrees.
        assert!(Partition::new(&more, 8, Some(&second)).same_assignment(&second));
    }

    #[test]
    fn another_shard_count_starts_afresh() {
        let it = items(200, 5);
        let four = Partition::new(&it, 4, None);
        let eight = Partition::new(&it, 8, Some(&four));
        assert_eq!(eight, Partition::new(&it, 8, None));
        assert_eq!(eight.loads().len(), 8);
    }

    #[test]
    fn saved_and_loaded() {
        let dir = std::env::temp_dir().join(format!("infdit-partition-{}", std::process::id()));
        let path = dir.join(".infdit/partition.json");
        assert_eq!(Partition::load(&path).unwrap(), None);
        let mut p = Partition::new(&items(20, 3), 3, None);
        p.command = vec!["infdit".into(), "upscale".into()];
        p.save(&path).unwrap();
        assert_eq!(Partition::load(&path).unwrap(), Some(p));
        std::fs::write(&path, "{").unwrap();
        assert!(Partition::load(&path).unwrap_err().to_string().contains("not a batch partition"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

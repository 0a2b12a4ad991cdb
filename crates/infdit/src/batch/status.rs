//! The state of a sharded batch across all its shards, from the saved partition and the per-file
//! records alone (no input is opened): what is done, failed or missing, by shard, and which files
//! a retry must run.

use super::layout::BatchDir;
use super::partition::Partition;
use super::record::{FileRecord, Outcome};
use crate::error::{InfditError, Result};

/// Where one file of the batch stands.
#[derive(Debug, Clone, PartialEq)]
pub enum FileState {
    /// Its record says done and its output exists.
    Done,
    /// Its last attempt failed, with this error.
    Failed(String),
    /// Not done: no record yet, an interrupted attempt (its checkpoint waits), a damaged record,
    /// or a done record whose output has gone.
    Missing(&'static str),
}

/// One file of the batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Its name (the output below the output folder).
    pub name: String,
    /// Its input, as given.
    pub input: String,
    /// Its shard.
    pub shard: usize,
    /// Its work.
    pub work: u64,
    /// Where it stands.
    pub state: FileState,
    /// Its record, if it has a readable one.
    pub record: Option<FileRecord>,
}

/// The counts of one shard (or of the batch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Files done.
    pub done: usize,
    /// Files whose last attempt failed.
    pub failed: usize,
    /// Files not done yet.
    pub missing: usize,
    /// Work of the files done.
    pub work_done: u64,
    /// Work of all the files.
    pub work_total: u64,
}

impl Counts {
    fn add(&mut self, e: &Entry) {
        match e.state {
            FileState::Done => {
                self.done += 1;
                self.work_done += e.work;
            }
            FileState::Failed(_) => self.failed += 1,
            FileState::Missing(_) => self.missing += 1,
        }
        self.work_total += e.work;
    }
    /// Files in all.
    pub fn files(&self) -> usize {
        self.done + self.failed + self.missing
    }
}

/// A batch's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// The partition the batch runs by.
    pub partition: Partition,
    /// Every file, by name.
    pub entries: Vec<Entry>,
    /// The whole batch.
    pub total: Counts,
    /// Each shard.
    pub shards: Vec<Counts>,
}

impl Summary {
    /// The state of the batch writing below `dir`.
    pub fn read(dir: &BatchDir) -> Result<Self> {
        let Some(partition) = Partition::load(&dir.partition_path())? else {
            return Err(InfditError::Config(format!(
                "{}: no sharded batch here (no {}); run `infdit upscale ... -o {} --shard K/N` first",
                dir.root.display(),
                dir.partition_path().display(),
                dir.root.display()
            )));
        };
        let mut entries = Vec::with_capacity(partition.files.len());
        for (name, a) in &partition.files {
            let (state, record) = match FileRecord::read(dir, name) {
                Ok(Some(r)) => (
                    match r.outcome {
                        Outcome::Done if dir.root.join(name).is_file() => FileState::Done,
                        Outcome::Done => FileState::Missing("its record says done but the output is gone"),
                        Outcome::Failed => FileState::Failed(r.error.clone().unwrap_or_default()),
                        Outcome::Interrupted => FileState::Missing("interrupted; its checkpoint waits"),
                    },
                    Some(r),
                ),
                Ok(None) => (FileState::Missing("not run yet"), None),
                Err(_) => (FileState::Missing("its record is damaged"), None),
            };
            entries.push(Entry {
                name: name.clone(),
                input: a.input.clone(),
                shard: a.shard,
                work: a.work,
                state,
                record,
            });
        }
        let mut total = Counts::default();
        let mut shards = vec![Counts::default(); partition.shards];
        for e in &entries {
            total.add(e);
            if let Some(s) = shards.get_mut(e.shard) {
                s.add(e);
            }
        }
        Ok(Self { partition, entries, total, shards })
    }

    /// The files a retry runs: the failed and the missing ones, by name.
    pub fn to_retry(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.state != FileState::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::super::partition::WorkItem;
    use super::*;

    fn record(name: &str, outcome: Outcome, error: Option<&str>) -> FileRecord {
        FileRecord {
            name: name.into(),
            input: format!("in/{name}"),
            outcome,
            error: error.map(String::from),
            shard: "0/2".into(),
            host: "h".into(),
            pid: 1,
            finished_unix: 0,
            elapsed_s: 0.5,
            work: 10,
        }
    }

    #[test]
    fn done_failed_missing_by_shard_and_the_retry_list() {
        let root = std::env::temp_dir().join(format!("infdit-status-{}", std::process::id()));
        let dir = BatchDir::new(&root);
        assert!(Summary::read(&dir).unwrap_err().to_string().contains("no sharded batch here"));
        let names = ["a.png", "b.png", "c.png", "d.png", "sub/e.png"];
        let items: Vec<WorkItem> = names
            .iter()
            .enumerate()
            .map(|(i, n)| WorkItem { name: n.to_string(), input: format!("in/{n}"), work: 10 * (i as u64 + 1) })
            .collect();
        let p = Partition::new(&items, 2, None);
        p.save(&dir.partition_path()).unwrap();
        // a: done with its output; b: failed; c: done but its output is gone; d: interrupted; e: nothing.
        std::fs::write(root.join("a.png"), b"x").unwrap();
        record("a.png", Outcome::Done, None).write(&dir).unwrap();
        record("b.png", Outcome::Failed, Some("in/b.png: not an image")).write(&dir).unwrap();
        record("c.png", Outcome::Done, None).write(&dir).unwrap();
        record("d.png", Outcome::Interrupted, None).write(&dir).unwrap();
        let s = Summary::read(&dir).unwrap();
        assert_eq!((s.total.done, s.total.failed, s.total.missing), (1, 1, 3));
        assert_eq!(s.total.work_total, 150);
        assert_eq!(s.total.work_done, 10);
        assert_eq!(s.shards.len(), 2);
        assert_eq!(s.shards.iter().map(|c| c.files()).sum::<usize>(), 5);
        for (k, c) in s.shards.iter().enumerate() {
            assert_eq!(c.files(), p.of_shard(k).count());
        }
        let retry: Vec<&str> = s.to_retry().map(|e| e.name.as_str()).collect();
        assert_eq!(retry, ["b.png", "c.png", "d.png", "sub/e.png"]);
        let b = s.entries.iter().find(|e| e.name == "b.png").unwrap();
        assert_eq!(b.state, FileState::Failed("in/b.png: not an image".into()));
        std::fs::remove_dir_all(&root).unwrap();
    }
}

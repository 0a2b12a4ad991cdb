//! Batches beyond one machine (docs/scale-out.md): a batch split into shards that workers of a
//! batch engine (a Slurm job array, a Kubernetes Indexed Job) run independently over a shared
//! output tree.
//!
//! * [`shard`]: which shard a worker is, given as `K/N` or read from the engine's environment;
//! * [`partition`]: the files of each shard, balanced by work, deterministic and stable when
//!   files are added;
//! * [`record`]: each file's outcome (done, failed with the error, interrupted), where and when;
//! * [`status`]: the batch's state across all shards and the files a retry must run;
//! * [`wavefront`]: one huge image over several devices, simulated: the UniBA block dependency
//!   graph of one network evaluation replayed as a wavefront.
//!
//! The bookkeeping lives below the output folder, in `OUT/.infdit/` ([`layout::BatchDir`]).

pub mod layout;
pub mod partition;
pub mod record;
pub mod shard;
pub mod status;
pub mod wavefront;

pub use layout::BatchDir;
pub use partition::{Partition, WorkItem};
pub use record::{FileRecord, Outcome};
pub use shard::{Shard, ShardSpec, parse_shard, shard_from_env};
pub use status::{Counts, Entry, FileState, Summary};

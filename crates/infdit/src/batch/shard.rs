//! Which shard of a batch this worker is: `K/N` given by the user, or read from the environment a
//! batch engine gives its tasks (a Slurm job array, a Kubernetes Indexed Job).

use std::collections::HashMap;
use std::fmt;

/// One shard of a batch: index `index` (from 0) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This worker's shard, `0..count`.
    pub index: usize,
    /// Shards in all.
    pub count: usize,
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The most shards a batch may have (a guard against a mistyped count).
pub const MAX_SHARDS: usize = 1 << 20;

/// The environment variable a Kubernetes Indexed Job manifest sets to the Job's `completions`, so
/// that a pod knows the shard count (Kubernetes gives a pod its index only).
pub const K8S_COUNT_VAR: &str = "INFDIT_SHARD_COUNT";

/// How the shard is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardSpec {
    /// Given as `K/N`.
    Fixed(Shard),
    /// Read from the batch engine's environment ([`shard_from_env`]).
    Auto,
}

impl Shard {
    /// A shard, checked: `count` in `1..=MAX_SHARDS` and `index < count`.
    pub fn new(index: usize, count: usize) -> Result<Self, String> {
        if count == 0 {
            return Err(format!("shard {index}/{count}: the shard count must be at least 1"));
        }
        if count > MAX_SHARDS {
            return Err(format!("shard {index}/{count}: at most {MAX_SHARDS} shards"));
        }
        if index >= count {
            return Err(format!(
                "shard {index}/{count}: the index counts from 0, so it must be below the count ({})",
                count - 1
            ));
        }
        Ok(Self { index, count })
    }
}

/// Parses `K/N` (shard K of N, K from 0) or `auto`.
pub fn parse_shard(s: &str) -> Result<ShardSpec, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("auto") {
        return Ok(ShardSpec::Auto);
    }
    let Some((k, n)) = t.split_once('/') else {
        return Err(format!("'{s}' is not a shard: write K/N (shard K of N, K from 0, e.g. 0/4) or auto"));
    };
    let num = |v: &str, what: &str| {
        v.trim().parse::<usize>().map_err(|_| format!("'{s}': the shard {what} '{v}' is not a whole number"))
    };
    Shard::new(num(k, "index")?, num(n, "count")?).map(ShardSpec::Fixed)
}

/// This worker's shard from the batch engine's environment, a map of variable names to values:
/// * Slurm job arrays: `SLURM_ARRAY_TASK_ID`, with `SLURM_ARRAY_TASK_MIN` (default 0) and
///   `SLURM_ARRAY_TASK_COUNT`; the shard is `ID - MIN` of `COUNT` (an array `--array=1-4` gives
///   shards 0..3 of 4). An array with a step (`0-7:2`) is refused: its IDs are not consecutive.
/// * Kubernetes Indexed Jobs: `JOB_COMPLETION_INDEX`, with the count in [`K8S_COUNT_VAR`] (the
///   manifest passes the Job's `completions`).
///
/// The error says which variable is missing or wrong.
pub fn shard_from_env(env: &HashMap<String, String>) -> Result<Shard, String> {
    let get = |k: &str| env.get(k).map(|v| v.trim()).filter(|v| !v.is_empty());
    let num = |k: &str| -> Result<Option<usize>, String> {
        get(k).map(|v| v.parse::<usize>().map_err(|_| format!("{k}='{v}' is not a whole number"))).transpose()
    };
    if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
        let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
        let Some(count) = num("SLURM_ARRAY_TASK_COUNT")? else {
            return Err("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not (is this a job array?)".into());
        };
        if let Some(step) = num("SLURM_ARRAY_TASK_STEP")?
            && step > 1
        {
            return Err(format!(
                "the job array has a step of {step} (SLURM_ARRAY_TASK_STEP); submit consecutive task IDs (--array=0-{})",
                count.saturating_sub(1)
            ));
        }
        if let Some(max) = num("SLURM_ARRAY_TASK_MAX")?
            && max.checked_sub(min).map(|d| d + 1) != Some(count)
        {
            return Err(format!(
                "the job array's IDs {min}..{max} are not {count} consecutive tasks; submit --array=0-{}",
                count.saturating_sub(1)
            ));
        }
        let Some(index) = id.checked_sub(min) else {
            return Err(format!("SLURM_ARRAY_TASK_ID={id} is below SLURM_ARRAY_TASK_MIN={min}"));
        };
        return Shard::new(index, count).map_err(|e| format!("from the Slurm environment: {e}"));
    }
    if let Some(index) = num("JOB_COMPLETION_INDEX")? {
        let Some(count) = num(K8S_COUNT_VAR)? else {
            return Err(format!(
                "JOB_COMPLETION_INDEX is set but {K8S_COUNT_VAR} is not: the Indexed Job's manifest must pass the \
                 Job's completions in {K8S_COUNT_VAR} (see deploy/k8s/job.yaml)"
            ));
        };
        return Shard::new(index, count).map_err(|e| format!("from the Kubernetes environment: {e}"));
    }
    Err(format!(
        "no batch engine in the environment: neither SLURM_ARRAY_TASK_ID (a Slurm job array) nor \
         JOB_COMPLETION_INDEX (a Kubernetes Indexed Job, with {K8S_COUNT_VAR}) is set; give the shard as K/N"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn parses_k_of_n_and_auto() {
        assert_eq!(parse_shard("0/4"), Ok(ShardSpec::Fixed(Shard { index: 0, count: 4 })));
        assert_eq!(parse_shard(" 3/4 "), Ok(ShardSpec::Fixed(Shard { index: 3, count: 4 })));
        assert_eq!(parse_shard("auto"), Ok(ShardSpec::Auto));
        let e = parse_shard("5/4").unwrap_err();
        assert!(e.contains("below the count (3)"), "{e}");
        assert!(parse_shard("4/4").unwrap_err().contains("below the count"));
        assert!(parse_shard("0/0").unwrap_err().contains("at least 1"));
        assert!(parse_shard("a/4").unwrap_err().contains("index 'a'"));
        assert!(parse_shard("1").unwrap_err().contains("write K/N"));
        assert!(parse_shard("-1/4").unwrap_err().contains("not a whole number"));
    }

    #[test]
    fn slurm_array_environment() {
        let e = env(&[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_MIN", "0"), ("SLURM_ARRAY_TASK_COUNT", "4")]);
        assert_eq!(shard_from_env(&e), Ok(Shard { index: 2, count: 4 }));
        // --array=1-4: task 4 is shard 3 of 4.
        let e = env(&[
            ("SLURM_ARRAY_TASK_ID", "4"),
            ("SLURM_ARRAY_TASK_MIN", "1"),
            ("SLURM_ARRAY_TASK_MAX", "4"),
            ("SLURM_ARRAY_TASK_COUNT", "4"),
            ("SLURM_ARRAY_TASK_STEP", "1"),
        ]);
        assert_eq!(shard_from_env(&e), Ok(Shard { index: 3, count: 4 }));
        let e = env(&[("SLURM_ARRAY_TASK_ID", "2")]);
        assert!(shard_from_env(&e).unwrap_err().contains("SLURM_ARRAY_TASK_COUNT is not"));
        let e = env(&[("SLURM_ARRAY_TASK_ID", "6"), ("SLURM_ARRAY_TASK_COUNT", "4"), ("SLURM_ARRAY_TASK_STEP", "2")]);
        assert!(shard_from_env(&e).unwrap_err().contains("step of 2"));
        let e = env(&[("SLURM_ARRAY_TASK_ID", "9"), ("SLURM_ARRAY_TASK_COUNT", "4")]);
        assert!(shard_from_env(&e).unwrap_err().contains("from the Slurm environment"));
    }

    #[test]
    fn kubernetes_indexed_job_environment() {
        // Exactly what a pod of deploy/k8s/job.yaml sees: the index from Kubernetes, the count
        // from the manifest.
        let e = env(&[("JOB_COMPLETION_INDEX", "1"), (K8S_COUNT_VAR, "4"), ("HOSTNAME", "infdit-1-x7k2p")]);
        assert_eq!(shard_from_env(&e), Ok(Shard { index: 1, count: 4 }));
        let e = env(&[("JOB_COMPLETION_INDEX", "1")]);
        assert!(shard_from_env(&e).unwrap_err().contains(K8S_COUNT_VAR));
        let e = env(&[("JOB_COMPLETION_INDEX", "4"), (K8S_COUNT_VAR, "4")]);
        assert!(shard_from_env(&e).unwrap_err().contains("below the count"));
    }

    #[test]
    fn no_engine_is_a_clear_error() {
        let e = shard_from_env(&env(&[("HOME", "/root")])).unwrap_err();
        assert!(e.contains("no batch engine") && e.contains("K/N"), "{e}");
        let e = shard_from_env(&env(&[("SLURM_ARRAY_TASK_ID", "x")])).unwrap_err();
        assert!(e.contains("SLURM_ARRAY_TASK_ID='x'"), "{e}");
    }
}

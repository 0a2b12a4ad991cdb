//! The job store: one SQLite file (`infdit.sqlite` in the data folder, migrated by
//! `PRAGMA user_version`), the jobs' files beside it in `jobs/<id>/`.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// The schema, one entry per version: the database is at version `i + 1` once `MIGRATIONS[..=i]`
/// ran.
const MIGRATIONS: &[&str] = &["
CREATE TABLE jobs (
    id TEXT PRIMARY KEY NOT NULL,
    position INTEGER NOT NULL,
    state TEXT NOT NULL,
    options TEXT NOT NULL,
    input_name TEXT NOT NULL,
    input_ext TEXT NOT NULL,
    output_ext TEXT NOT NULL,
    input_bytes INTEGER NOT NULL,
    in_width INTEGER NOT NULL,
    in_height INTEGER NOT NULL,
    out_width INTEGER NOT NULL,
    out_height INTEGER NOT NULL,
    work_done INTEGER NOT NULL DEFAULT 0,
    work_total INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    started_ms INTEGER,
    finished_ms INTEGER,
    run_ms INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    resumed_steps INTEGER NOT NULL DEFAULT 0,
    error TEXT
);
CREATE INDEX jobs_by_state ON jobs (state, position);
"];

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for a worker.
    Queued,
    /// A worker runs it.
    Running,
    /// The output is ready.
    Done,
    /// It stopped with an error.
    Failed,
    /// Cancelled by a client.
    Cancelled,
}

impl JobState {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Done => "done",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "done" => JobState::Done,
            "cancelled" => JobState::Cancelled,
            _ => JobState::Failed,
        }
    }

    /// Whether the job will not change any more (unless retried).
    pub fn is_final(self) -> bool {
        matches!(self, JobState::Done | JobState::Failed | JobState::Cancelled)
    }
}

/// One row of the jobs table.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    /// Job id (16 hex digits).
    pub id: String,
    /// Order in the queue (smaller first).
    pub position: i64,
    /// State.
    pub state: JobState,
    /// The options, as JSON.
    pub options: String,
    /// The uploaded file's name, for display only (never used as a path).
    pub input_name: String,
    /// Extension of the stored input (from its content).
    pub input_ext: String,
    /// Extension of the output.
    pub output_ext: String,
    /// Size of the upload.
    pub input_bytes: i64,
    /// Input size.
    pub in_size: (i64, i64),
    /// Output size.
    pub out_size: (i64, i64),
    /// Block evaluations done, of `work_total` (as last stored).
    pub work_done: i64,
    /// Block evaluations of the whole job.
    pub work_total: i64,
    /// Unix milliseconds.
    pub created_ms: i64,
    /// Unix milliseconds of the first start.
    pub started_ms: Option<i64>,
    /// Unix milliseconds.
    pub finished_ms: Option<i64>,
    /// Milliseconds spent running, over all attempts.
    pub run_ms: i64,
    /// Runs started (a resume after a restart is one more).
    pub attempts: i64,
    /// Sampler steps restored from the checkpoint on the last resume.
    pub resumed_steps: i64,
    /// The error, in words.
    pub error: Option<String>,
}

const COLUMNS: &str = "id, position, state, options, input_name, input_ext, output_ext, input_bytes, in_width, \
     in_height, out_width, out_height, work_done, work_total, created_ms, started_ms, finished_ms, run_ms, attempts, \
     resumed_steps, error";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        id: r.get(0)?,
        position: r.get(1)?,
        state: JobState::parse(&r.get::<_, String>(2)?),
        options: r.get(3)?,
        input_name: r.get(4)?,
        input_ext: r.get(5)?,
        output_ext: r.get(6)?,
        input_bytes: r.get(7)?,
        in_size: (r.get(8)?, r.get(9)?),
        out_size: (r.get(10)?, r.get(11)?),
        work_done: r.get(12)?,
        work_total: r.get(13)?,
        created_ms: r.get(14)?,
        started_ms: r.get(15)?,
        finished_ms: r.get(16)?,
        run_ms: r.get(17)?,
        attempts: r.get(18)?,
        resumed_steps: r.get(19)?,
        error: r.get(20)?,
    })
}

/// The open database and the data folder.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    dir: PathBuf,
    /// `infdit.lock`, locked while this server uses the folder (two servers would run the same jobs).
    _lock: std::fs::File,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Store {
    /// Opens (creating and migrating) the store in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("jobs"))?;
        let lock =
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join("infdit.lock"))?;
        if let Err(e) = lock.try_lock() {
            anyhow::bail!(
                "{}: {}",
                dir.display(),
                match e {
                    std::fs::TryLockError::WouldBlock => "another infdit serve uses this data folder; stop it or give \
                                                         another --data-dir"
                        .to_string(),
                    std::fs::TryLockError::Error(e) => format!("cannot lock the data folder: {e}"),
                }
            );
        }
        let conn = Connection::open(dir.join("infdit.sqlite"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let mut store = Self { conn, dir: dir.to_path_buf(), _lock: lock };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> anyhow::Result<()> {
        let version: usize = self.conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if version > MIGRATIONS.len() {
            anyhow::bail!(
                "{}: the database is at schema version {version}, newer than this infdit ({}); use a newer infdit or \
                 another --data-dir",
                self.dir.join("infdit.sqlite").display(),
                MIGRATIONS.len()
            );
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// The data folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder of a job's files.
    pub fn job_dir(&self, id: &str) -> PathBuf {
        self.dir.join("jobs").join(id)
    }

    /// Adds a queued job at the end of the queue.
    pub fn insert(&self, j: &JobRow) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT INTO jobs (id, position, state, options, input_name, input_ext, output_ext, input_bytes, in_width, \
             in_height, out_width, out_height, work_total, created_ms) VALUES (?1, \
             (SELECT COALESCE(MAX(position), 0) + 1 FROM jobs), 'queued', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
            params![
                j.id,
                j.options,
                j.input_name,
                j.input_ext,
                j.output_ext,
                j.input_bytes,
                j.in_size.0,
                j.in_size.1,
                j.out_size.0,
                j.out_size.1,
                j.work_total,
                j.created_ms
            ],
        )?;
        Ok(())
    }

    /// One job.
    pub fn get(&self, id: &str) -> rusqlite::Result<Option<JobRow>> {
        self.conn.query_row(&format!("SELECT {COLUMNS} FROM jobs WHERE id = ?1"), [id], row).optional()
    }

    /// All jobs, the queue order (oldest first).
    pub fn list(&self) -> rusqlite::Result<Vec<JobRow>> {
        let mut st = self.conn.prepare_cached(&format!("SELECT {COLUMNS} FROM jobs ORDER BY position"))?;
        st.query_map([], row)?.collect()
    }

    /// Jobs queued or running.
    pub fn active(&self) -> rusqlite::Result<i64> {
        self.conn.query_row("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')", [], |r| r.get(0))
    }

    /// Jobs per state.
    pub fn counts(&self) -> rusqlite::Result<Vec<(String, i64)>> {
        let mut st = self.conn.prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
    }

    /// Place in the queue of a queued job (1 = next).
    pub fn queue_place(&self, position: i64) -> rusqlite::Result<i64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND position <= ?1", [position], |r| r.get(0))
    }

    /// Takes the first queued job: it becomes running.
    pub fn claim(&self) -> rusqlite::Result<Option<JobRow>> {
        let id: Option<String> = self
            .conn
            .query_row("SELECT id FROM jobs WHERE state = 'queued' ORDER BY position LIMIT 1", [], |r| r.get(0))
            .optional()?;
        let Some(id) = id else { return Ok(None) };
        self.conn.execute(
            "UPDATE jobs SET state = 'running', started_ms = COALESCE(started_ms, ?2), attempts = attempts + 1 \
             WHERE id = ?1",
            params![id, now_ms()],
        )?;
        self.get(&id)
    }

    /// Jobs left running by a server that stopped go back to the queue, in their place.
    pub fn requeue_running(&self) -> rusqlite::Result<usize> {
        self.conn.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'", [])
    }

    /// Records progress (and the steps restored by a resume).
    pub fn progress(&self, id: &str, done: i64, total: i64, resumed_steps: Option<i64>) -> rusqlite::Result<()> {
        self.conn.execute(
            "UPDATE jobs SET work_done = ?2, work_total = ?3, resumed_steps = COALESCE(?4, resumed_steps) WHERE id = ?1",
            params![id, done, total, resumed_steps],
        )?;
        Ok(())
    }

    /// Ends a run: the new state, the error, the time it ran. Returns false when the job is gone
    /// (deleted while it ran).
    pub fn finish(&self, id: &str, state: JobState, error: Option<&str>, ran_ms: i64) -> rusqlite::Result<bool> {
        let finished = state.is_final().then(now_ms);
        let n = self.conn.execute(
            "UPDATE jobs SET state = ?2, error = ?3, run_ms = run_ms + ?4, finished_ms = ?5, \
             work_done = CASE WHEN ?2 = 'done' THEN work_total ELSE work_done END WHERE id = ?1",
            params![id, state.as_str(), error, ran_ms, finished],
        )?;
        Ok(n == 1)
    }

    /// Cancels a queued job; false when it is not queued.
    pub fn cancel_queued(&self, id: &str) -> rusqlite::Result<bool> {
        let n = self.conn.execute(
            "UPDATE jobs SET state = 'cancelled', finished_ms = ?2 WHERE id = ?1 AND state = 'queued'",
            params![id, now_ms()],
        )?;
        Ok(n == 1)
    }

    /// Queues a failed or cancelled job again, at the end of the queue; false when it is in
    /// another state.
    pub fn retry(&self, id: &str) -> rusqlite::Result<bool> {
        let n = self.conn.execute(
            "UPDATE jobs SET state = 'queued', error = NULL, finished_ms = NULL, work_done = 0, \
             position = (SELECT MAX(position) + 1 FROM jobs) WHERE id = ?1 AND state IN ('failed', 'cancelled')",
            [id],
        )?;
        Ok(n == 1)
    }

    /// Removes a job's row.
    pub fn delete(&self, id: &str) -> rusqlite::Result<bool> {
        Ok(self.conn.execute("DELETE FROM jobs WHERE id = ?1", [id])? == 1)
    }

    /// Finished jobs to remove: those finished before `before_ms`, and all but the newest `keep`.
    pub fn expired(&self, before_ms: i64, keep: usize) -> rusqlite::Result<Vec<String>> {
        let mut st = self.conn.prepare_cached(
            "SELECT id FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND (finished_ms < ?1 OR id NOT IN \
             (SELECT id FROM jobs WHERE state IN ('done', 'failed', 'cancelled') ORDER BY finished_ms DESC, position \
             DESC LIMIT ?2))",
        )?;
        st.query_map(params![before_ms, keep as i64], |r| r.get(0))?.collect()
    }
}

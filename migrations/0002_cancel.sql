-- DELETE /api/distribute/image/<id> on a RUNNING job: the worker that holds the lease sees this
-- flag at its next heartbeat (or at once when it runs in the same process) and stops the job.
ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1));

-- The job list pages newest first.
CREATE INDEX jobs_created ON jobs (created_at DESC, id DESC);

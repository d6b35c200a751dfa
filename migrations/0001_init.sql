-- pydlit job store. One row per job in `jobs`, one per target in `job_targets`; a person can
-- read both with sqlite3. Times are UTC ISO-8601 text. Credentials never live in these tables in
-- the clear: they sit sealed (AES-GCM) in `job_secrets` only while the job can still run.

CREATE TABLE jobs (
    id            TEXT PRIMARY KEY,
    state         TEXT NOT NULL DEFAULT 'QUEUED'
                  CHECK (state IN ('QUEUED', 'RUNNING', 'FINISHED', 'FAILED')),
    source        TEXT NOT NULL,                -- endpoint/image:ref, for people reading the table
    request       TEXT NOT NULL CHECK (json_valid(request)),  -- as posted, credentials redacted
    error         TEXT,                          -- why the whole job failed (e.g. source missing)
    attempt       INTEGER NOT NULL DEFAULT 0,    -- how many times a worker has claimed it
    lease_owner   TEXT,
    lease_expires TEXT,
    created_at    TEXT NOT NULL,
    started_at    TEXT,
    finished_at   TEXT,
    CHECK ((state = 'RUNNING') = (lease_owner IS NOT NULL))
) STRICT;

CREATE INDEX jobs_queue ON jobs (state, created_at);

CREATE TABLE job_secrets (
    job_id TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    -- {"source": AUTH, "targets": [AUTH, ...]} sealed with the key in PYDLIT_SECRET_KEY or <db>.key
    sealed TEXT NOT NULL CHECK (sealed LIKE 'v1:%')
) STRICT;

CREATE TABLE job_targets (
    job_id      TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,               -- position in the request's target list
    endpoint    TEXT NOT NULL,                  -- exactly as posted
    image       TEXT NOT NULL,
    ref         TEXT NOT NULL,
    state       TEXT NOT NULL DEFAULT 'PENDING'
                CHECK (state IN ('PENDING', 'RUNNING', 'FINISHED', 'SKIPPED', 'FAILED')),
    error       TEXT,
    bytes_done  INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER,
    updated_at  TEXT,
    PRIMARY KEY (job_id, idx)
) STRICT;

-- Upload sessions in flight: the newest Location the registry gave and the bytes it acknowledged.
-- After a restart a job resumes each blob from here.
CREATE TABLE uploads (
    job_id     TEXT NOT NULL,
    target_idx INTEGER NOT NULL,
    digest     TEXT NOT NULL,
    location   TEXT NOT NULL,
    offset     INTEGER NOT NULL CHECK (offset >= 0),
    updated_at TEXT NOT NULL,
    PRIMARY KEY (job_id, target_idx, digest),
    FOREIGN KEY (job_id, target_idx) REFERENCES job_targets (job_id, idx) ON DELETE CASCADE
) STRICT;

-- Where blobs are known to sit, so that a target can mount instead of upload.
CREATE TABLE known_blobs (
    registry   TEXT NOT NULL,                   -- scheme://host:port of the registry
    repository TEXT NOT NULL,
    digest     TEXT NOT NULL,
    seen_at    TEXT NOT NULL,
    PRIMARY KEY (registry, digest, repository)
) STRICT;

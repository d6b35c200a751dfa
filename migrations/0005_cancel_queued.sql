-- A DELETE of a QUEUED job that holds upload sessions of an earlier attempt (a stop requeued it
-- part way) leaves it QUEUED with cancel_requested set, for a worker to claim at once, full or
-- not, and give the sessions back: found with one index search, however long the queue.
CREATE INDEX jobs_queued_cancelled ON jobs (created_at) WHERE state = 'QUEUED' AND cancel_requested = 1;

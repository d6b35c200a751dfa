-- What a running target is waiting out (a transient failure being retried), shown with its
-- status; cleared when its bytes move again and when it ends.
ALTER TABLE job_targets ADD COLUMN retrying TEXT;

-- Ending a job (FINISHED or FAILED, by its worker or by a cancel) forgets its credentials and
-- upload checkpoints in the same statement, whoever ends it: one write instead of a transaction
-- of three, and no path that can leave a sealed password behind an ended job.
CREATE TRIGGER job_ended AFTER UPDATE OF state ON jobs
WHEN NEW.state IN ('FINISHED', 'FAILED')
BEGIN
    DELETE FROM job_secrets WHERE job_id = NEW.id;
    DELETE FROM uploads WHERE job_id = NEW.id;
END;

-- A registry reached by one name may name its upload sessions by another (a configured hostname:
-- Quay, Harbor, distribution's http.host). The process that saw it do so trusted that host with
-- the registry's credentials; this records it, so that after a restart the session resumes (or
-- is given back) instead of being sent nothing and started over.
ALTER TABLE uploads ADD COLUMN named INTEGER NOT NULL DEFAULT 0 CHECK (named IN (0, 1));

-- The idempotency key client:{sessionId}:{workerId}:{clientEventId} is unique as a string, as
-- SPEC §5 states, not only as the tuple it is made of: worker and event ids may contain ':', and
-- (workerId "a:b", clientEventId "c") and ("a", "b:c") spell the same key. Unique on the tuple,
-- both were stored and the key check could not tell which one a device asked about; unique on
-- the spelled key, the second is an IDEMPOTENCY_CONFLICT and the check names one record.
-- Session ids never contain ':', so (session_id, worker_id || ':' || client_event_id) is the
-- key itself. Voids carry no client_event_id: their expression is NULL, never a conflict.
-- This index implies the tuple constraint, which goes (one index on the hot path, not two).
-- On a database that already holds two records spelling one key, this migration fails (and
-- changes nothing): find them with
--   SELECT session_id, worker_id || ':' || client_event_id, count(*) FROM production_records
--   WHERE kind = 'record' GROUP BY 1, 2 HAVING count(*) > 1;
-- and void or re-key one of each pair by hand before migrating again.

CREATE UNIQUE INDEX production_records_client_key
    ON production_records (session_id, (worker_id || ':' || client_event_id));
ALTER TABLE production_records DROP CONSTRAINT production_records_client_event_key;
